"""``torchkiln.workflows.bench``: latency of a model's runtimes side by side, in one process
(``kiln bench`` is this module with arguments parsed).

For a model: eager PyTorch, ``torch.compile``, ONNX Runtime fp32 (cleanup + fold_batchnorm) and
ONNX Runtime int8 (+ quantize; calibrated on the given batches, else on random inputs: fine for
latency, not for accuracy), OpenVINO fp32 and int8 (when ``torchkiln[openvino]`` is installed),
each at every batch size; with a CUDA GPU also eager on CUDA, the torch backend in fp16 with CUDA
graphs, and TensorRT fp16 / int8 engines (``torchkiln[gpu]``; a runtime that cannot be built is a
row saying why). GPU calls are timed to completion (synchronized) with inputs already on the
device. For an artifact directory: the artifact (and an eager model beside it).

Per runtime and batch size: p50/p90/p99 latency (ms), throughput (samples/s at p50), peak memory
growth while it was built and warmed up, file size, and p50 relative to eager. Runtimes are timed
in alternating blocks (:mod:`torchkiln.driver.benchmark`), so the ratios are fair even when the
machine drifts. The table's first line names the CPU, its thread count and kernel flags.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchkiln
from torchkiln.compiler import arguments
from torchkiln.compiler.budget import check_allocation
from torchkiln.compiler.causal_lm import wants_cache, with_cache
from torchkiln.compiler.files import check_file_destination
from torchkiln.compiler.graph import parameter_stats
from torchkiln.driver.auto import SETTLE
from torchkiln.driver.benchmark import Latency, PeakMemory, interleaved_times, machine_line
from torchkiln.driver.compiled import CompiledEncoderDecoder, CompiledModel, load
from torchkiln.driver.generate import PAST, check_cache_memory, empty_past, lm_steps, vocabulary
from torchkiln.errors import ConfigError, InputError
from torchkiln.workflows.plots import latency_plot

CPU_RUNTIMES = ("eager", "torch.compile", "ort-fp32", "ort-int8")
GPU_RUNTIMES = ("eager-cuda", "torch-cuda-fp16", "tensorrt-fp16", "tensorrt-int8")
#: in the default rows when the openvino package is installed (an optional extra)
OPENVINO_RUNTIMES = ("openvino-fp32", "openvino-int8")
# Asked for by name only: each is an AOTInductor C++ build (20-60 s on 2 cores), or, for auto, several.
ON_REQUEST = ("inductor-fp32", "inductor-bf16", "inductor-int8", "inductor-cuda-bf16", "openvino-bf16", "auto")
MODEL_RUNTIMES = CPU_RUNTIMES + OPENVINO_RUNTIMES + GPU_RUNTIMES + ON_REQUEST
#: a cached LM's prompt in tokens (``kiln bench --prompt-length``)
PROMPT_LENGTH = 32
#: the widest line of a table (the full notes are in --json)
WIDTH = 120
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


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """The rows of :func:`bench_model` / :func:`bench_artifact`, the machine they ran on, and what a
    plot wrote (or why it did not)."""

    rows: list[Row]
    machine: str
    plot: str | None = None

    def table(self) -> str:
        # the CPU line wraps at 120 columns like the rest (a Xeon with AMX lists 8 kernel flags: 123)
        machine = "\n".join(textwrap.wrap(self.machine, 120, subsequent_indent="  ", break_on_hyphens=False))
        return f"{machine}\n" + _table(self.rows) + (f"\n{self.plot}" if self.plot else "")

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "rows": [_as_dict(r) for r in self.rows], "plot": self.plot}


def bench_model(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    runtimes: str | Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (1,),
    runs: int = 100,
    calibration: list[Any] | None = None,
    plot: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time ``model``'s runtimes side by side on ``inputs`` (repeated along axis 0 to each batch size).

    ``runtimes``: any of :data:`MODEL_RUNTIMES` (default: the CPU ones, OpenVINO's when installed, the
    GPU ones with CUDA). The int8 rows calibrate on ``calibration`` (default: 8 random batches like
    ``inputs`` — fine for latency, not for accuracy). A runtime that cannot be built is a row saying why.
    """
    sizes = _checked(batch_sizes, runs, plot)
    inputs = dict(arguments.named("inputs", inputs))
    if not inputs or not all(isinstance(v, torch.Tensor) for v in inputs.values()):
        raise ConfigError("inputs must be a non-empty dict of tensors by input name", where="inputs")
    if runtimes is not None and not isinstance(runtimes, str):
        arguments.strings("runtimes", runtimes)
    _check_batches(inputs, sizes)
    say = progress or (lambda _: None)
    calls, rows = _model_runtimes(model, inputs, wanted_runtimes(runtimes), runtimes is None, sizes, calibration, say)
    return _timed(calls, rows, runs, plot, say, progress is not None)


def bench_artifact(
    artifact: str | Path,
    *,
    eager_model: nn.Module | None = None,
    eager_name: str = "the eager model",
    batch_sizes: Sequence[int] = (1,),
    runs: int = 100,
    seed: int = 0,
    allow_native_code: bool = False,
    prompt_length: int = PROMPT_LENGTH,
    plot: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time a saved artifact (and ``eager_model``, called ``eager_name`` in errors, beside it) on random
    inputs of its specs. A causal LM compiled with its cache is timed as two rows per batch: the
    prefill of a ``prompt_length``-token prompt and the decode of one token after it."""
    sizes = _checked(batch_sizes, runs, plot)
    arguments.path("artifact", artifact)
    arguments.text("eager_name", eager_name)
    arguments.integer("seed", seed, low=0, high=2**63 - 1)
    arguments.flag("allow_native_code", allow_native_code)
    say = progress or (lambda _: None)
    prompt = arguments.integer("prompt_length", prompt_length, high=1 << 20)
    calls, rows = _artifact_runtimes(str(artifact), eager_model, eager_name, sizes, seed, allow_native_code, prompt, say)
    return _timed(calls, rows, runs, plot, say, progress is not None)


#: timed calls per runtime and batch at most (100 is the default; 10**9 ran for days)
MAX_RUNS = 100_000


def _checked(batch_sizes: Sequence[int], runs: int, plot: str | Path | None) -> list[int]:
    sizes = arguments.integers("--batch-sizes", batch_sizes)
    arguments.integer("--runs", runs, high=MAX_RUNS)
    if plot is not None:
        check_file_destination(arguments.path("plot", plot), "png")  # before the timing, not after it
    return sizes


def _timed(calls: dict[Any, Callable[[], Any]], rows: list[Row], runs: int, plot: str | Path | None,
           say: Callable[[str], None], ticking: bool) -> BenchResult:  # fmt: skip
    say(f"timing {len(calls)} runtime x batch combinations, {runs} calls each")
    blocks = max(1, runs // 20)
    done = [0]

    def tick() -> None:
        done[0] += 1
        say(f"  block {done[0]}/{blocks}")

    times = interleaved_times(calls, runs, on_block=tick if ticking else None, settle=SETTLE)
    for row in rows:
        if (row.runtime, row.batch) in times:
            row.latency = Latency.of(times[(row.runtime, row.batch)])  # type: ignore[index]
    _ratios(rows)
    written = _plot(str(plot), rows) if plot else None
    return BenchResult(rows, machine_line(), written)


def _check_batches(example: dict[str, torch.Tensor], sizes: list[int]) -> None:
    """The largest batch's inputs priced against the memory budget before anything is built."""
    row = sum(t.element_size() * (t.numel() // max(1, t.shape[0]) if t.dim() else t.numel()) for t in example.values())
    check_allocation("--batch-sizes", max(sizes), row * max(sizes), "the inputs of one batch", ConfigError)


def _at_batch(inputs: dict[str, torch.Tensor], batch: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The example inputs repeated along axis 0, cut to ``batch`` rows, on ``device``."""
    out = {}
    for name, tensor in inputs.items():
        copies = math.ceil(batch / max(1, tensor.shape[0]))
        out[name] = torch.cat([tensor] * copies)[:batch].contiguous().to(device)
    return out


def _model_runtimes(
    model: nn.Module, example: dict[str, torch.Tensor], wanted: list[str], defaults: bool, batches: list[int],
    calibration: list[Any] | None, say: Callable[[str], None],
) -> tuple[dict[Any, Callable[[], Any]], list[Row]]:  # fmt: skip
    axes = {name: {0: "batch"} for name in example} if len(batches) > 1 else None
    if calibration is None and needs_calibration(wanted):
        calibration = [_at_batch(_random_like(example, seed), example_batch(example)) for seed in range(1, 9)]
    builders = _builders(model, example, axes, calibration)
    calls: dict[Any, Callable[[], Any]] = {}
    rows: list[Row] = []
    for runtime in wanted:
        say(f"building {runtime}" + (" (a C++ build: up to a minute)" if runtime in ON_REQUEST else ""))
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
    if defaults and not torch.cuda.is_available():
        rows += [Row(r, batches[0], note="skipped: no CUDA device") for r in GPU_RUNTIMES]
    if defaults and not _has_openvino():
        rows += [Row(r, batches[0], note="skipped: openvino is not installed") for r in OPENVINO_RUNTIMES]
    return calls, rows


def needs_calibration(wanted: Sequence[str]) -> bool:
    """Whether one of the runtimes is an int8 one (it calibrates)."""
    return bool({"ort-int8", "openvino-int8", "tensorrt-int8", "inductor-int8", "auto"} & set(wanted))


def example_batch(inputs: dict[str, torch.Tensor]) -> int:
    return int(next(iter(inputs.values())).shape[0]) if inputs else 1


def _random_like(example: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Inputs shaped like ``example``: normal floats, integers within the example's own range."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in example.items():
        if t.dtype.is_floating_point:
            out[name] = torch.randn(t.shape, generator=generator).to(t.dtype)
        elif t.dtype is torch.bool:
            out[name] = torch.randint(0, 2, t.shape, generator=generator).bool()
        else:
            high = max(int(t.max()) + 1, 1) if t.numel() else 1
            out[name] = torch.randint(0, high, t.shape, generator=generator, dtype=t.dtype)
    return out


def wanted_runtimes(runtimes: str | Sequence[str] | None) -> list[str]:
    """The runtimes asked for (a comma-separated string or a list), or the default set."""
    if runtimes is None:
        openvino = OPENVINO_RUNTIMES if _has_openvino() else ()
        return list(CPU_RUNTIMES + openvino + (GPU_RUNTIMES if torch.cuda.is_available() else ()))
    items = runtimes.split(",") if isinstance(runtimes, str) else list(runtimes)
    wanted = [r.strip() for r in items if r.strip()]
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
    artifact: str, model: nn.Module | None, name: str, batches: list[int], seed: int, allow_native_code: bool,
    prompt: int, say: Callable[[str], None],
) -> tuple[dict[Any, Callable[[], Any]], list[Row]]:  # fmt: skip
    say(f"loading {artifact}")
    peak = PeakMemory()
    with peak.measure():
        compiled = load(artifact, allow_native_code=allow_native_code)
    size = (compiled.artifact.file_bytes() or 0) / 1e6
    label = f"artifact ({compiled.backend})" + (" decoder step" if isinstance(compiled, CompiledEncoderDecoder) else "")
    if is_cached_lm(compiled):
        return _lm_runtimes(compiled, label, model, name, batches, prompt, seed, peak, size)
    example = _inputs_from_specs(compiled, seed)
    _check_batches(example, batches)
    calls: dict[Any, Callable[[], Any]] = {}
    rows: list[Row] = []
    static = next((s.shape[0] for s in compiled.inputs if s.shape and isinstance(s.shape[0], int)), None)
    for batch in batches:
        if static is not None and batch != static:
            rows.append(Row(label, batch, note=f"skipped: the artifact's batch size is fixed at {static}"))
            continue
        inputs = _at_batch(example, batch)
        compiled(**inputs)
        calls[(label, batch)] = _bound(lambda x: compiled(**x), inputs)
        rows.append(Row(label, batch, peak_mb=_mb(peak.growth_bytes), size_mb=size))
    if model is not None:
        _check_runs(model, example, name)
        for batch in batches:
            inputs = _at_batch(example, batch)
            calls[("eager", batch)] = _bound(lambda x: model(**x), inputs)
            rows.append(Row("eager", batch, size_mb=_state_mb(model)))
    return calls, rows


def is_cached_lm(compiled: CompiledModel) -> bool:
    """A causal LM compiled with its KV cache (``past_*`` inputs beside ``input_ids``): random inputs of
    its specs would be a mask and a cache that disagree, so it is timed as a prefill and a decode step."""
    names = [spec.name for spec in compiled.inputs]
    return (
        "input_ids" in names
        and any(n.startswith(PAST) for n in names)
        and not isinstance(compiled, CompiledEncoderDecoder)
    )


def _lm_runtimes(
    compiled: CompiledModel, label: str, model: nn.Module | None, name: str, batches: list[int], prompt: int,
    seed: int, peak: PeakMemory, size: float,
) -> tuple[dict[Any, Callable[[], Any]], list[Row]]:  # fmt: skip
    """A cached LM per batch: the prefill of a ``prompt``-token prompt (empty cache) and the decode of
    one token after it (the prefill's cache): the two costs of a generation, which differ by orders
    of magnitude. Prompts are random ids of the vocabulary; ``model`` (eager) is run through the
    same cache wrapper the artifact was compiled from."""
    limit = (compiled.generation or {}).get("max_positions")
    if limit is not None and prompt + 1 > limit:
        raise ConfigError(f"a prompt of {prompt} tokens and one decoded token exceed the model's {limit} positions",
                          where="--prompt-length", hint=f"use --prompt-length {limit - 1} or less")  # fmt: skip
    vocab = vocabulary(compiled) or 100
    check_cache_memory(compiled, max(batches), prompt, 1, "--prompt-length", prompt)
    generator = torch.Generator().manual_seed(seed)
    calls: dict[Any, Callable[[], Any]] = {}
    rows: list[Row] = []
    eager = _eager_lm(model, name, vocab) if model is not None else None
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt + 1), generator=generator)
        runners: list[tuple[str, Callable[..., Any], list[str], dict[str, torch.Tensor], float | None]] = [
            (label, compiled, [s.name for s in compiled.inputs], empty_past(compiled, batch), size)]  # fmt: skip
        if eager is not None and model is not None:
            wrapped, names, example_past = eager
            empty = {n: t[:, :, :0].expand(batch, -1, -1, -1).contiguous() for n, t in example_past.items()}
            runners.append(("eager", wrapped, names, empty, _state_mb(model)))
        for runtime, call, names, past, mb in runners:
            with torch.no_grad():
                steps = lm_steps(call, names, past, ids)
            for phase, inputs in zip((f"prefill {prompt}", f"decode @{prompt}"), steps):
                calls[(f"{runtime} {phase}", batch)] = _bound(_no_grad(call), inputs)
                growth = _mb(peak.growth_bytes) if runtime == label else None
                rows.append(Row(f"{runtime} {phase}", batch, peak_mb=growth, size_mb=mb))
    return calls, rows


def _eager_lm(
    model: nn.Module, name: str, vocab: int
) -> tuple[nn.Module, list[str], dict[str, torch.Tensor]]:
    """The eager causal LM wrapped with its cache as tensors (as compile wraps it): the module, its
    input names and its past inputs (at the example's length; cut to 0 for a prefill)."""
    ids = torch.randint(0, vocab, (1, 2))
    try:
        if not wants_cache(model, {"input_ids": ids}):
            raise InputError("it is not a causal LM with a KV cache")
        with torch.no_grad():
            wrapped, example, _ = with_cache(
                model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            )
    except Exception as exc:
        raise InputError(f"{name} cannot be timed beside a causal LM artifact: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}",
                         where="--model", hint="give the Hugging Face model the artifact was compiled from") from exc  # fmt: skip
    return wrapped, list(example), {n: t for n, t in example.items() if n.startswith(PAST)}


def _no_grad(call: Callable[..., Any]) -> Callable[..., Any]:
    def run(inputs: dict[str, torch.Tensor]) -> Any:
        with torch.no_grad():
            return call(**inputs)

    return run


def _check_runs(model: nn.Module, inputs: dict[str, torch.Tensor], name: str) -> None:
    """The eager model given with --model must take the artifact's inputs."""
    try:
        with torch.no_grad():
            model(**{name: t.clone() for name, t in inputs.items()})
    except Exception as exc:
        shapes = ", ".join(f"{n}: {list(t.shape)} {t.dtype}" for n, t in inputs.items())
        raise InputError(
            f"{name} does not run on the artifact's inputs ({shapes}): {type(exc).__name__}: "
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
        cost = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        check_allocation(f"input '{spec.name}'", shape, cost, "the shape the artifact's manifest declares", InputError)
        inputs[spec.name] = (
            torch.randn(shape, generator=generator).to(dtype)
            if dtype.is_floating_point
            else torch.randint(0, 100, shape, generator=generator, dtype=dtype)
        )
    return inputs


def _torch_compiled(model: nn.Module) -> Built:
    compiled = torch.compile(model)
    return (lambda x: compiled(**x)), None, "cpu"


def _state_mb(model: nn.Module) -> float:
    return parameter_stats(model)[1] / 1e6


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 1e6


def _ratios(rows: list[Row]) -> None:
    """Each row against eager at its batch (and, for a cached LM, in its phase: ``eager prefill 32``)."""
    eager = {(r.runtime.removeprefix("eager"), r.batch): r.latency.p50 for r in rows
             if (r.runtime == "eager" or r.runtime.startswith("eager ")) and r.latency}  # fmt: skip
    for row in rows:
        phases = [p for p, b in eager if b == row.batch and row.runtime.endswith(p)]
        phase = max(phases, key=len, default=None)  # "eager decode @32" for "artifact (...) decode @32"
        if row.latency and phase is not None and (phase, row.batch) in eager:
            row.vs_eager = eager[(phase, row.batch)] / row.latency.p50


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
    widths = [max(len(line[i]) for line in timed) for i in range(len(header))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in timed]
    notes: dict[str, list[str]] = {}  # runtimes not timed, grouped by why: one short line each
    for r in rows:
        if r.latency is None:
            notes.setdefault(r.note, []).append(r.runtime if r.note.startswith("skipped") else f"{r.runtime} b{r.batch}")
    for note, names in notes.items():  # the whole note is in to_dict() (--json)
        line = f"  not timed: {', '.join(dict.fromkeys(names))}: {note}"
        lines.append(line if len(line) <= WIDTH else line[: WIDTH - 3] + "...")
    return "\n".join(lines)


def _cell(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"
