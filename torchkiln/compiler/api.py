"""``torchkiln.compile``: trace → passes → backend, verified against the eager model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchkiln.backends import Artifact, BackendOptions, get_backend
from torchkiln.backends import backend_options as backend_options_for
from torchkiln.compiler import graph as G
from torchkiln.compiler.calibration import CalibrationData, no_progress, tqdm_progress
from torchkiln.compiler.compiled import CompiledModel
from torchkiln.compiler.manager import PassManager, default_instruments
from torchkiln.compiler.passes import Pass, parse_pipeline
from torchkiln.compiler.program import Program
from torchkiln.compiler.report import ArtifactRecord, Report
from torchkiln.compiler.trace import DynamicAxes, trace
from torchkiln.compiler.verify import FP32, ErrorStats, Tolerance, compare
from torchkiln.errors import VerificationError

DEFAULT_PASSES = ("cleanup", "fold_batchnorm")


def compile(  # noqa: A001 - the public name users expect
    model: nn.Module,
    example_inputs: Any,
    passes: str | Iterable[str | Pass] = DEFAULT_PASSES,
    backend: str = "onnxruntime",
    backend_options: Mapping[str, Any] | BackendOptions | None = None,
    dynamic_axes: DynamicAxes = None,
    calibration_data: Iterable[Any] | None = None,
    train_data: Iterable[Any] | None = None,
    val_data: Iterable[Any] | None = None,
    verify: bool = True,
    tolerance: Tolerance | None = None,
    frontend: str = "auto",
    leaf_modules: Sequence[str] = (),
    latency_runs: int = 10,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompiledModel:
    """Compile ``model`` for ``example_inputs`` (a tensor, a tuple, or a dict of keyword tensors).

    ``passes`` is a pipeline string (``"cleanup,fold_batchnorm"``) or a list of specs / Pass
    objects. ``dynamic_axes`` is ``"batch"`` or ``{input: {axis: name}}``. ``calibration_data`` is
    an iterable of input batches (tensors, tuples or dicts) for passes that calibrate (``quantize``);
    ``train_data`` / ``val_data`` (batches of inputs or ``(inputs, labels)``) for ``distill``, which
    trains the rewritten graph toward ``model``.
    With ``verify`` every pass is checked against the eager model and the artifact must match it
    within ``tolerance`` — by default fp32 (:data:`FP32`), or what the pipeline's lossy passes
    promise (int8: cosine similarity) — else :class:`VerificationError`. ``latency_runs`` > 0 adds
    eager vs artifact latency (median) to the report. ``progress`` receives a line per stage; with
    it, long loops inside passes (calibration) show a progress bar on stderr.
    """
    say = progress or (lambda _: None)
    pipeline = parse_pipeline(passes)
    pass_tolerance = tolerance or FP32  # lossless passes; lossy ones check their own promise
    artifact_tolerance = tolerance or pipeline_tolerance(pipeline)
    options = backend_options_for(backend, backend_options)
    say("tracing")
    start = time.perf_counter()
    program = trace(
        model,
        example_inputs,
        frontend=frontend,
        dynamic_axes=dynamic_axes,
        leaf_modules=leaf_modules,
        name=name,
    )
    if calibration_data is not None:
        program.calibration = CalibrationData(calibration_data, program.inputs)
    program.training, program.validation, program.teacher = train_data, val_data, model
    program.progress = tqdm_progress if progress else no_progress
    report = Report(
        program.name, program.flavour, trace_seconds=time.perf_counter() - start, notes=list(program.notes)
    )
    report.passes = PassManager(
        pipeline, default_instruments(pass_tolerance, verify, progress, len(pipeline))
    ).run(program)
    report.params, report.param_bytes = G.parameter_stats(program.graph_module)

    say(f"lowering to {backend}")
    start = time.perf_counter()
    artifact = get_backend(backend).lower(program, options)
    record = ArtifactRecord(backend, seconds=time.perf_counter() - start, file_bytes=artifact.file_bytes())
    report.artifact = record
    say("verifying against the eager model")
    if artifact_tolerance is None:  # a lossy pass promised nothing about eager: check the lowering
        _verify_lowering(program, artifact, record, lowering_tolerance(pipeline), strict=verify)
    else:
        _verify(program, artifact, record, artifact_tolerance, strict=verify)
    if latency_runs > 0:
        _measure_latency(model, program, artifact, record, latency_runs)
    record.notes = artifact.notes()
    names = [p.spec for p in pipeline]
    return CompiledModel(artifact, program.inputs, program.outputs, program.out_spec, report, options, names)


def _verify(
    program: Program, artifact: Artifact, record: ArtifactRecord, tolerance: Tolerance, strict: bool
) -> None:
    worst = measure_error(program, artifact.run, tolerance)
    record.max_abs_error, record.max_rel_error, record.tolerance = (
        worst.max_abs,
        worst.max_rel,
        str(tolerance),
    )
    record.cosine = worst.cosine
    if strict and not worst.within():
        measured = (
            f"cosine similarity {worst.cosine:.5f}"
            if tolerance.min_cosine is not None
            else f"max abs error {worst.max_abs:.3e}, above the {worst.allowed:.3e} allowed"
        )
        raise VerificationError(
            f"the {record.backend} artifact differs from the eager model: output {worst.worst_output} has "
            f"{measured} by the tolerance ({tolerance})",
            hint="pass a looser `tolerance`, or verify=False to accept it; compare the backends to find the op",
        )


def _verify_lowering(
    program: Program, artifact: Artifact, record: ArtifactRecord, tolerance: Tolerance, strict: bool
) -> None:
    """Error against eager is reported; the artifact must match the rewritten graph within
    ``tolerance`` (fp32, or what the pipeline's other lossy passes promise, e.g. int8 rounding)."""
    worst = measure_error(program, artifact.run, FP32)
    record.max_abs_error, record.max_rel_error, record.cosine = worst.max_abs, worst.max_rel, worst.cosine
    record.tolerance = f"{tolerance} against the rewritten graph (a lossy pass promised no bound against eager)"
    for check in program.checks:
        stats = compare(artifact.run(check.inputs), program.run(check.inputs), tolerance)
        if strict and not stats.within():
            raise VerificationError(
                f"the {record.backend} artifact differs from the rewritten graph: output {stats.worst_output} "
                f"has max abs error {stats.max_abs:.3e}, cosine {stats.cosine:.5f} ({tolerance})",
                hint="this is a lowering bug; try another backend and report the model",
            )


def pipeline_tolerance(pipeline: Sequence[Pass]) -> Tolerance | None:
    """FP32 for lossless pipelines; else the loosest promise of the lossy passes (a cosine floor
    wins over absolute tolerances, which cannot describe int8 error). None when a lossy pass
    promises nothing (pruning before distillation): the artifact is then held to the rewritten graph."""
    lossy = [p.tolerance() for p in pipeline if not p.lossless]
    if any(t is None for t in lossy):
        return None
    return _loosest([t for t in lossy if t is not None])


def lowering_tolerance(pipeline: Sequence[Pass]) -> Tolerance:
    """How far the artifact may be from the rewritten graph: what the promising lossy passes allow
    (int8 kernels round differently from the IR's reference arithmetic), else fp32."""
    return _loosest([t for t in (p.tolerance() for p in pipeline if not p.lossless) if t is not None])


def _loosest(promises: Sequence[Tolerance]) -> Tolerance:
    if not promises:
        return FP32
    floors = [t.min_cosine for t in promises if t.min_cosine is not None]
    if floors:
        return Tolerance(min_cosine=min(floors))
    return Tolerance(atol=max(t.atol for t in promises), rtol=max(t.rtol for t in promises))


def _measure_latency(
    model: nn.Module, program: Program, artifact: Artifact, record: ArtifactRecord, runs: int
) -> None:
    inputs = program.example_inputs
    by_name = dict(zip((s.name for s in program.inputs), inputs))
    record.eager_ms = median_ms(lambda: model(**by_name), runs)
    record.artifact_ms = median_ms(lambda: artifact.run(inputs), runs)


def measure_error(
    program: Program, run: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]], tolerance: Tolerance
) -> ErrorStats:
    """Worst error of ``run`` against the eager outputs over all the program's checks."""
    worst: ErrorStats | None = None
    for check in program.checks:
        stats = compare(run(check.inputs), check.outputs, tolerance)
        if worst is None or stats.ratio > worst.ratio:
            worst = stats
    assert worst is not None
    return worst


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
