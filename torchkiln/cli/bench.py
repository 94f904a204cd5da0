"""``kiln bench MODEL_OR_ARTIFACT``: latency of a model's runtimes side by side, in one process.

For a MODEL (zoo name, file.py:factory): eager PyTorch, ``torch.compile``, ONNX Runtime fp32
(cleanup + fold_batchnorm) and ONNX Runtime int8 (+ quantize; calibrated on --calibration, else on
random inputs: fine for latency, not for accuracy), OpenVINO fp32 and int8 (the same verified ONNX,
read by OpenVINO; when ``torchkiln[openvino]`` is installed), each at every --batch-sizes; with a CUDA GPU
also eager on CUDA, the torch backend in fp16 with CUDA graphs, and TensorRT fp16 / int8 engines
(``torchkiln[gpu]``; a runtime that cannot be built is a row saying why). GPU calls are timed to
completion (synchronized) with inputs already on the device. For an ARTIFACT directory: the
artifact (and eager, with --model).

Per runtime and batch size: p50/p90/p99 latency (ms), throughput (samples/s at p50), peak memory
growth while it was built and warmed up, file size, and p50 relative to eager. Runtimes are timed
in alternating blocks (torchkiln.benchmark), so the ratios are fair even when the machine drifts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchkiln
from torchkiln.benchmark import Latency, PeakMemory, interleaved_times
from torchkiln.cli.common import (
    add_model_arguments,
    add_native_code_argument,
    calibration_batches,
    example_inputs,
    load_model,
    stage_printer,
)
from torchkiln.cli.plots import latency_plot
from torchkiln.compiler.files import check_file_destination
from torchkiln.compiler.graph import parameter_stats
from torchkiln.driver.auto import SETTLE
from torchkiln.driver.compiled import CompiledModel, load
from torchkiln.errors import ConfigError, InputError

CPU_RUNTIMES = ("eager", "torch.compile", "ort-fp32", "ort-int8")
GPU_RUNTIMES = ("eager-cuda", "torch-cuda-fp16", "tensorrt-fp16", "tensorrt-int8")
#: in the default rows when the openvino package is installed (an optional extra)
OPENVINO_RUNTIMES = ("openvino-fp32", "openvino-int8")
# Asked for by name only: each is an AOTInductor C++ build (20-60 s on 2 cores), or, for auto, several.
ON_REQUEST = ("inductor-fp32", "inductor-bf16", "inductor-int8", "inductor-cuda-bf16", "openvino-bf16", "auto")
MODEL_RUNTIMES = CPU_RUNTIMES + OPENVINO_RUNTIMES + GPU_RUNTIMES + ON_REQUEST
#: what a builder returns: run(inputs) on the runtime's device, file size in MB, that device
Built = tuple[Callable[[dict[str, torch.Tensor]], Any], float | None, str]


@dataclasses.dataclass
class Row:
    runtime: str
    batch: int
    latency: Latency | None = None
    peak_mb: float | None = None
    size_mb: float | None = None
    note: str = ""
    vs_eager: float | None = None  # eager p50 / this p50: > 1 is faster

    @property
    def throughput(self) -> float | None:
        return self.batch / self.latency.p50 * 1e3 if self.latency else None


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="latency of a model's runtimes (or an artifact) side by side",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_model_arguments(parser)
    parser.add_argument(
        "--model", dest="eager_model", metavar="MODEL", help="with an ARTIFACT: also time this eager model"
    )
    parser.add_argument(
        "--runtimes",
        help=f"for a MODEL, any of {','.join(MODEL_RUNTIMES)} (default: the CPU ones, plus the GPU ones with CUDA; "
        f"{', '.join(ON_REQUEST)} only when named: each compiles C++ for up to a minute)",
    )
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default: 1)")
    parser.add_argument(
        "--runs", type=int, default=100, help="timed calls per runtime and batch size (default: 100)"
    )
    parser.add_argument(
        "--calibration", metavar="SOURCE", help="int8 calibration: FILE.pt / FILE.npz / random:N"
    )
    parser.add_argument("--plot", metavar="FILE.png", help="write throughput over batch sizes as a PNG")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_native_code_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    batches = _batch_sizes(args.batch_sizes)
    if args.runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {args.runs}", where="--runs")
    if args.plot:
        check_file_destination(args.plot, "png")  # before the timing, not after it
    say = stage_printer(args.quiet) or (lambda _: None)
    is_artifact = Path(args.model).is_dir()  # a directory is an artifact; load() says what is wrong with it
    calls, rows = (_artifact_runtimes if is_artifact else _model_runtimes)(args, batches, say)
    say(f"timing {len(calls)} runtime x batch combinations, {args.runs} calls each")
    blocks = max(1, args.runs // 20)
    done = [0]

    def tick() -> None:
        done[0] += 1
        say(f"  block {done[0]}/{blocks}")

    times = interleaved_times(calls, args.runs, on_block=None if args.quiet else tick, settle=SETTLE)
    for row in rows:
        if (row.runtime, row.batch) in times:
            row.latency = Latency.of(times[(row.runtime, row.batch)])  # type: ignore[index]
    _ratios(rows)
    plot = _plot(args.plot, rows) if args.plot else None
    if args.json:
        print(json.dumps({"rows": [_as_dict(r) for r in rows], "plot": plot}, indent=2))
    else:
        print(_table(rows) + (f"\n{plot}" if plot else ""))
    return 0


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise ConfigError(f"bad --batch-sizes '{text}'", where="--batch-sizes", hint="write e.g. 1,8,32")
    return sizes


def _at_batch(inputs: dict[str, torch.Tensor], batch: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The example inputs repeated along axis 0, cut to ``batch`` rows, on ``device``."""
    out = {}
    for name, tensor in inputs.items():
        copies = math.ceil(batch / max(1, tensor.shape[0]))
        out[name] = torch.cat([tensor] * copies)[:batch].contiguous().to(device)
    return out


def _model_runtimes(
    args: argparse.Namespace, batches: list[int], say: Callable[[str], None]
) -> tuple[dict[Any, Callable[[], Any]], list[Row]]:
    wanted = _wanted(args.runtimes)
    model, entry = load_model(args.model)
    example = example_inputs(args, entry)
    axes = {name: {0: "batch"} for name in example} if len(batches) > 1 else None
    # Read up front: a bad --calibration is the user's error (exit 2), not a runtime that failed to build.
    needs_data = {"ort-int8", "openvino-int8", "tensorrt-int8", "inductor-int8", "auto"}
    calibration = _calibration(args, entry, example) if needs_data & set(wanted) else None
    builders = _builders(model, example, axes, calibration)
    calls: dict[Any, Callable[[], Any]] = {}
    rows: list[Row] = []
    for runtime in wanted:
        say(f"building {runtime}")
        peak = PeakMemory()
        try:
            with peak.measure():
                run_one, size, device = builders[runtime]()
                for batch in batches:
                    _synchronized(run_one, device)(_at_batch(example, batch, device))  # warm-up
        except Exception as exc:  # a runtime that cannot build is a row with the reason, not a crash
            rows += [
                Row(runtime, b, note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                for b in batches
            ]
            continue
        for batch in batches:
            calls[(runtime, batch)] = _bound(
                _synchronized(run_one, device), _at_batch(example, batch, device)
            )
            rows.append(Row(runtime, batch, peak_mb=_mb(peak.growth_bytes), size_mb=size))
    if args.runtimes is None and not torch.cuda.is_available():
        rows.append(Row(", ".join(GPU_RUNTIMES), batches[0], note="skipped: no CUDA device"))
    if args.runtimes is None and not _has_openvino():
        rows.append(Row(", ".join(OPENVINO_RUNTIMES), batches[0], note="skipped: openvino is not installed"))
    return calls, rows


def _wanted(text: str | None) -> list[str]:
    if text is None:
        openvino = OPENVINO_RUNTIMES if _has_openvino() else ()
        return list(CPU_RUNTIMES + openvino + (GPU_RUNTIMES if torch.cuda.is_available() else ()))
    wanted = [r.strip() for r in text.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(MODEL_RUNTIMES))
    if unknown or not wanted:
        raise ConfigError(
            f"unknown runtime(s) {', '.join(unknown) or '(none given)'}",
            where="--runtimes",
            hint=f"choose from {', '.join(MODEL_RUNTIMES)}",
        )
    return wanted


def _has_openvino() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _builders(
    model: nn.Module, example: dict[str, torch.Tensor], axes: Any, calibration: Any
) -> dict[str, Callable[[], Built]]:
    def compiled(passes: str, backend: str = "onnxruntime", **options: Any) -> Built:
        half = options.get("precision", options.get("dtype", "")) not in ("", "float32")
        result = torchkiln.compile(
            model, example, passes=passes, dynamic_axes=axes, backend=backend, backend_options=options,
            calibration_data=calibration if "quantize" in passes else None, latency_runs=0,
            tolerance=torchkiln.Tolerance(min_cosine=0.999) if half else None,
        )  # fmt: skip
        device = "cuda" if backend == "tensorrt" or options.get("device") == "cuda" else "cpu"
        if backend == "auto":
            device = "cuda" if result.options.to_dict().get("device", "cpu") != "cpu" or result.backend == "tensorrt" else "cpu"
        return (lambda x: result(**x)), (result.report.artifact.file_bytes or 0) / 1e6 or None, device  # type: ignore[union-attr]

    def on_cuda() -> Built:
        gpu = copy.deepcopy(model).cuda()
        return (lambda x: gpu(**x)), _state_mb(model), "cuda"

    return {
        "eager": lambda: ((lambda x: model(**x)), _state_mb(model), "cpu"),
        "torch.compile": lambda: _torch_compiled(model),
        "ort-fp32": lambda: compiled("cleanup,fold_batchnorm"),
        "ort-int8": lambda: compiled("cleanup,fold_batchnorm,quantize"),
        "eager-cuda": on_cuda,
        "torch-cuda-fp16": lambda: compiled("cleanup,fold_batchnorm", "torch", device="cuda", dtype="float16", cuda_graphs=True),
        "tensorrt-fp16": lambda: compiled("cleanup,fold_batchnorm", "tensorrt", precision="fp16"),
        "tensorrt-int8": lambda: compiled("cleanup,fold_batchnorm,quantize:target=tensorrt", "tensorrt", precision="fp16|int8"),
        "openvino-fp32": lambda: compiled("cleanup,fold_batchnorm", "openvino"),
        "openvino-int8": lambda: compiled("cleanup,fold_batchnorm,quantize", "openvino"),
        "openvino-bf16": lambda: compiled("cleanup,fold_batchnorm", "openvino", precision="bf16"),
        "inductor-fp32": lambda: compiled("cleanup,fold_batchnorm", "inductor"),
        "inductor-bf16": lambda: compiled("cleanup,fold_batchnorm", "inductor", dtype="bfloat16"),
        "inductor-int8": lambda: compiled("cleanup,fold_batchnorm,quantize", "inductor"),
        "inductor-cuda-bf16": lambda: compiled("cleanup,fold_batchnorm", "inductor", device="cuda", dtype="bfloat16"),
        "auto": lambda: compiled("cleanup,fold_batchnorm,quantize", "auto"),
    }  # fmt: skip


def _synchronized(run_one: Callable[[Any], Any], device: str) -> Callable[[Any], Any]:
    """GPU work is asynchronous: a timed call ends when the device is done."""
    if device == "cpu":
        return run_one

    def run_and_wait(inputs: Any) -> Any:
        out = run_one(inputs)
        torch.cuda.synchronize()
        return out

    return run_and_wait


def _artifact_runtimes(
    args: argparse.Namespace, batches: list[int], say: Callable[[str], None]
) -> tuple[dict[Any, Callable[[], Any]], list[Row]]:
    say(f"loading {args.model}")
    peak = PeakMemory()
    with peak.measure():
        compiled = load(args.model, allow_native_code=args.allow_native_code)
    example = _inputs_from_specs(compiled, args.seed)
    calls: dict[Any, Callable[[], Any]] = {}
    rows: list[Row] = []
    size = (compiled.artifact.file_bytes() or 0) / 1e6
    label = f"artifact ({compiled.backend})"
    static = next((s.shape[0] for s in compiled.inputs if s.shape and isinstance(s.shape[0], int)), None)
    for batch in batches:
        if static is not None and batch != static:
            rows.append(Row(label, batch, note=f"skipped: the artifact's batch size is fixed at {static}"))
            continue
        inputs = _at_batch(example, batch)
        compiled(**inputs)
        calls[(label, batch)] = _bound(lambda x: compiled(**x), inputs)
        rows.append(Row(label, batch, peak_mb=_mb(peak.growth_bytes), size_mb=size))
    if args.eager_model:
        model, _ = load_model(args.eager_model)
        _check_runs(model, example, args.eager_model)
        for batch in batches:
            inputs = _at_batch(example, batch)
            calls[("eager", batch)] = _bound(lambda x: model(**x), inputs)
            rows.append(Row("eager", batch, size_mb=_state_mb(model)))
    return calls, rows


def _check_runs(model: nn.Module, inputs: dict[str, torch.Tensor], spec: str) -> None:
    """The eager model given with --model must take the artifact's inputs."""
    try:
        with torch.no_grad():
            model(**{name: t.clone() for name, t in inputs.items()})
    except Exception as exc:
        shapes = ", ".join(f"{n}: {list(t.shape)} {t.dtype}" for n, t in inputs.items())
        raise InputError(
            f"--model {spec} does not run on the artifact's inputs ({shapes}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            where="--model",
            hint="give the model the artifact was compiled from",
        ) from exc


def _bound(
    run_one: Callable[[dict[str, torch.Tensor]], Any], inputs: dict[str, torch.Tensor]
) -> Callable[[], Any]:
    return lambda: run_one(inputs)


def _inputs_from_specs(compiled: CompiledModel, seed: int) -> dict[str, torch.Tensor]:
    """Random inputs of the artifact's specs (dynamic sizes 1; integers drawn from [0, 100))."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for spec in compiled.inputs:
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        dtype = getattr(torch, spec.dtype)
        inputs[spec.name] = (
            torch.randn(shape, generator=generator).to(dtype)
            if dtype.is_floating_point
            else torch.randint(0, 100, shape, generator=generator, dtype=dtype)
        )
    return inputs


def _torch_compiled(model: nn.Module) -> Built:
    compiled = torch.compile(model)
    return (lambda x: compiled(**x)), None, "cpu"


def _calibration(args: argparse.Namespace, entry: Any, example: dict[str, torch.Tensor]) -> Any:
    if args.calibration:
        return calibration_batches(args, entry, example)
    return calibration_batches(
        argparse.Namespace(**{**vars(args), "calibration": "random:8"}), entry, example
    )


def _state_mb(model: nn.Module) -> float:
    return parameter_stats(model)[1] / 1e6


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 1e6


def _ratios(rows: list[Row]) -> None:
    eager = {r.batch: r.latency.p50 for r in rows if r.runtime == "eager" and r.latency}
    for row in rows:
        if row.latency and row.batch in eager:
            row.vs_eager = eager[row.batch] / row.latency.p50


def _plot(path: str, rows: list[Row]) -> str:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row.throughput is not None:
            series.setdefault(row.runtime, []).append((row.batch, row.throughput))
    skipped = latency_plot(Path(path), series)
    return f"no plot: {skipped}" if skipped else f"wrote {path}"


def _as_dict(row: Row) -> dict[str, Any]:
    data = dataclasses.asdict(row)
    data["throughput"] = row.throughput
    return data


def _table(rows: list[Row]) -> str:
    header = ("runtime", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "peak MB", "size MB", "x eager")
    timed = [header] + [
        (
            r.runtime, str(r.batch), f"{r.latency.p50:.3f}", f"{r.latency.p90:.3f}", f"{r.latency.p99:.3f}",
            f"{r.throughput:,.0f}", _cell(r.peak_mb), _cell(r.size_mb), _cell(r.vs_eager, "x"),
        )
        for r in rows
        if r.latency is not None
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in [*timed, *((r.runtime, str(r.batch)) for r in rows)]) if i < 2
              else max(len(line[i]) for line in timed) for i in range(len(header))]  # fmt: skip
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in timed]
    lines += [
        f"  {r.runtime.ljust(widths[0])}  {str(r.batch).ljust(widths[1])}  {r.note}"
        for r in rows
        if r.latency is None
    ]
    return "\n".join(lines)


def _cell(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"
