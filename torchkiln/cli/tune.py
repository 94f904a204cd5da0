"""``kiln tune RECIPE``: search the recipe's ``[tune]`` space with Optuna (see :mod:`torchkiln.tuning`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchkiln import tuning
from torchkiln.cli.build import build_and_check, prepare
from torchkiln.cli.common import stage_printer
from torchkiln.cli.plots import matplotlib_or_reason, save_figure
from torchkiln.compiler.files import atomic_directory, check_destination, write_marker
from torchkiln.driver.cache import default_directory
from torchkiln.errors import ConfigError
from torchkiln.recipe import Recipe, load_recipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tune", help="search a recipe's [tune] space for the best artifact (Optuna)",
                            description=tuning.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("recipe", metavar="RECIPE", help="path to kiln.toml with a [tune] table")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite tune.db next to the recipe); "
                        "workers on several machines share one RDB URL")  # fmt: skip
    parser.add_argument("-o", "--output", help="output directory (default: tune/ next to the recipe)")
    parser.add_argument("--trials", type=int, help="the budget (overrides [tune] trials; the study is the same)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="start no trial after this long")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes on the study (default 1)")
    parser.add_argument("--grace-period", type=int, default=30, metavar="SECONDS",
                        help="a running trial without a heartbeat for this long is a killed worker's: failed, "
                        "not counted, redone (default 30)")  # fmt: skip
    parser.add_argument("--no-output", action="store_true", help=argparse.SUPPRESS)  # a --workers child
    parser.add_argument("--cache-dir", help="stage cache directory")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the stage cache")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    tune = tuning.settings(recipe)
    for flag, value, low in (("--trials", args.trials, 1), ("--workers", args.workers, 1), ("--grace-period", args.grace_period, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}", where=flag)
    if args.trials is not None:
        tune = dataclasses.replace(tune, trials=args.trials)
    output = Path(args.output) if args.output else recipe.path.parent / "tune"
    if not args.no_output:
        check_destination(output, "tune")
    storage = tuning.storage_url(recipe, args.storage)
    tuning.check_storage(storage)  # before the work and before any worker starts
    worker = os.environ.get("TORCHKILN_TUNE_WORKER_ID")
    printer = stage_printer(args.quiet)
    bar = _bar(tune.trials, args.quiet or worker is not None)
    say = _sayer(printer, bar, f"[worker {worker}] " if worker else "")
    if args.workers > 1 and "latency_ms" in tune.objectives:
        say(f"note: latency is measured while {args.workers} workers share this machine's cores")
    children = [_spawn(args, storage, k) for k in range(1, args.workers)]
    try:
        study = _search(recipe, tune, storage, args, say, bar)
    except BaseException:
        for child in children:  # this process failed or was interrupted: stop its workers
            child.terminate()
        raise
    finally:
        codes = [child.wait() for child in children]
        if bar is not None:
            bar.close()
    if args.no_output:
        return 0
    code = _write(study, recipe, tune, output, args.quiet)
    failed = [k for k, status in enumerate(codes, 1) if status not in (0, 1)]
    for k in failed:
        print(f"kiln tune: error: worker {k} exited with status {codes[k - 1]} (its lines above say why)", file=sys.stderr)
    return 1 if failed else code


def _search(recipe: Recipe, tune: tuning.TuneSettings, storage: str, args: argparse.Namespace,
            say: Callable[[str], None], bar: Any) -> Any:  # fmt: skip
    data = prepare(recipe)
    cache = None if args.no_cache else (args.cache_dir or default_directory())

    def evaluate(candidate: Recipe) -> dict[str, Any]:
        compiled, _, gates, measured = build_and_check(candidate, data, cache, None)
        # an objective that was not measured is NaN: the trial fails saying so (tuning.run_study)
        return {**{k: math.nan if v is None else v for k, v in measured.items()}, "backend": compiled.backend,
                "constraints": {g["gate"]: g["value"] - g["limit"] for g in gates}}  # fmt: skip

    tick = (lambda n: bar.update(n - bar.n)) if bar is not None else None
    return tuning.run_study(recipe, tune, storage, evaluate, say, timeout=args.timeout, tick=tick,
                            grace_period=args.grace_period)  # fmt: skip


def _write(study: Any, recipe: Recipe, tune: tuning.TuneSettings, output: Path, quiet: bool) -> int:
    """tune/ (atomically): every trial, the Pareto plot and best.toml; 0 when a trial is feasible."""
    table = tuning.rows(study, tune)
    chosen = tuning.best(study, tune, table)
    with atomic_directory(output, "tune") as staging:
        write_marker(staging, "tune", study=tuning.study_name(recipe), recipe=str(recipe.path))
        (staging / "trials.json").write_text(json.dumps(table, indent=2) + "\n")
        (staging / "trials.csv").write_text(tuning.csv_text(table))
        if chosen is not None:
            best = tuning.variant(recipe, chosen["params"])
            (staging / "best.toml").write_text(tuning.toml_text(tuning.relocated(best.raw, recipe.path.parent, output)))
        _plot(staging / "pareto.png", table, tune)
    if not quiet:
        done = [r for r in table if r["state"] == "COMPLETE"]
        repeats = sum(1 for r in table if r["same_as"] is not None)
        print(f"kiln tune: {len(done)} complete trial(s) of {len(table) - repeats} built"
              + (f" ({repeats} repeated proposal(s) asked again, not built)" if repeats else "") + "; "
              + (f"best #{chosen['number']}: " + ", ".join(f"{o} {chosen[o]:.4g}" for o in tune.objectives)
                 + f" {json.dumps(chosen['params'], sort_keys=True)}" if chosen else "no feasible trial (see trials.csv)"))  # fmt: skip
        print(f"kiln: wrote {output}", file=sys.stderr)
    return 0 if chosen is not None else 1


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


def _spawn(args: argparse.Namespace, storage: str, k: int) -> subprocess.Popen[bytes]:
    """Local worker ``k``: ``kiln tune`` on the same study, writing no output (this process does)."""
    command = [sys.executable, "-m", "torchkiln.cli", "tune", args.recipe, "--storage", storage, "--no-output",
               "--grace-period", str(args.grace_period)]  # fmt: skip
    for flag, value in (("--trials", args.trials), ("--timeout", args.timeout), ("--cache-dir", args.cache_dir)):
        if value is not None:
            command += [flag, str(value)]
    command += ["--no-cache"] * args.no_cache + ["--quiet"] * args.quiet
    return subprocess.Popen(command, env=os.environ | {"TORCHKILN_TUNE_WORKER_ID": str(k)})


def _plot(path: Path, table: list[dict[str, Any]], tune: tuning.TuneSettings) -> None:
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
        ax.set_xlabel(other)
        ax.set_ylabel("accuracy drop (points)")
        ax.legend()
    save_figure(plt, figure, path, dpi=80)
