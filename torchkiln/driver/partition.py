"""``torchkiln.partition``: an optimized program cut into N pipeline stages, each its own artifact.

The program's activations are taken in topological order and cut at N-1 legal positions
(:mod:`torchkiln.driver.cuts`: only batch-carrying activation tensors cross, never a weight, a
dequantized weight, a constant, a size or one side of an int8 Q/DQ pair; constants and sizes are
recomputed by the stage that reads them); stage k runs the activations between its cuts. What
crosses a cut is every activation defined before it and read after it (pass-through included).

Cut positions balance a cost per node — ``params`` (bytes of the weights a node reads, through any
dequantize), ``memory`` (weights + the bytes of the node's output on the example inputs) or
``latency`` (each node timed by an ``fx.Interpreter``: the median of 7 runs after 2 warm-up runs)
— so that each stage's cost is near total / N; among positions within 10% of a stage's share of
that target the one with the fewest boundary bytes wins. Under ``latency`` the stage graphs are
then re-timed and the cuts moved by their measured times (up to 3 tries, the most even kept).

Each stage is compiled on its own (``torchkiln.compile`` with no passes, any backend), verified
against the stage graph; the composition of the stage artifacts is then verified against the whole
program on the example inputs, and each stage artifact is timed (median and interquartile range of
15 runs): ``balance_ratio`` — slowest over mean — is that measurement, not the prediction.
Saved as ``partition.json`` and one artifact directory per stage;
``partition.json`` binds every stage: the SHA-256 of its manifest, its inputs and outputs and the
boundary tensors (name, dtype, shape; axis 0 is the batch) it sends, so a changed, swapped, linked
or missing stage is refused on load and a rank can check what it receives before receiving it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from torchkiln.compiler import arguments
from torchkiln.compiler.arguments import integer
from torchkiln.compiler.files import (
    MARKERS,
    atomic_directory,
    open_directory,
    parse_json,
    read_member,
    sha256,
)
from torchkiln.compiler.graph import parameter_stats
from torchkiln.compiler.program import dtype_name
from torchkiln.compiler.verify import FP32, Tolerance, compare
from torchkiln.driver import cuts as cutting
from torchkiln.driver.balance import choose_cuts, median_seconds, node_costs, timings
from torchkiln.driver.compiled import MANIFEST, CompiledModel, load_bound
from torchkiln.errors import ArtifactError, ConfigError, VerificationError

Balance = Literal["params", "memory", "latency"]
PARTITION_FILE, FORMAT = MARKERS["partition"]
FORMAT_VERSION = 2


@dataclasses.dataclass
class Boundary:
    name: str
    shape: list[int]
    dtype: str
    bytes: int


@dataclasses.dataclass
class StageRecord:
    index: int
    inputs: list[str]
    outputs: list[str]
    nodes: int
    params: int
    param_bytes: int
    cost: float
    boundary: list[Boundary]  # the tensors it sends to the next stage
    backend: str = ""
    measured_ms: float | None = None  # the compiled stage on its example inputs: median of 15 runs
    measured_iqr_ms: float | None = None  # and the spread of those runs (interquartile range)
    manifest_sha256: str = ""  # of stage<index>/manifest.json: binds the stage to the partition


@dataclasses.dataclass
class Partition:
    """The stages (compiled models), run in sequence by ``__call__`` or across ranks by
    :mod:`torchkiln.workflows.pipeline`."""

    stages: list[CompiledModel]
    records: list[StageRecord]
    balance: str
    inputs: list[str]
    max_abs_error: float | None = None
    tolerance: str = ""
    balance_ratio: float | None = None  # slowest / mean of the stages' measured times

    def __call__(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = dict(inputs)
        for stage, record in zip(self.stages, self.records):
            if stage is None:
                raise ConfigError(f"stage {record.index} was not loaded", hint="load_partition(directory) loads all")
            outputs = pytree.tree_leaves(stage(**{name: values[name] for name in record.inputs}))
            if len(outputs) != len(record.outputs):
                raise ArtifactError(f"stage {record.index} returned {len(outputs)} tensors; the partition binds "
                                    f"{len(record.outputs)}", hint="rebuild the partition")  # fmt: skip
            values.update(zip(record.outputs, outputs))
        return tuple(values[name] for name in self.records[-1].outputs)

    def table(self) -> str:
        ratio = "not measured" if self.balance_ratio is None else f"{self.balance_ratio:.2f}"
        error = "not verified" if self.max_abs_error is None else f"{self.max_abs_error:.2e}"
        lines = [f"partition: {len(self.stages)} stages, balance={self.balance}; composition max abs err "
                 f"{error} ({self.tolerance}); slowest / mean stage time {ratio}"]  # fmt: skip
        lines.append("  stage  backend      nodes  params       cost        measured ms       sends")
        for r in self.records:
            sends = ", ".join(f"{b.name} {b.dtype}{b.shape} ({b.bytes / 1e3:.1f} kB)" for b in r.boundary) or "(outputs)"
            timed = "-" if r.measured_ms is None else f"{r.measured_ms:.3g} (iqr {r.measured_iqr_ms or 0:.2g})"
            lines.append(f"  {r.index:<5d}  {r.backend:11s}  {r.nodes:<5d}  {r.params:<11,d}  {r.cost:<10.4g}  "
                         f"{timed:16s}  {sends}")  # fmt: skip
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Atomically: ``partition.json`` and ``stage<k>/`` artifacts. Replaces only an empty
        directory or a partition."""
        target = Path(directory)
        with atomic_directory(target, "partition") as staging:
            self.write(staging)
        return target

    def write(self, staging: Path) -> None:
        """The stages and ``partition.json`` into an existing (staging) directory."""
        for index, (stage, record) in enumerate(zip(self.stages, self.records)):
            assert stage is not None, "a partition loaded for some stages cannot be saved"
            (staging / f"stage{index}").mkdir()
            stage.write(staging / f"stage{index}")
            record.manifest_sha256 = sha256(staging / f"stage{index}" / MANIFEST)
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "balance": self.balance, "inputs": self.inputs,
                    "max_abs_error": self.max_abs_error, "tolerance": self.tolerance, "balance_ratio": self.balance_ratio,
                "stages": [dataclasses.asdict(r) for r in self.records]}  # fmt: skip
        (staging / PARTITION_FILE).write_text(json.dumps(data, indent=2) + "\n")


def load_partition(directory: str | os.PathLike[str], stages: Sequence[int] | None = None) -> Partition:
    """Read ``partition.json`` and load the stage artifacts (only ``stages`` when given: a
    pipeline rank loads its own), each bound to the digest ``partition.json`` recorded."""
    path = Path(directory)
    where = str(path / PARTITION_FILE)
    with open_directory(path) as fd:
        try:
            data = parse_json(read_member(fd, PARTITION_FILE, where), where)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"it is not a torchkiln partition (format {data.get('format')!r})"
                                 if isinstance(data, dict) else "not a JSON object")  # fmt: skip
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {data.get('format_version')!r}; this torchkiln reads {FORMAT_VERSION}")
            records = [_record(r, i) for i, r in enumerate(data["stages"])]
            if not records or not isinstance(data.get("inputs"), list):
                raise ValueError("it has no stages or no inputs")
            _check_chain(records, data["inputs"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path} is not a partition this torchkiln reads: {exc}", where=where,
                                hint="rebuild it with kiln partition / kiln build") from None  # fmt: skip
        wanted = range(len(records)) if stages is None else stages
        loaded = [load_bound(fd, path, f"stage{i}", r.manifest_sha256) if i in wanted else None
                  for i, r in enumerate(records)]  # fmt: skip
    for stage, record in zip(loaded, records):
        if stage is not None and [s.name for s in stage.inputs] != record.inputs:
            raise ArtifactError(f"stage{record.index} takes {[s.name for s in stage.inputs]}, but {PARTITION_FILE} "
                                f"says {record.inputs}", where=where, hint="rebuild the partition")  # fmt: skip
    return Partition(loaded, records, str(data.get("balance", "?")), data["inputs"],  # type: ignore[arg-type]
                     _measured(data.get("max_abs_error")), str(data.get("tolerance", "")),
                     _measured(data.get("balance_ratio")))  # fmt: skip


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _measured(value: Any) -> float | None:
    """A figure read back from partition.json: a finite number >= 0, or None (not measured)."""
    return float(value) if _number(value) and 0 <= value < float("inf") else None


def _check_chain(records: list[StageRecord], inputs: list[Any]) -> None:
    """Each stage reads only what the partition's inputs and earlier stages provide, and sends what
    its boundary names."""
    known = set(inputs)
    if not all(isinstance(n, str) for n in inputs):
        raise ValueError("'inputs' must be names")
    for record in records:
        missing = [n for n in record.inputs if n not in known]
        if missing:
            raise ValueError(f"stage {record.index} reads {missing}, which no earlier stage provides")
        if record is not records[-1] and [b.name for b in record.boundary] != record.outputs:
            raise ValueError(f"stage {record.index}'s boundary does not name its outputs")
        known |= set(record.outputs)


def _record(raw: Any, index: int) -> StageRecord:
    """One stage's entry, with its types checked (names are strings, shapes lists of sizes)."""
    boundary = [Boundary(**b) for b in raw["boundary"]]
    record = StageRecord(**{**raw, "boundary": boundary})
    names = [*record.inputs, *record.outputs, *(b.name for b in boundary)]
    if (record.index != index or not all(isinstance(n, str) for n in names) or not isinstance(record.backend, str)
            or not (isinstance(record.inputs, list) and isinstance(record.outputs, list))):  # fmt: skip
        raise ValueError(f"stage {index}: index, backend or names malformed")
    for b in boundary:
        if not (isinstance(b.dtype, str) and isinstance(b.shape, list) and b.shape and type(b.bytes) is int
                and b.bytes >= 0 and all(type(d) is int and d >= 0 for d in b.shape)):  # fmt: skip
            raise ValueError(f"stage {index}: boundary tensor {b.name!r} has shape {b.shape!r} / dtype {b.dtype!r} / "
                             f"bytes {b.bytes!r}")
    if not isinstance(record.manifest_sha256, str) or len(record.manifest_sha256) != 64:
        raise ValueError(f"stage {index} has no manifest digest")
    for key in ("nodes", "params", "param_bytes"):
        if not (type(getattr(record, key)) is int and getattr(record, key) >= 0):
            raise ValueError(f"stage {index}: {key} {getattr(record, key)!r} is not a count")
    for key in ("cost", "measured_ms", "measured_iqr_ms"):
        value = getattr(record, key)
        if (value is not None or key == "cost") and (not _number(value) or not 0 <= value < float("inf")):
            raise ValueError(f"stage {index}: {key} {value!r} is not a time or cost")
    return record


def partition(
    model: nn.Module | CompiledModel,
    example_inputs: Mapping[str, torch.Tensor],
    stages: int = 2,
    balance: Balance = "latency",
    backend: str = "torch",
    backend_options: Mapping[str, Any] | None = None,
    passes: Any = ("cleanup", "fold_batchnorm"),
    dynamic_axes: Any = "batch",
    tolerance: Tolerance | None = None,
    calibration_data: Any = None,
    cuts: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Partition:
    """Optimize ``model`` (``passes``, calibrated on ``calibration_data``; a ``CompiledModel`` of the
    torch backend is used as it is), cut it into ``stages`` stages balanced by ``balance`` (or at
    the given ``cuts``: positions from :func:`legal_cuts`) and compile each stage with ``backend``.
    ``tolerance`` holds each stage artifact to its stage graph and the composition to the whole
    program (default fp32; an int8 program on ONNX Runtime needs a cosine floor, its kernels round
    differently from the IR). ``progress`` receives a line per phase (``kiln partition`` prints them)."""
    say = progress or (lambda _: None)
    _check_settings(stages, balance, example_inputs)
    arguments.text("backend", backend)
    Tolerance.given(tolerance)
    if cuts is not None:
        arguments.integers("cuts", cuts, low=0)
    say("tracing and optimizing the model")
    program, flat, names = _program(model, example_inputs, passes, dynamic_axes, calibration_data)
    say(f"costing {len(program.gm.graph.nodes)} nodes by {balance}" + (" (each timed)" if balance == "latency" else ""))
    costs = node_costs(program, balance, flat)
    say(f"choosing {stages} stages")
    if cuts is None:
        chosen = choose_cuts(program, costs, stages)
        if balance == "latency":
            chosen = _refine(program, costs, chosen, stages)
    else:
        chosen = _forced(program, cuts, stages)
    modules, records = _stages(program, chosen, costs)
    compiled = []
    # boundary tensors are named by graph nodes: stages keep a dynamic batch (axis 0), nothing else
    stage_axes = "batch" if program.batch else None
    for module, record in zip(modules, records):
        say(f"compiling stage {record.index + 1}/{len(records)} ({backend})")
        part = compile_stage(module, _stage_inputs(program, record, names, flat), backend, backend_options,
                             stage_axes, tolerance, record.index)  # fmt: skip
        record.backend = part.backend
        compiled.append(part)
    result = Partition(compiled, records, balance, names)
    say("verifying the stages together against the whole program")
    _verify(result, program.gm, flat, dict(example_inputs), tolerance or FP32)
    say("timing each stage")
    _measure(result, program, names, flat)
    return result


def legal_cuts(
    model: nn.Module | CompiledModel, example_inputs: Mapping[str, torch.Tensor], passes: Any = ("cleanup", "fold_batchnorm"),
    dynamic_axes: Any = "batch", calibration_data: Any = None,
) -> dict[int, int]:  # fmt: skip
    """Every position ``model``'s optimized program may be cut at, with the bytes crossing it."""
    program, _, _ = _program(model, example_inputs, passes, dynamic_axes, calibration_data)
    return program.legal()


def _check_settings(stages: int, balance: str, example_inputs: Any) -> None:
    integer("stages", stages)  # 2.0 was a raw TypeError deep in the cut search
    if not isinstance(balance, str) or balance not in ("params", "memory", "latency"):
        raise ConfigError(f"unknown balance '{balance}'", where="balance", hint="params, memory or latency")
    if not isinstance(example_inputs, Mapping):
        raise ConfigError("partition takes example inputs by name (a dict)", where="example_inputs")


def _program(
    model: nn.Module | CompiledModel, example_inputs: Mapping[str, torch.Tensor], passes: Any, dynamic_axes: Any,
    calibration_data: Any,
) -> tuple[cutting.Program, tuple[torch.Tensor, ...], list[str]]:  # fmt: skip
    from torchkiln.driver.api import compile as compile_model

    whole = model if isinstance(model, CompiledModel) else compile_model(
        model, dict(example_inputs), passes=passes, backend="torch", dynamic_axes=dynamic_axes, latency_runs=0,
        calibration_data=calibration_data,
    )  # fmt: skip
    gm = getattr(whole.artifact, "module", None)
    if not isinstance(gm, fx.GraphModule):
        raise ConfigError("partition needs the torch backend's graph", where="model", hint="compile with backend='torch'")
    names = [s.name for s in whole.inputs]
    flat = tuple(example_inputs[n] for n in names)
    batched = [bool(s.shape) and isinstance(s.shape[0], str) for s in whole.inputs]
    return cutting.analyse(gm, flat, batched), flat, names


def compile_stage(
    module: fx.GraphModule, inputs: dict[str, torch.Tensor], backend: str, backend_options: Mapping[str, Any] | None,
    axes: Any, tolerance: Tolerance | None, index: int,
) -> CompiledModel:  # fmt: skip
    from torchkiln.driver.api import compile as compile_model

    return compile_model(module, inputs, passes=(), backend=backend, backend_options=backend_options,
                         latency_runs=0, dynamic_axes=axes, tolerance=tolerance, name=f"stage {index}")  # fmt: skip


def _stage_inputs(
    program: cutting.Program, record: StageRecord, names: list[str], flat: tuple[torch.Tensor, ...]
) -> dict[str, torch.Tensor]:
    given = dict(zip(names, flat))
    return {n: given[n] if n in given else program.values[n] for n in record.inputs}


def _forced(program: cutting.Program, cuts: Sequence[int], stages: int) -> list[int]:
    if isinstance(cuts, (str, bytes)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cuts):
        raise ConfigError(f"cuts must be positions (integers), got {cuts!r}", where="cuts", hint="see legal_cuts()")
    chosen = sorted(cuts)
    if len(chosen) != stages - 1 or len(set(chosen)) != len(chosen):
        raise ConfigError(f"{stages} stages need {stages - 1} distinct cuts, got {list(cuts)}", where="cuts")
    for position in chosen:
        reason = program.cut_reason(position) if 0 < position < len(program.order) else "out of range"
        if reason:
            raise ConfigError(f"cut {position} is not legal: {reason}", where="cuts", hint="see legal_cuts()")
    return chosen


def _refine(program: cutting.Program, costs: list[float], cuts: list[int], stages: int) -> list[int]:
    """Re-time the stage graphs the cuts give and move the cuts by the measured stage times (each
    stage's per-node costs scaled to its measured time), keeping the most even of up to 3 tries."""
    best: tuple[float, list[int]] | None = None
    for _ in range(3):
        modules, records = _stages(program, cuts, costs)
        times = [median_seconds(m, tuple(_stage_values(program, r))) for m, r in zip(modules, records)]
        ratio = max(times) / (sum(times) / len(times))
        if best is None or ratio < best[0]:
            best = (ratio, cuts)
        if ratio <= 1.05:
            break
        bounds = [0, *cuts, len(program.order)]
        scaled = list(costs)
        for k, measured in enumerate(times):
            predicted = sum(costs[bounds[k]:bounds[k + 1]]) or 1e-9
            for i in range(bounds[k], bounds[k + 1]):
                scaled[i] = costs[i] * measured / predicted
        moved = choose_cuts(program, scaled, stages)
        if moved == cuts:
            break
        cuts, costs = moved, scaled
    assert best is not None
    return best[1]


def _stage_values(program: cutting.Program, record: StageRecord) -> list[Any]:
    by_name = {value_name(n): program.values[n.name] for n in [*program.placeholders, *program.order]}
    return [by_name[n] for n in record.inputs]


def _measure(result: Partition, program: cutting.Program, names: list[str], flat: tuple[torch.Tensor, ...]) -> None:
    """Each compiled stage timed on its example inputs (median and quartiles of 15 runs after 2
    warm-up runs); the partition's balance is the slowest stage over the mean."""
    for stage, record in zip(result.stages, result.records):
        times = sorted(timings(stage, (), 15, **_stage_inputs(program, record, names, flat)))
        record.measured_ms = round(1e3 * statistics.median(times), 4)
        record.measured_iqr_ms = round(1e3 * (times[11] - times[3]), 4)
    measured = [r.measured_ms or 0.0 for r in result.records]
    result.balance_ratio = round(max(measured) / (sum(measured) / len(measured)), 3) if sum(measured) else None


def _stages(
    program: cutting.Program, cuts: list[int], costs: list[float]
) -> tuple[list[fx.GraphModule], list[StageRecord]]:
    order = program.order
    bounds = [0, *cuts, len(order)]
    output = next(n for n in program.gm.graph.nodes if n.op == "output")
    modules, records = [], []
    for k in range(len(bounds) - 1):
        start, end = bounds[k], bounds[k + 1]
        inputs = program.placeholders if k == 0 else program.live(start)
        last = end == len(order)
        outputs = list(pytree.tree_leaves(output.args[0])) if last else program.live(end)
        module = cutting.stage_module(program, inputs, order[start:end], outputs, value_name)
        params = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
        param_bytes = parameter_stats(module)[1]
        boundary = [] if last else [_boundary(value_name(n), program.values[n.name]) for n in outputs]
        out_names = [value_name(n) if isinstance(n, fx.Node) else str(n) for n in outputs]
        records.append(StageRecord(k, [value_name(n) for n in inputs], out_names, end - start, params, param_bytes,
                                   sum(costs[start:end]), boundary))  # fmt: skip
        modules.append(module)
    return modules, records


def value_name(node: fx.Node) -> str:
    """What a value is called between stages: a model input by its input name (fx may have
    renamed its node: ``input`` -> ``input_1``), any other value by its node's name."""
    return str(node.target) if node.op == "placeholder" else node.name


def _boundary(name: str, value: torch.Tensor) -> Boundary:
    return Boundary(name, list(value.shape), dtype_name(value.dtype), value.numel() * value.element_size())


def _verify(
    result: Partition, gm: fx.GraphModule, flat: tuple[torch.Tensor, ...], inputs: dict[str, torch.Tensor],
    tolerance: Tolerance,
) -> None:  # fmt: skip
    with torch.no_grad():
        want = list(gm(*flat))
        got = list(result(**inputs))
    stats = compare(got, want, tolerance)
    result.max_abs_error, result.tolerance = stats.max_abs, str(tolerance)
    if not stats.within():
        raise VerificationError(
            f"the {len(result.stages)} stages composed differ from the whole program: max abs error "
            f"{stats.max_abs:.3e} ({tolerance})",
            hint="a lowering of one stage is off; try backend='torch'",
        )


__all__ = ["Partition", "partition", "legal_cuts", "load_partition", "PARTITION_FILE"]

