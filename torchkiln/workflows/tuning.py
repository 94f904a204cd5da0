"""``kiln tune``: search a recipe's ``[tune]`` space for the fastest, smallest artifact that keeps its
accuracy, with Optuna; resumable, and shared by workers through one study storage.

The ``[tune]`` table::

    [tune]
    trials = 16                                   # the budget, over all workers and runs
    objectives = ["accuracy_drop", "size_mb"]     # minimized; also "latency_ms" (default without
                                                  # an [evaluation]: size_mb, latency_ms)
    sampler = "tpe"                               # tpe | nsga2 | random
    seed = 0
    pruner = "gate"                               # gate (default) | none

    [tune.space]                                  # or one line: space = { "prune.ratio" = [0.0, 0.7] }
    prune = "optional"
    "prune.ratio" = [0.0, 0.7]
    "quantize.calibrator" = ["minmax", "percentile"]
    backend = ["onnxruntime", "torch"]

A space key is ``<pass>.<option>`` (a pass of the recipe's ``[[passes]]``, an option it declares):
``[low, high]`` numbers are a range (integers if both are), a list of strings or booleans a
choice; ``<pass> = "optional"`` lets the search drop that pass; ``backend`` chooses the backend
and ``backend.<option>`` an option of it (e.g. ``"backend.dtype" = ["float32", "bfloat16"]`` for
inductor), sampled only when the trial's backend declares it. The recipe's ``[gate]`` values are
constraints: a trial that misses one is infeasible (Optuna's constrained TPE / NSGA-II sample away
from it). A trial whose build fails is recorded as failed with its error.

Pruning (``pruner = "gate"``, the default with a ``max_accuracy_drop`` gate): before the full build,
a trial builds its passes up to the first lossy one on the torch backend — the cheap proxy — and
is pruned when that accuracy drop already misses the gate (later passes only lose more accuracy,
so a trial with ``distill`` after that pass is never pruned). Optuna's own pruners read
intermediate values, which Optuna supports for single-objective studies only; this check works for
any number of objectives and leaves a PRUNED trial in the study like theirs.

Each trial builds the recipe with its sampled options (``kiln build``'s compile, evaluation and
gates; the stage cache shared, nothing written) and records accuracy drop, latency, size. A fresh
study starts from the recipe as written, each optional pass alone and the recipe without each
optional pass (at most half the budget); best.toml is
never worse than the recipe as written on any objective, and latencies within 5% are a tie decided
by the next objective. The budget counts distinct builds: a
proposal with a built trial's options is asked again, not built (25 in a row end the search). The
study lives in ``tune.db`` (SQLite) next to the recipe unless ``--storage`` names an Optuna RDB URL;
rerunning resumes it — finished trials are never redone — and another ``kiln tune`` on the same
storage joins it, each worker stopping when the study holds the budget. Output, atomically in
``tune/``: ``trials.json`` / ``trials.csv``, ``pareto.png`` (with matplotlib) and ``best.toml``, the
recipe with the chosen trial's options: among feasible trials on the Pareto front, the lowest
first objective (ties: the next).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torchkiln.backends import BACKEND_NAMES
from torchkiln.compiler.passes import get_pass
from torchkiln.errors import ConfigError, KilnError, StorageError
from torchkiln.workflows.recipe import PATH_KEYS, Recipe, line_in

OBJECTIVES = ("accuracy_drop", "latency_ms", "size_mb")
SAMPLERS = ("tpe", "nsga2", "random")


PRUNERS = ("gate", "none")


@dataclasses.dataclass(frozen=True)
class Dimension:
    key: str
    kind: str  # "range", "choice" or "optional"
    low: float = 0.0
    high: float = 0.0
    integer: bool = False
    choices: tuple[Any, ...] = ()
    backends: tuple[str, ...] = ()  # for backend.<option>: the backends that declare it


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    trials: int
    objectives: tuple[str, ...]
    sampler: str
    seed: int
    space: tuple[Dimension, ...]
    pruner: str = "gate"


def settings(recipe: Recipe) -> TuneSettings:
    """The checked ``[tune]`` table; a ConfigError names the file:line and the key at fault."""
    try:
        return _settings(recipe)
    except ConfigError as exc:
        line = _line(recipe, exc.where or "")
        if line is None:
            raise
        raise ConfigError(f"{recipe.path}:{line}: {exc.message}", where=exc.where, hint=exc.hint) from None


def _line(recipe: Recipe, where: str) -> int | None:
    """The line of ``tune.<key>`` or ``tune.space.<key>`` in the recipe."""
    if not where.startswith("tune."):
        return None
    return line_in(recipe.path, "tune", where.removeprefix("tune.").removeprefix("space."))


def _settings(recipe: Recipe) -> TuneSettings:
    table = recipe.tune
    if table is None:
        raise ConfigError(f"{recipe.path} has no [tune] table", where="tune", hint="see `kiln tune --help`")
    if table["trials"] < 1:
        raise ConfigError(f"[tune] trials must be >= 1, got {table['trials']}", where="tune.trials")
    default = ["accuracy_drop", "size_mb"] if recipe.evaluation is not None else ["size_mb", "latency_ms"]
    objectives = tuple(table.get("objectives", default))
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ConfigError(f"[tune] objectives: unknown {bad or '(none)'}", where="tune.objectives",
                          hint=f"choose from {', '.join(OBJECTIVES)}")  # fmt: skip
    if "accuracy_drop" in objectives and recipe.evaluation is None:
        raise ConfigError("[tune] objective accuracy_drop needs an [evaluation] table", where="tune.objectives")
    sampler = table.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise ConfigError(f"[tune] sampler '{sampler}'", where="tune.sampler", hint=f"one of {', '.join(SAMPLERS)}")
    pruner = table.get("pruner", "gate")
    if pruner not in PRUNERS:
        raise ConfigError(f"[tune] pruner '{pruner}'", where="tune.pruner", hint=f"one of {', '.join(PRUNERS)}")
    space = tuple(_dimension(recipe, key, value) for key, value in table["space"].items())
    if not space:
        raise ConfigError("[tune] space is empty", where="tune.space", hint='e.g. space = { "prune.ratio" = [0.0, 0.7] }')
    for dim in space:
        _check_values(recipe, dim, space)
    seed = table.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"[tune] seed must be an integer in [0, 2**32), got {seed!r}", where="tune.seed")
    return TuneSettings(table["trials"], objectives, sampler, seed, space, pruner)


def _dimension(recipe: Recipe, key: str, value: Any) -> Dimension:
    where = f"tune.space.{key}"
    if isinstance(value, dict):
        first = next(iter(value), "option")
        raise ConfigError(f"[tune] space key '{key}' is a table: TOML split an unquoted dotted key", where=where,
                          hint=f'quote it: "{key}.{first}" = ...')  # fmt: skip
    names = [name for name, _ in recipe.passes]
    pass_name, _, option = key.partition(".")
    if key == "backend":
        choices = value if isinstance(value, list) else []
        bad = [c for c in choices if c not in (*BACKEND_NAMES, "auto")]
        if not choices or bad:
            raise ConfigError(f"[tune] space.backend must list backends, got {value!r}", where=where,
                              hint=f"from {', '.join(BACKEND_NAMES)}, auto")  # fmt: skip
        return Dimension(key, "choice", choices=tuple(choices))
    if pass_name == "backend":
        return _backend_option(recipe, key, option, value)
    if pass_name not in names:
        raise ConfigError(f"[tune] space key '{key}': no pass '{pass_name}' in the recipe's [[passes]]", where=where,
                          hint=f"passes: {', '.join(names)}")  # fmt: skip
    if not option:
        if value != "optional":
            raise ConfigError(f"[tune] space key '{key}' must be \"optional\" (the pass may be dropped)", where=where)
        return Dimension(key, "optional")
    declared = {f.name for f in dataclasses.fields(get_pass(pass_name).Config)}
    if option not in declared:
        raise ConfigError(f"[tune] space key '{key}': pass {pass_name} has no option '{option}'", where=where,
                          hint=f"its options: {', '.join(sorted(declared))}")  # fmt: skip
    return _values(key, value)


def _values(key: str, value: Any, backends: tuple[str, ...] = ()) -> Dimension:
    where = f"tune.space.{key}"
    if isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value):
        low, high = value
        if not low < high:
            raise ConfigError(f"[tune] space key '{key}': range [{low}, {high}] is empty", where=where)
        return Dimension(key, "range", float(low), float(high), all(isinstance(v, int) for v in value), backends=backends)
    if isinstance(value, list) and value and all(isinstance(v, (str, bool)) for v in value):
        return Dimension(key, "choice", choices=tuple(value), backends=backends)
    raise ConfigError(f"[tune] space key '{key}': give [low, high] or a list of choices, got {value!r}", where=where)


def _backend_option(recipe: Recipe, key: str, option: str, value: Any) -> Dimension:
    """``backend.<option>``: an option of the backends the search may pick (``auto`` declares none)."""
    from torchkiln.backends import get_backend

    chosen = (recipe.tune or {}).get("space", {}).get("backend")
    candidates = [b for b in (chosen if isinstance(chosen, list) else [recipe.backend]) if b in BACKEND_NAMES]
    declaring = tuple(b for b in candidates if option in {f.name for f in dataclasses.fields(get_backend(b).Options)})
    if not declaring:
        raise ConfigError(f"[tune] space key '{key}': no backend the search may pick ({', '.join(candidates) or 'none'})"
                          f" has an option '{option}'", where=f"tune.space.{key}",
                          hint="see `kiln export --help` for each backend's options")  # fmt: skip
    return _values(key, value, declaring)


def _check_values(recipe: Recipe, dim: Dimension, space: tuple[Dimension, ...]) -> None:
    """Every value a dimension lists (a choice, each end of a range) must be valid for its pass or
    backend beside some values of the pass's other searched options: one that never is (a typo, a
    range outside the option's limits) would silently drop out of the search — sampling skips
    options that do not apply."""
    owner, _, option = dim.key.partition(".")
    if dim.kind == "optional" or not option:
        return
    configs: list[tuple[Any, dict[str, Any]]]
    if owner == "backend":
        from torchkiln.backends import get_backend

        configs = [(get_backend(b).Options, dict(recipe.backend_options) if b == recipe.backend else {}) for b in dim.backends]
    else:
        configs = [(get_pass(owner).Config, dict(dict(recipe.passes)[owner]))]
    siblings = [d for d in space if d is not dim and d.key.partition(".")[0] == owner and d.key.partition(".")[2]]
    contexts = list(itertools.islice(itertools.product(*[_candidates(d) for d in siblings]), 256))
    for value in _candidates(dim):
        errors = []
        for config, base in configs:
            for combo in contexts:
                beside = {d.key.partition(".")[2]: v for d, v in zip(siblings, combo)}
                try:
                    config.from_mapping({**base, **beside, option: value}, owner=owner)
                    break
                except ConfigError as exc:
                    errors.append(exc.message)
            else:
                continue
            break
        else:
            raise ConfigError(f"[tune] space key '{dim.key}': {value!r} is never a valid value ({errors[0]})",
                              where=f"tune.space.{dim.key}", hint="fix the value or the range")  # fmt: skip


def _candidates(dim: Dimension) -> list[Any]:
    if dim.kind == "range":
        return [int(dim.low), int(dim.high)] if dim.integer else [dim.low, dim.high]
    return list(dim.choices)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sample(trial: Any, space: tuple[Dimension, ...], recipe: Recipe) -> dict[str, Any]:
    """The trial's options: whether optional passes run and the backend first, then, in the order
    the space lists them, only the options that apply — of a pass that runs, of the chosen backend,
    and valid with the pass's options so far (``quantize.calibrator`` is not sampled once
    ``quantize.mode`` is fp16); options that do not apply are not sampled, so they do not dilute
    the search."""
    params: dict[str, Any] = {}
    for dim in space:
        if dim.kind == "optional" or dim.key == "backend":
            params[dim.key] = trial.suggest_categorical(dim.key, [True, False] if dim.kind == "optional" else list(dim.choices))
    base = {name: dict(options) for name, options in recipe.passes}
    for dim in space:
        owner, _, option = dim.key.partition(".")
        if dim.key in params or params.get(owner) is False:
            continue
        if dim.backends and params.get("backend", recipe.backend) not in dim.backends:
            continue
        if owner != "backend":
            so_far = {**base[owner], **{k.partition(".")[2]: v for k, v in params.items() if k.startswith(owner + ".")}}
            if not _applies(owner, so_far, option, dim):
                continue
        if dim.kind == "range":
            suggest = trial.suggest_int if dim.integer else trial.suggest_float
            params[dim.key] = suggest(dim.key, int(dim.low) if dim.integer else dim.low,
                                      int(dim.high) if dim.integer else dim.high)  # fmt: skip
        else:
            params[dim.key] = trial.suggest_categorical(dim.key, list(dim.choices))
    return params


def _applies(pass_name: str, options: Mapping[str, Any], option: str, dim: Dimension) -> bool:
    """Whether every value ``dim`` may take is valid for the pass beside ``options``."""
    values = dim.choices if dim.kind == "choice" else (dim.low, dim.high)
    config = get_pass(pass_name).Config
    for value in values:
        try:
            config.from_mapping({**options, option: int(value) if dim.integer else value}, owner=pass_name)
        except ConfigError:
            return False
    return True


def variant(recipe: Recipe, params: Mapping[str, Any]) -> Recipe:
    """The recipe with ``params`` applied (passes dropped or given options, the backend)."""
    passes = []
    for name, options in recipe.passes:
        if params.get(name) is False:
            continue
        chosen = {k.partition(".")[2]: v for k, v in params.items() if k.startswith(name + ".")}
        passes.append((name, {**dict(options), **chosen}))
    raw = copy.deepcopy(dict(recipe.raw))
    raw.pop("tune", None)
    raw["passes"] = [{"name": n, **({"options": o} if o else {})} for n, o in passes]
    backend = params.get("backend", recipe.backend)
    options = {**(dict(recipe.backend_options) if backend == recipe.backend else {}),
               **{k.partition(".")[2]: v for k, v in params.items() if k.startswith("backend.")}}  # fmt: skip
    raw["backend"] = {"name": backend, **({"options": options} if options else {})}
    return dataclasses.replace(recipe, passes=tuple(passes), backend=backend, backend_options=options, raw=raw,
                               tune=None)  # fmt: skip


def proxy(recipe: Recipe) -> Recipe | None:
    """The cheap proxy of a trial's recipe: its passes up to the first lossy one, on the torch
    backend; None when it would be the whole build, when no pass is lossy, or when ``distill``
    follows that pass (and may win accuracy back, so the proxy bounds nothing)."""
    names = [name for name, _ in recipe.passes]
    lossy = [i for i, name in enumerate(names) if not get_pass(name).lossless]
    if not lossy or "distill" in names[lossy[0] + 1 :]:
        return None
    cut = lossy[0] + 1
    if cut == len(names) and recipe.backend == "torch":
        return None
    raw = copy.deepcopy(dict(recipe.raw))
    raw["passes"] = raw["passes"][:cut]
    raw["backend"] = {"name": "torch"}
    return dataclasses.replace(recipe, passes=recipe.passes[:cut], backend="torch", backend_options={}, raw=raw,
                               gate={k: v for k, v in recipe.gate.items() if k == "max_accuracy_drop"})  # fmt: skip


def study_name(recipe: Recipe) -> str:
    """The same recipe and search give the same study, so a rerun resumes it — also with a larger
    ``trials`` budget, which is not part of the name."""
    raw = copy.deepcopy(dict(recipe.raw))
    raw.get("tune", {}).pop("trials", None)
    return "kiln-tune-" + hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def storage_url(recipe: Recipe, given: str | None) -> str:
    return given or f"sqlite:///{(recipe.path.parent / 'tune.db').resolve()}"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("kiln tune needs Optuna", hint="pip install 'torchkiln[tune]'") from None
    return optuna


def run_study(
    recipe: Recipe, tune: TuneSettings, storage: str, evaluate: Callable[[Recipe], dict[str, Any]],
    say: Callable[[str], None], timeout: float | None = None, tick: Callable[[int], None] | None = None,
    grace_period: int = 30,
) -> Any:  # fmt: skip
    """Trials until the study holds ``tune.trials`` counted ones — distinct builds: finished,
    pruned, running, or failed with an error of their own — or ``timeout`` seconds have passed;
    the study. ``tick(n)`` hears the count after each trial.

    A fresh study first runs the recipe as written, then the variants :func:`warm_start` queues
    (:func:`best` never returns less than the recipe as written). A proposal whose options a
    finished trial (or an earlier running one) already has is not built and not counted: the
    sampler is asked again, up to :data:`MAX_REPEATS` times in a row. Each trial's sampler is
    seeded from the recipe's seed and the trial's number, so a search is reproducible, a resumed
    one included, and workers propose different options. A running trial of a process on this
    host that no longer exists (a killed run) is failed at once; another host's after
    ``grace_period`` seconds without a heartbeat."""
    optuna = _optuna()

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported below, with its error
    rdb = _storage(storage, grace_period)
    with storage_errors(storage):
        study = optuna.create_study(study_name=study_name(recipe), storage=rdb, load_if_exists=True,
                                    directions=["minimize"] * len(tune.objectives))  # fmt: skip
        killed = _fail_killed(study)
        queued = warm_start(study, recipe, tune)
    gate = recipe.gate.get("max_accuracy_drop") if tune.pruner == "gate" else None
    import sqlalchemy.engine

    shown = sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)  # logs never carry it
    say(f"study {study.study_name} in {shown}: {_counted(study)} of {tune.trials} trials"
        + (f"; failed {killed} trial(s) of a killed run" if killed else "")
        + (f"; starting from the recipe and {queued - 1} variant(s) of it" if queued else ""))  # fmt: skip

    def objective(trial: Any) -> tuple[float, ...]:
        trial.set_user_attr("worker", _WORKER)
        params = sample(trial, tune.space, recipe)
        say(f"trial {trial.number}: {json.dumps(params, sort_keys=True)}")
        twin = _twin(study, trial)
        if twin is not None:  # neither built nor counted: the sampler is asked again
            trial.set_user_attr("same_as", twin.number)
            raise Repeat(f"the options of trial {twin.number}")
        candidate = variant(recipe, params)
        try:
            cheap = proxy(candidate) if gate is not None else None
            if cheap is not None:
                drop = evaluate(cheap)["accuracy_drop"]
                trial.set_user_attr("proxy", {"passes": [n for n, _ in cheap.passes], "accuracy_drop": drop})
                if drop > gate:
                    why = f"pruned: accuracy drop {drop:.4g} after {cheap.passes[-1][0]} already misses the gate {gate:g}"
                    trial.set_user_attr("metrics", {"pruned": why})
                    raise optuna.TrialPruned(why)
            metrics = evaluate(candidate)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # a failed trial, counted against the budget with its error
            message = exc.message if isinstance(exc, KilnError) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("metrics", {"error": (message.strip() or type(exc).__name__).splitlines()[0]})
            raise
        trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if k != "constraints"})
        trial.set_user_attr("constraints", dict(metrics["constraints"]))
        for name, excess in metrics["constraints"].items():
            trial.set_constraint(name, float(excess))
        values = tuple(float(metrics[o]) if metrics[o] is not None else math.nan for o in tune.objectives)
        unmeasured = [o for o, v in zip(tune.objectives, values) if not math.isfinite(v)]
        if unmeasured:  # Optuna would fail the trial without a word, and the budget would not count it
            error = f"objective {', '.join(unmeasured)} was not measured (not a finite number)"
            trial.set_user_attr("metrics", {**trial.user_attrs["metrics"], "error": error})
            raise KilnError(error)
        return values

    started, repeats, repeated = time.monotonic(), 0, False
    with storage_errors(storage):
        while True:
            if timeout is not None and time.monotonic() - started >= timeout:
                say(f"stopping: --timeout {timeout:g} s reached with {_counted(study)} of {tune.trials} trials")
                break
            if _counted(study) < tune.trials:
                # after a repeat, ask a random sampler: TPE proposes its favourite again
                study.sampler = _sampler(tune, len(study.get_trials(deepcopy=False)), random=repeated)
                study.optimize(objective, n_trials=1, catch=(Exception,))
                mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == _WORKER]
                repeated = bool(mine) and "same_as" in mine[-1].user_attrs
                if repeated:
                    twin = study.trials[mine[-1].user_attrs["same_as"]]
                    if twin.state == optuna.trial.TrialState.RUNNING:  # another worker builds it: not a sign
                        time.sleep(0.5)  # the space is exhausted; give it time
                        _fail_stale(study)  # (or fail it, if its worker was killed)
                        continue
                    repeats += 1
                    say(f"trial {mine[-1].number}: the options of trial {twin.number}: "
                        f"not built, not counted; asking the sampler again ({repeats}/{MAX_REPEATS})")  # fmt: skip
                    if repeats >= MAX_REPEATS:
                        say(f"stopping: the sampler proposed only options already built, {MAX_REPEATS} times in a "
                            f"row ({_counted(study)} of {tune.trials} trials; the space may be exhausted)")  # fmt: skip
                        break
                    continue
                repeats = 0
                if mine:
                    say(f"trial {mine[-1].number} [{_counted(study)}/{tune.trials}]: " + _outcome(mine[-1], tune))
                if tick is not None:
                    tick(_counted(study))
            elif study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                time.sleep(0.5)  # the budget is spoken for: wait for the other workers' trials (a killed
                _fail_stale(study)  # worker's fail after the grace period and are redone)
            else:
                break
    return study


MAX_REPEATS = 25
_WORKER = f"{os.uname().nodename}:{os.getpid()}"


class Repeat(Exception):
    """A proposal with the options of a trial already built (or being built by an earlier trial)."""


def _sampler(tune: TuneSettings, number: int, random: bool = False) -> Any:
    """The sampler for trial ``number``: seeded from the recipe's seed and the number alone (not
    the host, the process or how many runs the search took)."""
    import optuna

    seed = zlib.crc32(f"{tune.seed}:{number}".encode())
    if random:
        return optuna.samplers.RandomSampler(seed=seed)
    return {  # constraints (the gates) come from trial.set_constraint, which these samplers read
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }[tune.sampler]()


def base_params(recipe: Recipe, space: tuple[Dimension, ...]) -> dict[str, Any]:
    """The options of the recipe as written, in the space's terms (a value outside the space is
    left to the sampler)."""
    params: dict[str, Any] = {}
    written = {name: dict(options) for name, options in recipe.passes}
    for dim in space:
        owner, _, option = dim.key.partition(".")
        if dim.kind == "optional":
            params[dim.key] = True
            continue
        if dim.key == "backend":
            value: Any = recipe.backend
        elif owner == "backend":
            value = recipe.backend_options.get(option)
        else:
            value = written[owner].get(option, _default(owner, written[owner], option))
        inside = value in dim.choices if dim.kind == "choice" else _number(value) and dim.low <= value <= dim.high
        if inside and value is not None:
            params[dim.key] = int(value) if dim.integer else value
    return params


def _default(pass_name: str, options: Mapping[str, Any], option: str) -> Any:
    try:
        return getattr(get_pass(pass_name).Config.from_mapping(options, owner=pass_name), option, None)
    except ConfigError:
        return None


def warm_start(study: Any, recipe: Recipe, tune: TuneSettings) -> int:
    """On a fresh study, queue the recipe as written, then each optional pass alone (the other
    optional passes dropped: the single-pass recipes people write by hand), then the recipe without
    each optional pass — distinct option sets, at most half the budget; how many were queued."""
    if study.get_trials(deepcopy=False):
        return 0
    base = base_params(recipe, tune.space)
    optional = [d.key for d in tune.space if d.kind == "optional"]
    queue = [(base, "recipe")]
    queue += [({**base, **{k: k == key for k in optional}}, f"recipe with {key} alone") for key in optional]
    queue += [({**base, key: False}, f"recipe without {key}") for key in optional]
    distinct: dict[str, tuple[dict[str, Any], str]] = {}
    for params, role in queue:
        distinct.setdefault(json.dumps(params, sort_keys=True), (params, role))
    chosen = list(distinct.values())[: max(1, (tune.trials + 1) // 2)]
    for params, role in chosen:
        study.enqueue_trial(params, user_attrs={"warm_start": role}, skip_if_exists=True)
    return len(chosen)


def _counted(study: Any) -> int:
    """Trials the budget counts: complete, pruned, running, or failed with an error of their own
    (a killed worker's trial, failed by the heartbeat, has none and is not counted)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               or (t.state == TrialState.FAIL and "error" in t.user_attrs.get("metrics", {})))  # fmt: skip


def _outcome(trial: Any, tune: TuneSettings) -> str:
    metrics = trial.user_attrs.get("metrics", {})
    if trial.state.name == "COMPLETE":
        met = all(v <= 0 for v in trial.user_attrs.get("constraints", {}).values())
        return ", ".join(f"{o} {metrics[o]:.4g}" for o in tune.objectives) + ("" if met else " (misses a gate)")
    if trial.state.name == "PRUNED":
        return metrics.get("pruned", "pruned")
    return "failed: " + metrics.get("error", "see trials.csv")



def _twin(study: Any, trial: Any) -> Any:
    """A trial with ``trial``'s options that is finished (complete or pruned), or running with an
    earlier number (two workers proposing the same options at once: the earlier one builds), or None."""
    import optuna

    state = optuna.trial.TrialState
    for other in study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.RUNNING)):
        if other.number != trial.number and other.params == trial.params and "same_as" not in other.user_attrs:
            if other.state != state.RUNNING or other.number < trial.number:
                return other
    return None


def _fail_killed(study: Any) -> int:
    """Fail the running trials of processes on this host that no longer exist (a run killed with
    its trial in flight: resuming must not wait for a heartbeat or take it for a live worker)."""
    import optuna

    host, failed = os.uname().nodename, 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        name, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if name == host and pid.isdigit() and not _alive(int(pid)):
            try:
                study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
                failed += 1
            except RuntimeError:  # it finished meanwhile (UpdateFinishedTrialError)
                pass
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_stale(study: Any) -> None:
    """Optuna's heartbeat check: running trials without a beat for the grace period become FAIL."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


SQLITE_HEADER = b"SQLite format 3\x00"


def check_storage(url: str) -> str:
    """The storage URL, checked before any work; the URL as logs show it (password hidden). A
    malformed URL, a study file that is not an SQLite database, a directory that does not exist is
    a ConfigError saying so (an internal error before)."""
    import sqlalchemy.engine
    import sqlalchemy.exc

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise ConfigError(f"--storage {url!r} is not a database URL: {exc}", where="--storage",
                          hint="e.g. sqlite:///tune.db or postgresql://user@host/db") from None  # fmt: skip
    shown = parsed.render_as_string(hide_password=True)
    _check_driver(parsed, shown)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if not path.parent.is_dir():
            raise ConfigError(f"the study's directory {path.parent} does not exist", where=shown)
        if path.exists():
            with open(path, "rb") as handle:
                header = handle.read(len(SQLITE_HEADER)) if path.is_file() else b"?"
            if header not in (b"", SQLITE_HEADER):
                raise ConfigError(f"{path} is not an SQLite database, so it cannot hold the study", where=shown,
                                  hint="name another file with --storage sqlite:///PATH")  # fmt: skip
    return shown


def _check_driver(parsed: Any, shown: str) -> None:
    """The URL's database is known and its Python driver imports (else: which package to install)."""
    import sqlalchemy.exc

    try:
        dialect = parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise ConfigError(f"--storage {shown}: no database called {parsed.drivername!r}", where="--storage",
                          hint="e.g. sqlite:///tune.db, postgresql://user@host/db or mysql+pymysql://user@host/db") from None  # fmt: skip
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        package = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}.get(
            exc.name or "", exc.name or dialect.driver)
        raise ConfigError(f"--storage {shown}: the {parsed.get_backend_name()} driver {dialect.driver!r} is not installed",
                          where="--storage", hint=f"pip install '{package}' (or name another driver, e.g. "
                          f"{parsed.get_backend_name()}+<driver>://...)") from None  # fmt: skip


def _storage(url: str, grace_period: int = 30) -> Any:
    """The RDB storage; workers starting together on a new SQLite file race to create its tables,
    so a loser retries (only that race: an unreachable server or a refused password fails at once,
    a ConfigError). A heartbeat marks a killed worker's running trials failed after
    ``grace_period`` seconds without one."""
    import warnings

    import optuna
    import sqlalchemy.exc

    shown = check_storage(url)
    for attempt in range(10):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=max(1, grace_period // 3),
                                                  grace_period=grace_period)
        except sqlalchemy.exc.DBAPIError as exc:  # "table exists", a duplicate schema-version row: another worker won
            if attempt == 9 or not (url.startswith("sqlite") and _schema_race(exc)):
                raise _storage_error(shown, exc) from None
            time.sleep(0.2 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
            raise _storage_error(shown, exc) from None
    raise AssertionError("unreachable")


def _schema_race(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(sign in text for sign in ("already exists", "unique constraint", "database is locked"))


def _storage_error(shown: str, exc: Exception, doing: str = "open") -> StorageError:
    first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
    return StorageError(f"cannot {doing} the study storage {shown}: {first}", where="--storage",
                        hint="check the URL, the server, the user and password (or the database driver is installed)")  # fmt: skip


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A database failure while the search runs (the server went away, a lock timed out) as a
    StorageError naming the storage, not an internal error; finished trials stay in the study."""
    import sqlalchemy.exc

    try:
        yield
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise _storage_error(check_storage(url), exc, "use") from None


def rows(study: Any, tune: TuneSettings) -> list[dict[str, Any]]:
    """Every trial started: number, state, params, metrics, feasible (a repeat proposal: ``same_as``)."""
    out = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name == "WAITING":  # queued by the warm start, never run
            continue
        metrics = trial.user_attrs.get("metrics", {})
        out.append({"number": trial.number, "state": trial.state.name, "params": trial.params,
                    **{k: metrics.get(k) for k in OBJECTIVES}, "error": metrics.get("error"), "pruned": metrics.get("pruned"),
                    "proxy_accuracy_drop": trial.user_attrs.get("proxy", {}).get("accuracy_drop"),
                    "same_as": trial.user_attrs.get("same_as"), "warm_start": trial.user_attrs.get("warm_start"),
                    "feasible": "constraints" in trial.user_attrs
                    and all(v <= 0 for v in trial.user_attrs["constraints"].values())})  # fmt: skip
    return out


#: how far apart two measurements of an objective must be to differ: latency is timed on a machine
#: whose timings drift (5% is within one run's spread here); size and accuracy are exact
TIES = {"latency_ms": 0.05, "size_mb": 0.0, "accuracy_drop": 0.0}


def best(study: Any, tune: TuneSettings, table: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Among feasible complete trials on the Pareto front: the lowest first objective, then the next
    — values within :data:`TIES` of the lowest are a tie (a trial 0.7% faster by the clock but 3x
    larger is not the better one) — and, when the recipe as written was a feasible trial (warm
    start), only among those no worse than it on every objective, so the search never hands back
    less than the hand-written recipe."""
    front = {t.number for t in study.best_trials}
    feasible = [r for r in table if r["state"] == "COMPLETE" and r["feasible"]]
    pareto = [r for r in feasible if r["number"] in front] or feasible
    written = next((r for r in feasible if r.get("warm_start") == "recipe"), None)
    if written is not None:
        pareto = [r for r in pareto if all(r[o] <= written[o] for o in tune.objectives)] or [written]
    for objective in tune.objectives:
        if len(pareto) > 1:
            lowest = min(r[objective] for r in pareto)
            pareto = [r for r in pareto if r[objective] <= lowest * (1 + TIES[objective]) + 1e-12]
    return min(pareto, key=lambda r: tuple(r[o] for o in tune.objectives)) if pareto else None


def csv_text(table: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", "feasible", *OBJECTIVES, "proxy_accuracy_drop", "params", "error", "pruned"])
    for r in table:
        writer.writerow([r["number"], r["state"], r["feasible"], *(r[k] for k in OBJECTIVES), r["proxy_accuracy_drop"],
                         json.dumps(r["params"], sort_keys=True), r["error"] or "", r["pruned"] or ""])  # fmt: skip
    return buffer.getvalue()


def toml_text(data: Mapping[str, Any]) -> str:
    """TOML for a recipe dict (tables, arrays of tables, inline tables, scalars and arrays)."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += ["", f"[[{key}]]"] + [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        else:
            lines.insert(0, f"{key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ConfigError(f"cannot write {type(value).__name__} to TOML", where="best.toml")


def relocated(raw: Mapping[str, Any], recipe_dir: Path, target_dir: Path) -> dict[str, Any]:
    """``raw`` with the recipe's relative file references rewritten for a file in ``target_dir``."""
    data = copy.deepcopy(dict(raw))

    def move(text: str) -> str:
        path, sep, rest = text.partition(":") if ".py:" in text else (text, "", "")
        candidate = recipe_dir / path
        if Path(path).is_absolute() or not candidate.exists():
            return text
        return os.path.relpath(candidate, target_dir) + sep + rest

    for table, key in PATH_KEYS:
        if isinstance(data.get(table), dict) and isinstance(data[table].get(key), str):
            data[table][key] = move(data[table][key])
    return data
