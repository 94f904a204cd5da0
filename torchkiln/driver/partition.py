"""``torchkiln.partition``: an optimized program cut into N pipeline stages, each its own artifact.

The program's compute nodes are taken in topological order and cut at N-1 positions; stage k runs
the nodes between its cuts. What crosses a cut is the set of tensors defined before it and used
after it (pass-through included: an input a later stage needs travels through the stages between),
so a cut can only cross tensors — a position where a non-tensor value (a size, a Python list) is
live is never a cut. Weights never cross: a stage reads the attributes its nodes use.

Cut positions balance a cost per node — ``params`` (bytes of the weights a node reads), ``memory``
(weights + the bytes of the node's output on the example inputs) or ``latency`` (each node timed by
an ``fx.Interpreter`` over the example inputs) — so that each stage's cost is near total / N; among
positions within 10% of a stage's share of that target the one with the fewest boundary bytes wins.

Each stage is compiled on its own (``torchkiln.compile`` with no passes, any backend), verified
against the stage graph; the composition of the stage artifacts is then verified against the whole
program on the example inputs. Saved as ``partition.json`` and one artifact directory per stage;
``partition.json`` binds every stage: the SHA-256 of its manifest, its inputs and outputs and the
boundary tensors (name, dtype, shape; axis 0 is the batch) it sends, so a changed, swapped, linked
or missing stage is refused on load and a rank can check what it receives before receiving it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from torchkiln.compiler.files import MARKERS, atomic_directory, open_directory, read_member, sha256
from torchkiln.compiler.program import dtype_name
from torchkiln.compiler.verify import FP32, Tolerance, compare
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
    measured_ms: float | None = None
    manifest_sha256: str = ""  # of stage<index>/manifest.json: binds the stage to the partition


@dataclasses.dataclass
class Partition:
    """The stages (compiled models), run in sequence by ``__call__`` or across ranks by
    :mod:`torchkiln.pipeline`."""

    stages: list[CompiledModel]
    records: list[StageRecord]
    balance: str
    inputs: list[str]
    max_abs_error: float | None = None
    tolerance: str = ""

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
        lines = [f"partition: {len(self.stages)} stages, balance={self.balance}; composition max abs err "
                 f"{self.max_abs_error:.2e} ({self.tolerance})"]  # fmt: skip
        lines.append("  stage  backend      nodes  params       cost        sends")
        for r in self.records:
            sends = ", ".join(f"{b.name} {b.dtype}{b.shape} ({b.bytes / 1e3:.1f} kB)" for b in r.boundary) or "(outputs)"
            lines.append(f"  {r.index:<5d}  {r.backend:11s}  {r.nodes:<5d}  {r.params:<11,d}  {r.cost:<10.4g}  {sends}")
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
                    "max_abs_error": self.max_abs_error, "tolerance": self.tolerance,
                "stages": [dataclasses.asdict(r) for r in self.records]}  # fmt: skip
        (staging / PARTITION_FILE).write_text(json.dumps(data, indent=2) + "\n")


def load_partition(directory: str | os.PathLike[str], stages: Sequence[int] | None = None) -> Partition:
    """Read ``partition.json`` and load the stage artifacts (only ``stages`` when given: a
    pipeline rank loads its own), each bound to the digest ``partition.json`` recorded."""
    path = Path(directory)
    where = str(path / PARTITION_FILE)
    with open_directory(path) as fd:
        try:
            data = json.loads(read_member(fd, PARTITION_FILE, where))
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
                     data.get("max_abs_error"), str(data.get("tolerance", "")))  # fmt: skip


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
    if record.index != index or not all(isinstance(n, str) for n in names):
        raise ValueError(f"stage {index}: index or names malformed")
    for b in boundary:
        if not (isinstance(b.dtype, str) and isinstance(b.shape, list) and b.shape
                and all(type(d) is int and d >= 0 for d in b.shape)):  # fmt: skip
            raise ValueError(f"stage {index}: boundary tensor {b.name!r} has shape {b.shape!r} / dtype {b.dtype!r}")
    if not isinstance(record.manifest_sha256, str) or len(record.manifest_sha256) != 64:
        raise ValueError(f"stage {index} has no manifest digest")
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
) -> Partition:
    """Optimize ``model`` (``passes``, calibrated on ``calibration_data``; a ``CompiledModel`` of the
    torch backend is used as it is), cut it into ``stages`` stages balanced by ``balance`` and
    compile each stage with ``backend``. ``tolerance`` holds each stage artifact to its stage graph
    and the composition to the whole program (default fp32; an int8 program on ONNX Runtime needs
    a cosine floor, its kernels round differently from the IR)."""
    from torchkiln.driver.api import compile as compile_model

    if stages < 1:
        raise ConfigError(f"stages must be >= 1, got {stages}", where="stages")
    if balance not in ("params", "memory", "latency"):
        raise ConfigError(f"unknown balance '{balance}'", where="balance", hint="params, memory or latency")
    if not isinstance(example_inputs, Mapping):
        raise ConfigError("partition takes example inputs by name (a dict)", where="example_inputs")
    whole = model if isinstance(model, CompiledModel) else compile_model(
        model, dict(example_inputs), passes=passes, backend="torch", dynamic_axes=dynamic_axes, latency_runs=0,
        calibration_data=calibration_data,
    )  # fmt: skip
    gm = getattr(whole.artifact, "module", None)
    if not isinstance(gm, fx.GraphModule):
        raise ConfigError("partition needs the torch backend's graph", where="model", hint="compile with backend='torch'")
    names = [s.name for s in whole.inputs]
    flat = tuple(example_inputs[n] for n in names)
    values = _values(gm, flat)
    order = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    costs = node_costs(gm, order, values, balance, flat)
    cuts = choose_cuts(gm, order, costs, values, stages)
    modules, records = _stages(gm, order, cuts, costs, values)
    compiled, stage_inputs = [], dict(zip(names, flat))
    # boundary tensors are named by graph nodes: stages keep a dynamic batch (axis 0), nothing else
    stage_axes = "batch" if dynamic_axes else None
    for module, record in zip(modules, records):
        inputs = {n: stage_inputs[n] if n in stage_inputs else values[n] for n in record.inputs}
        part = compile_model(
            module, inputs, passes=(), backend=backend, backend_options=backend_options, latency_runs=0,
            dynamic_axes=stage_axes, tolerance=tolerance, name=f"stage {record.index}",
        )  # fmt: skip
        record.backend = part.backend
        compiled.append(part)
    result = Partition(compiled, records, balance, names)
    _verify(result, gm, flat, dict(example_inputs), tolerance or FP32)
    return result


def _values(gm: fx.GraphModule, flat: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Every node's value on the example inputs, by node name."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n.name] = result = super().run_node(n)
            return result

    with torch.no_grad():
        Recorder(gm).run(*flat)
    return values


def _attribute_bytes(gm: fx.GraphModule, node: fx.Node) -> int:
    total = 0
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            value = gm
            for part in str(arg.target).split("."):
                value = getattr(value, part)
            total += value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
    if node.op == "call_module":
        total += sum(p.numel() * p.element_size() for p in gm.get_submodule(str(node.target)).parameters())
    return total


def node_costs(
    gm: fx.GraphModule, order: list[fx.Node], values: Mapping[str, Any], balance: str, flat: tuple[torch.Tensor, ...]
) -> list[float]:
    """Cost of each node in ``order`` by ``balance`` (see the module docstring)."""
    if balance == "params":
        return [float(_attribute_bytes(gm, n)) for n in order]
    if balance == "memory":
        return [float(_attribute_bytes(gm, n) + _tensor_bytes(values.get(n.name))) for n in order]
    seconds = dict.fromkeys((n.name for n in order), 0.0)

    class Timer(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            start = time.perf_counter()
            result = super().run_node(n)
            if n.name in seconds:
                seconds[n.name] += time.perf_counter() - start
            return result

    with torch.no_grad():
        for _ in range(5):
            Timer(gm).run(*flat)
    return [seconds[n.name] for n in order]


def _tensor_bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def live_after(gm: fx.GraphModule, order: list[fx.Node], position: int) -> list[fx.Node]:
    """Values defined before ``order[position]`` (inputs included) and used at or after it."""
    index = {n: i for i, n in enumerate(order)}
    before = [n for n in gm.graph.nodes if n.op == "placeholder"] + order[:position]
    live = []
    for node in before:
        if any(u.op == "output" or index.get(u, -1) >= position for u in node.users):
            live.append(node)
    return live


def choose_cuts(
    gm: fx.GraphModule, order: list[fx.Node], costs: list[float], values: Mapping[str, Any], stages: int
) -> list[int]:
    """N-1 cut positions into ``order``: near each k/N share of the total cost, only where tensors
    alone cross, the fewest boundary bytes within 10% of a stage's share of the target."""
    if stages > len(order):
        raise ConfigError(f"{stages} stages asked of a program with {len(order)} compute nodes", where="stages")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    total = prefix[-1] or 1.0
    crossing: dict[int, int | None] = {}
    for position in range(1, len(order)):
        live = live_after(gm, order, position)
        tensors = all(isinstance(values.get(n.name), torch.Tensor) for n in live)
        crossing[position] = sum(_tensor_bytes(values.get(n.name)) for n in live) if tensors else None
    cuts: list[int] = []
    for k in range(1, stages):
        target, slack = total * k / stages, 0.1 * total / stages
        low = (cuts[-1] + 1) if cuts else 1
        valid = [p for p in range(low, len(order) - (stages - k) + 1) if crossing.get(p) is not None]
        if not valid:
            raise ConfigError(
                f"no cut for stage {k}: every position crosses a non-tensor value", where="stages",
                hint="use fewer stages",
            )  # fmt: skip
        near = [p for p in valid if abs(prefix[p] - target) <= slack]
        best = min(near, key=lambda p: (crossing[p], abs(prefix[p] - target))) if near else min(
            valid, key=lambda p: abs(prefix[p] - target)
        )  # fmt: skip
        cuts.append(best)
    return cuts


def _stages(
    gm: fx.GraphModule, order: list[fx.Node], cuts: list[int], costs: list[float], values: Mapping[str, Any]
) -> tuple[list[fx.GraphModule], list[StageRecord]]:
    bounds = [0, *cuts, len(order)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    modules, records = [], []
    for k in range(len(bounds) - 1):
        start, end = bounds[k], bounds[k + 1]
        inputs = placeholders if k == 0 else live_after(gm, order, start)
        last = end == len(order)
        outputs = list(pytree.tree_leaves(output.args[0])) if last else live_after(gm, order, end)
        module = _stage_module(gm, inputs, order[start:end], outputs)
        params = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
        param_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        boundary = [] if last else [_boundary(value_name(n), values[n.name]) for n in outputs]
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


def _stage_module(gm: fx.GraphModule, inputs: list[fx.Node], nodes: list[fx.Node], outputs: list[Any]) -> fx.GraphModule:
    """A GraphModule taking ``inputs`` (by their node names), running ``nodes``, returning ``outputs``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(value_name(node))
        env[node].meta = dict(node.meta)
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.get_attr(str(arg.target))
                env[arg].meta = dict(arg.meta)
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[n] if isinstance(n, fx.Node) else n for n in outputs))
    module = fx.GraphModule(gm, graph)
    module.graph.lint()
    return module


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


__all__ = ["Partition", "partition", "load_partition", "PARTITION_FILE"]

