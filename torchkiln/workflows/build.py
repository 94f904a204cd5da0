"""``torchkiln.build(recipe)``: the artifact a ``kiln.toml`` recipe describes, built and checked
against its gates (``kiln build`` is this function with arguments parsed and the report printed).

Writes, atomically into ``output`` (default: ``build/`` next to the recipe): the backend files,
``manifest.json`` (file hashes, tool versions, specs, the recipe, hashes of what was read, the
evaluation and gate results), ``report.json``, ``report.md`` and ``accuracy.png`` (accuracy vs size
and latency, with matplotlib and an [evaluation]). When the build fails or a gate is missed
(:class:`~torchkiln.errors.GateError`), ``output`` is left as it was.

Stages are cached (see ``torchkiln.driver.cache``): an unchanged rebuild reuses the artifact, a
change of backend options reuses the traced, calibrated graph; the report's ``cache`` line says
which stages were hits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchkiln
from torchkiln.compiler import arguments
from torchkiln.compiler.calibration import take, tqdm_progress
from torchkiln.compiler.files import atomic_directory, check_destination, sha256, write_atomic
from torchkiln.compiler.graph import parameter_stats
from torchkiln.compiler.program import dtype_from_name
from torchkiln.compiler.ranks import join_process_group
from torchkiln.compiler.report import WIDTH
from torchkiln.compiler.verify import Tolerance
from torchkiln.driver.cache import Hasher, default_directory, model_fingerprint
from torchkiln.driver.partition import Partition, partition
from torchkiln.errors import ConfigError, GateError
from torchkiln.passes.distill import first_output, split_batch
from torchkiln.workflows.data import load_batches
from torchkiln.workflows.loading import load_callable, load_model, load_weights
from torchkiln.workflows.plots import accuracy_plot
from torchkiln.workflows.recipe import Recipe, load_recipe

PLOT_FILE = "accuracy.png"


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What :func:`build` made: the compiled model, its evaluation and gate results, the report
    written as ``report.json``, and where the artifact (and a ``[partition]``'s stages) went.
    ``output`` is None on a torchrun rank other than 0 (rank 0 writes)."""

    compiled: Any
    evaluation: dict[str, Any]
    gates: list[dict[str, Any]]
    report: dict[str, Any]
    output: Path | None
    partition: Path | None = None

    def summary(self, width: int | None = WIDTH) -> str:
        """The report table and the evaluation and gate lines ``kiln build`` prints."""
        return "\n".join([self.compiled.report.table(width), *_summary(self.evaluation, self.gates)])


def build(
    recipe: str | Path | Recipe,
    output: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build the artifact ``recipe`` (a ``kiln.toml`` path or a loaded :class:`Recipe`) describes.

    ``output`` defaults to ``build/`` next to the recipe; a ``[partition]`` table also writes
    ``<output>.partition/``. Every destination is checked before any work (a directory that is not
    an artifact is never replaced). The stage cache lives in ``cache_dir`` (default
    ``$TORCHKILN_CACHE_DIR`` or ``~/.cache/torchkiln``); ``use_cache=False`` neither reads nor
    writes it. ``progress`` receives a line per stage (``kiln build`` prints them on stderr).

    Raises ConfigError for a malformed recipe, GateError when a gate is missed (nothing written),
    and the compile errors (TraceError, PassError, VerificationError, ...) of the build itself.
    """
    arguments.path("output", output, optional=True)
    arguments.path("cache_dir", cache_dir, optional=True)
    arguments.flag("use_cache", use_cache)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(arguments.path("recipe", recipe))
    output = Path(output) if output else recipe.path.parent / "build"
    stages_to = output.parent / f"{output.name}.partition" if recipe.partition is not None else None
    reads = recipe.files()  # a destination holding the recipe or its model, weights or data is refused
    check_destination(output, "artifact", reads)  # every destination before the work, not after it
    if stages_to is not None:
        check_destination(stages_to, "partition", reads)
    say = progress or (lambda _: None)
    data = prepare(recipe, say)
    model, inputs, axes, calibration = data.model, data.inputs, data.axes, data.calibration
    compiled, evaluation, gates, _ = build_and_check(
        recipe, data, (cache_dir or default_directory()) if use_cache else None, progress,
        measure_size="max_size_mb" in recipe.gate,  # the build writes the artifact next: measure only for a gate
    )  # fmt: skip
    missed = [g for g in gates if not g["passed"]]
    if missed:
        summary = "; ".join(f"{g['gate']}: {g['value']:.4g} (limit {g['limit']:.4g})" for g in missed)
        raise GateError(
            f"{len(missed)} gate(s) missed: {summary}",
            where=str(recipe.path),
            hint=f"{output} was not changed",
        )
    # every rank takes part in the partition's data-parallel calibration; then rank 0 writes
    part = _partition(recipe, model, inputs, axes, calibration, say) if stages_to is not None else None
    extra = {"recipe": recipe.raw, "input_hashes": _input_hashes(recipe, data),
             "evaluation": evaluation, "gates": gates}  # fmt: skip
    if join_process_group()[0] != 0:
        report = {**compiled.report.to_dict(), "evaluation": evaluation, "gates": gates}
        return BuildResult(compiled, evaluation, gates, report, None)
    with contextlib.ExitStack() as writes:  # both written in full before either is swapped in
        staging = writes.enter_context(atomic_directory(output, "artifact"))
        compiled.write(staging, extra)
        plot = _plot(staging / PLOT_FILE, model, compiled, evaluation)
        report = {**compiled.report.to_dict(), "evaluation": evaluation, "gates": gates, "plot": plot}
        write_atomic(staging / "report.json", json.dumps(report, indent=2, default=str))
        write_atomic(staging / "report.md", _markdown(recipe, compiled, evaluation, gates, plot))
        if part is not None and stages_to is not None:
            part.write(writes.enter_context(atomic_directory(stages_to, "partition")))
    if stages_to is not None:
        say(f"wrote {stages_to}")
    return BuildResult(compiled, evaluation, gates, report, output, stages_to)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a recipe's build reads once: the model (weights loaded), example inputs, dynamic axes,
    calibration batches and the ``[training]`` batches (distill's train_data / val_data)."""

    model: nn.Module
    inputs: dict[str, torch.Tensor]
    axes: Any
    calibration: list[Any] | None
    training: list[Any] | None = None
    validation: list[Any] | None = None


def prepare(recipe: Recipe, say: Callable[[str], None] = lambda _: None) -> Prepared:
    """Read what the recipe names (model, weights, inputs, calibration / training / validation
    batches) once; every phase that can take long says so through ``say``."""
    model, inputs, axes = _model_and_inputs(recipe, say)
    calibration = _batches(recipe, recipe.calibration, inputs)
    if calibration:  # verify on real data: random inputs can lie far outside calibrated ranges
        inputs = _as_inputs(calibration[0], list(inputs))
    training = _batches(recipe, recipe.training, inputs)
    validation = recipe.training.get("validation") if recipe.training else None
    held_out = _batches(recipe, {"source": validation}, inputs) if validation else None
    return Prepared(model, inputs, axes, calibration, training, held_out)


def build_and_check(
    recipe: Recipe, data: Prepared, cache: Any, say: Callable[[str], None] | None, measure_size: bool = True
) -> tuple[Any, dict[str, Any], list[dict[str, Any]], dict[str, float | None]]:
    """Compile the recipe's passes and backend, evaluate, measure (:func:`measures`; the size only
    with ``measure_size``: it costs a save) and check the gates (nothing is written)."""
    compiled = torchkiln.compile(
        data.model, data.inputs, passes=[(name, dict(options)) for name, options in recipe.passes],
        backend=recipe.backend, backend_options=recipe.backend_options, dynamic_axes=data.axes,
        calibration_data=data.calibration, train_data=data.training, val_data=data.validation,
        tolerance=_tolerance(recipe), name=Path(recipe.model).stem, progress=say, latency_runs=50, cache=cache,
        kv_cache=recipe.kv_cache,
    )  # fmt: skip
    evaluation = _evaluate(recipe, data.model, compiled, data.inputs)
    measured = measures(compiled, evaluation, measure_size)
    return compiled, evaluation, _gates(recipe, measured), measured


def _partition(
    recipe: Recipe, model: nn.Module, inputs: dict[str, torch.Tensor], axes: Any, calibration: Any,
    say: Callable[[str], None] | None,
) -> Partition:  # fmt: skip
    """``[partition]``: the recipe's model and passes cut into stages, to be written beside the build
    as ``<build>.partition/`` (replacing only a partition)."""
    table = recipe.partition or {}
    if say:
        say(f"partitioning into {table['stages']} stages")
    lossy = any(name == "quantize" for name, _ in recipe.passes)
    part = partition(
        model, inputs, stages=int(table["stages"]), balance=table.get("balance", "latency"),
        backend=table.get("backend", recipe.backend), passes=[(n, dict(o)) for n, o in recipe.passes],
        dynamic_axes=axes, calibration_data=calibration,
        tolerance=Tolerance(min_cosine=0.99) if lossy else _tolerance(recipe), progress=say,
    )  # fmt: skip
    return part


def _input_hashes(recipe: Recipe, data: Prepared) -> dict[str, str]:
    """SHA-256 of what the build read: the recipe file, the model (weights and module sources),
    the weights file, the calibration and training batches."""
    hashes = {
        "recipe": hashlib.sha256(recipe.path.read_bytes()).hexdigest(),
        "model": model_fingerprint(data.model).hexdigest(),
    }
    if recipe.weights is not None:
        hashes["weights"] = sha256(recipe.resolve(str(recipe.weights)))
    for name in ("calibration", "training", "validation"):
        if batches := getattr(data, name):
            hashes[name] = Hasher().add_tensors(name, batches).hexdigest()
    return hashes


def _plot(path: Path, model: nn.Module, compiled: Any, evaluation: dict[str, Any]) -> str:
    """Accuracy vs size / latency of the eager model and the artifact; what was written or why not."""
    if not evaluation:
        return "no plot: the recipe has no [evaluation]"
    artifact = compiled.report.artifact
    eager_mb = parameter_stats(model)[1] / 1e6
    points = [
        ("eager", evaluation["eager"], eager_mb, artifact.eager_ms),
        (compiled.backend, evaluation["artifact"], (artifact.file_bytes or 0) / 1e6, artifact.artifact_ms),
    ]
    skipped = accuracy_plot(path, points, evaluation["metric"])
    return f"no plot: {skipped}" if skipped else path.name


def _model_and_inputs(
    recipe: Recipe, say: Callable[[str], None]
) -> tuple[nn.Module, dict[str, torch.Tensor], Any]:
    source = recipe.model
    if ".py:" in source and not Path(source.split(":")[0]).is_absolute():
        source = str(recipe.resolve(source.split(":")[0])) + ":" + source.split(":", 1)[1]
    say(f"loading the model {recipe.model}")  # a factory may train or download: minutes, not seconds
    start = time.perf_counter()
    model, entry = load_model(source)
    if recipe.weights is not None:
        load_weights(model, recipe.resolve(str(recipe.weights)), "model.weights")
    say(f"loaded the model in {time.perf_counter() - start:.1f} s")
    if recipe.inputs:
        generator = torch.Generator().manual_seed(0)
        inputs = {
            s.name: torch.randn(s.shape, generator=generator).to(dtype_from_name(s.dtype))
            if dtype_from_name(s.dtype).is_floating_point
            else torch.zeros(s.shape, dtype=dtype_from_name(s.dtype))
            for s in recipe.inputs
        }
        axes = {s.name: dict(s.dynamic) for s in recipe.inputs if s.dynamic} or None
        return model, inputs, axes
    if entry is None:
        raise ConfigError(
            f"{recipe.path}: [model] inputs is required for a model outside the zoo", where="model.inputs"
        )
    return model, entry.example_inputs(), entry.dynamic_axes


def _batches(recipe: Recipe, table: Any, inputs: dict[str, torch.Tensor]) -> list[Any] | None:
    if table is None:
        return None
    source = table["source"]
    batches: Iterable[Any]
    if source.endswith((".npz", ".pt")):
        batch = next(iter(inputs.values())).shape[0] if inputs else 1
        batches = load_batches(recipe.resolve(source), list(inputs), int(batch))
    else:
        batches = _call(recipe, source)  # a generator may be endless: only `batches` of it are read
    return take(batches, table.get("batches"), f"the batches of {source}", tqdm_progress)


def _as_inputs(batch: Any, names: list[str]) -> dict[str, torch.Tensor]:
    if isinstance(batch, dict):
        return dict(batch)
    values = batch if isinstance(batch, (tuple, list)) else (batch,)
    return dict(zip(names, values))


def _call(recipe: Recipe, source: str) -> Iterable[Any]:
    if ".py:" in source:
        source = str(recipe.resolve(source.split(":")[0])) + ":" + source.split(":", 1)[1]
    function = load_callable(source)
    try:
        return function()  # type: ignore[no-any-return]
    except Exception as exc:
        raise ConfigError(f"{source}() failed: {type(exc).__name__}: {exc}", where=source) from None


def _tolerance(recipe: Recipe) -> Tolerance | None:
    verify = recipe.verify
    if not verify:
        return None
    if "min_cosine" in verify:
        return Tolerance(min_cosine=verify["min_cosine"])
    return Tolerance(atol=verify.get("atol", 1e-5), rtol=verify.get("rtol", 1e-4))


def _evaluate(
    recipe: Recipe, model: nn.Module, compiled: Any, inputs: dict[str, torch.Tensor]
) -> dict[str, Any]:
    if recipe.evaluation is None:
        return {}
    batches = _batches(recipe, recipe.evaluation, inputs) or []
    metric = _metric(recipe.evaluation.get("metric", "top1"))
    eager = _score(lambda x: _call_model(model, x), batches, metric)
    artifact = _score(lambda x: _call_model(compiled, x), batches, metric)
    return {"metric": recipe.evaluation.get("metric", "top1"), "eager": eager, "artifact": artifact,
            "drop": eager - artifact, "batches": len(batches)}  # fmt: skip


def _call_model(model: Any, inputs: Any) -> Any:
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _metric(name: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    if name == "top1":
        return lambda logits, labels: 100.0 * float((logits.argmax(-1) == labels).float().mean())
    return load_callable(name, "metric")  # type: ignore[no-any-return]


def _score(predict: Callable[[Any], Any], batches: list[Any], metric: Callable[..., float]) -> float:
    """The metric over ``batches``, weighted by batch size. Under torchrun rank r scores batches r,
    r + W, … and the sums are all-reduced: every rank gets the single-process figure."""
    rank, world = join_process_group()
    total = count = 0.0
    for index, item in enumerate(batches):
        if index % world != rank:
            continue
        inputs, labels = split_batch(item)
        if labels is None:
            raise ConfigError(
                "[evaluation] batches must be (inputs, integer labels)", where="evaluation.source"
            )
        total += metric(first_output(predict(inputs)), labels) * len(labels)
        count += len(labels)
    if world > 1:
        import torch.distributed as dist

        sums = torch.tensor([total, count], dtype=torch.float64)
        dist.all_reduce(sums)
        total, count = float(sums[0]), float(sums[1])
    return total / count if count else float("nan")


def measures(compiled: Any, evaluation: dict[str, Any], size: bool = True) -> dict[str, float | None]:
    """What gates and search objectives compare, each measured here or None: the accuracy drop
    (needs an [evaluation]), the artifact's median latency, and its size — the bytes its save
    writes, on every backend (the torch backend's report has no file size)."""
    drop, latency = evaluation.get("drop"), compiled.report.artifact.artifact_ms
    return {
        "accuracy_drop": drop if drop is not None and math.isfinite(drop) else None,
        "latency_ms": latency if latency is not None and math.isfinite(latency) else None,
        "size_mb": compiled.saved_bytes() / 1e6 if size else None,
    }


_GATES = {"max_accuracy_drop": ("accuracy_drop", "needs an [evaluation] table whose metric is finite"),
          "max_latency_ms": ("latency_ms", "needs the artifact's latency, which was not measured"),
          "max_size_mb": ("size_mb", "needs the artifact's size")}  # fmt: skip


def _gates(recipe: Recipe, measured: dict[str, float | None]) -> list[dict[str, Any]]:
    gates = []
    for gate, limit in recipe.gate.items():
        key, why = _GATES[gate]
        value = measured[key]
        if value is None:
            raise ConfigError(f"{recipe.path}: [gate] {gate} {why}", where=f"gate.{gate}")
        gates.append({"gate": gate, "limit": limit, "value": value, "passed": bool(value <= limit)})
    return gates


def _summary(evaluation: dict[str, Any], gates: list[dict[str, Any]]) -> list[str]:
    lines = []
    if evaluation:
        lines.append(f"  evaluation ({evaluation['metric']}): eager {evaluation['eager']:.4g}, "
                     f"artifact {evaluation['artifact']:.4g}, drop {evaluation['drop']:.4g}")  # fmt: skip
    lines += [f"  gate {g['gate']}: {g['value']:.4g} <= {g['limit']:.4g}: passed" for g in gates]
    return lines


def _markdown(
    recipe: Recipe, compiled: Any, evaluation: dict[str, Any], gates: list[dict[str, Any]], plot: str
) -> str:
    lines = [f"# Build report: {recipe.path.name}", "", "```", compiled.report.table(None), "```", ""]
    lines += [line.strip() for line in _summary(evaluation, gates)]
    lines += ["", f"![{evaluation.get('metric')} vs size and latency]({plot})" if plot == PLOT_FILE else plot]
    return "\n".join(lines) + "\n"
