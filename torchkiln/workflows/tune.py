"""``torchkiln.tune(recipe)``: search a recipe's ``[tune]`` space with Optuna and write what it found
(``kiln tune`` is this function with arguments parsed). The search itself — the space, the study,
objectives, constraints, repeated proposals, killed workers — is :mod:`torchkiln.workflows.tuning`.

Writes, atomically into ``output`` (default: ``tune/`` next to the recipe): ``trials.json`` and
``trials.csv`` (every trial), ``pareto.png`` (with matplotlib; each point labelled with its trial
number) and ``best.toml`` (the chosen trial's recipe, paths relocated) when a trial is feasible.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchkiln.compiler import arguments
from torchkiln.compiler.arguments import integer
from torchkiln.compiler.files import atomic_directory, check_destination, write_marker
from torchkiln.driver.cache import default_directory
from torchkiln.errors import ConfigError
from torchkiln.workflows import tuning
from torchkiln.workflows.build import build_and_check, prepare
from torchkiln.workflows.plots import matplotlib_or_reason, save_figure
from torchkiln.workflows.recipe import Recipe, load_recipe


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """Every trial as a row (``trials.json``), the chosen one (None when no trial is feasible),
    the worker exit codes that were not 0 or 1, and where the results went (None without output)."""

    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    output: Path | None
    failed_workers: dict[int, int] = dataclasses.field(default_factory=dict)

    def summary(self, objectives: tuple[str, ...] | list[str]) -> str:
        done = [r for r in self.trials if r["state"] == "COMPLETE"]
        repeats = sum(1 for r in self.trials if r["same_as"] is not None)
        chosen = self.best
        return (f"{len(done)} complete trial(s) of {len(self.trials) - repeats} built"
                + (f" ({repeats} repeated proposal(s) asked again, not built)" if repeats else "") + "; "
                + (f"best #{chosen['number']}: " + ", ".join(f"{o} {chosen[o]:.4g}" for o in objectives)
                   + f" {json.dumps(chosen['params'], sort_keys=True)}" if chosen else "no feasible trial (see trials.csv)"))  # fmt: skip


def tune(
    recipe: str | Path | Recipe,
    output: str | Path | None = None,
    *,
    storage: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    grace_period: int = 30,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    write: bool = True,
    progress: Callable[[str], None] | None = None,
    progress_bar: bool | None = None,
) -> TuneResult:
    """Search the recipe's ``[tune]`` space; write the results to ``output`` (see the module).

    ``storage`` is an Optuna URL (default: ``sqlite`` ``tune.db`` next to the recipe; workers on
    several machines share one RDB URL). ``trials`` overrides ``[tune] trials`` (the study is the
    same); ``timeout`` (seconds) starts no trial after it; ``workers`` > 1 starts that many local
    processes on the study; a running trial without a heartbeat for ``grace_period`` seconds is a
    killed worker's (failed, not counted, redone). ``write=False`` searches only (a worker's role).
    ``progress`` receives a line per event; ``progress_bar`` (default: with ``progress``) shows a
    trial bar on stderr.
    """
    arguments.path("output", output, optional=True)
    arguments.path("cache_dir", cache_dir, optional=True)
    arguments.text("storage", storage, optional=True)
    arguments.flag("use_cache", use_cache)
    arguments.flag("write", write)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(arguments.path("recipe", recipe))
    settings = tuning.settings(recipe)
    # each worker is a process with its own torch (~0.5 GiB): more than the cores only compete (a fuzzed
    # workers=200 filled 24 GiB)
    if trials is not None:  # None: the recipe's
        integer("trials", trials, high=100_000)
    integer("workers", workers, high=os.cpu_count() or 1)
    if timeout is not None:  # None: no limit; NaN would never end
        arguments.real("timeout", timeout, low=0, strict=False, unit="of seconds")
    arguments.real("grace_period", grace_period, low=1, strict=False, unit="of seconds")
    if trials is not None:
        settings = dataclasses.replace(settings, trials=trials)
    destination = Path(output) if output else recipe.path.parent / "tune"
    if write:
        check_destination(destination, "tune", recipe.files())
    url = tuning.storage_url(recipe, storage)
    tuning.check_storage(url)  # before the work and before any worker starts
    worker = os.environ.get("TORCHKILN_TUNE_WORKER_ID")
    bar = _bar(settings.trials, not (progress_bar if progress_bar is not None else progress is not None) or worker is not None)
    say = _sayer(progress, bar, f"[worker {worker}] " if worker else "")
    if workers > 1 and "latency_ms" in settings.objectives:
        say(f"note: latency is measured while {workers} workers share this machine's cores")
    cache = (cache_dir or default_directory()) if use_cache else None
    child_args = {"storage": url, "trials": trials, "timeout": timeout, "grace_period": grace_period,
                  "cache_dir": None if cache is None else str(cache), "quiet": progress is None}  # fmt: skip
    children = [_spawn(recipe.path, child_args, k) for k in range(1, workers)]
    try:
        study = _search(recipe, settings, url, cache, timeout, grace_period, say, bar)
    except BaseException:
        for child in children:  # this process failed or was interrupted: stop its workers
            child.terminate()
        raise
    finally:
        codes = [child.wait() for child in children]
        if bar is not None:
            bar.close()
    failed = {k: code for k, code in enumerate(codes, 1) if code not in (0, 1)}
    table = tuning.rows(study, settings)
    chosen = tuning.best(study, settings, table)
    if write:
        _write(table, chosen, recipe, settings, destination)
    return TuneResult(table, chosen, destination if write else None, failed)


def _search(recipe: Recipe, settings: tuning.TuneSettings, storage: str, cache: Any, timeout: float | None,
            grace_period: int, say: Callable[[str], None], bar: Any) -> Any:  # fmt: skip
    data = prepare(recipe, say)

    def evaluate(candidate: Recipe) -> dict[str, Any]:
        compiled, _, gates, measured = build_and_check(candidate, data, cache, None)
        # an objective that was not measured is NaN: the trial fails saying so (tuning.run_study)
        return {**{k: math.nan if v is None else v for k, v in measured.items()}, "backend": compiled.backend,
                "constraints": {g["gate"]: g["value"] - g["limit"] for g in gates}}  # fmt: skip

    tick = (lambda n: bar.update(n - bar.n)) if bar is not None else None
    return tuning.run_study(recipe, settings, storage, evaluate, say, timeout=timeout, tick=tick,
                            grace_period=grace_period)  # fmt: skip


def _write(table: list[dict[str, Any]], chosen: dict[str, Any] | None, recipe: Recipe,
           settings: tuning.TuneSettings, output: Path) -> None:  # fmt: skip
    """tune/ (atomically): every trial, the Pareto plot and best.toml."""
    with atomic_directory(output, "tune") as staging:
        write_marker(staging, "tune", study=tuning.study_name(recipe), recipe=str(recipe.path))
        (staging / "trials.json").write_text(json.dumps(table, indent=2) + "\n")
        (staging / "trials.csv").write_text(tuning.csv_text(table))
        if chosen is not None:
            best = tuning.variant(recipe, chosen["params"])
            (staging / "best.toml").write_text(tuning.toml_text(tuning.relocated(best.raw, recipe.path.parent, output)))
        _plot(staging / "pareto.png", table)


def _bar(budget: int, hidden: bool) -> Any:
    """A bar for the budget on stderr (tqdm hides it when stderr is not a terminal)."""
    if hidden:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=budget, desc="kiln tune", unit="trial", disable=None, leave=False)


def _sayer(printer: Callable[[str], None] | None, bar: Any, prefix: str) -> Callable[[str], None]:
    if printer is None:
        return lambda _: None
    if bar is None or bar.disable:
        return lambda line: printer(prefix + line)
    from tqdm.auto import tqdm

    return lambda line: tqdm.write(f"kiln: {prefix}{line}", file=sys.stderr)


def _spawn(recipe: Path, options: dict[str, Any], k: int) -> subprocess.Popen[bytes]:
    """Local worker ``k``: this module's :func:`_worker` on the same study, writing no output."""
    command = [sys.executable, "-m", "torchkiln.workflows.tune", str(recipe), json.dumps(options)]
    return subprocess.Popen(command, env=os.environ | {"TORCHKILN_TUNE_WORKER_ID": str(k)})


def _worker(argv: list[str]) -> int:
    """A local worker's process: the search on the study its parent named, exit 1 on a KilnError
    (its line on stderr), as ``kiln tune`` would."""
    from torchkiln.errors import InputError, KilnError

    recipe, options = argv[0], json.loads(argv[1])
    quiet = options.pop("quiet")
    cache_dir = options.pop("cache_dir")
    printer = None if quiet else (lambda line: print(f"kiln: {line}", file=sys.stderr, flush=True))
    try:
        tune(recipe, write=False, cache_dir=cache_dir, use_cache=cache_dir is not None, progress=printer, **options)
    except KilnError as exc:
        print(f"kiln tune: error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, (ConfigError, InputError)) else 1
    except Exception as exc:  # the status tells the parent this worker failed (0 and 1 are a search's ends)
        print(f"kiln tune: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    return 0


def _plot(path: Path, table: list[dict[str, Any]]) -> None:
    """Accuracy drop against latency and size, one point per complete trial, labelled ``#n``."""
    plt, _ = matplotlib_or_reason()
    if plt is None:
        return
    done = [r for r in table if r["state"] == "COMPLETE"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, other in zip(axes, ("latency_ms", "size_mb")):
        for feasible, marker in ((True, "o"), (False, "x")):
            points = [r for r in done if r["feasible"] is feasible]
            ax.scatter([r[other] for r in points], [r["accuracy_drop"] for r in points], marker=marker,
                       label="feasible" if feasible else "misses a gate")  # fmt: skip
            for r in points:
                ax.annotate(f"#{r['number']}", (r[other], r["accuracy_drop"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)  # fmt: skip
        ax.set_xlabel({"latency_ms": "latency (ms)", "size_mb": "size (MB)"}[other])
        ax.set_ylabel("accuracy drop (points)")
        ax.legend()
    save_figure(plt, figure, path, dpi=80)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
