"""Where an optimized program can be cut into pipeline stages, and the graph of each stage.

Every compute node is one of three kinds:

- **constant**: computed from weights and literals only (an int8 weight's ``dequantize_per_channel``,
  ``arange(16)``, a folded mask). A constant never crosses a cut: each stage that reads one
  recomputes it from its own copy of the weights, as it reads its own weights.
- **shape**: a size of an activation (``aten.sym_size.int``, ``x.size(0)``, ``x.shape``) or
  arithmetic on sizes. A shape never crosses either: the stage that reads it rebuilds it from a
  tensor it receives whose axis has that size, at the example's batch and at a probe batch one
  larger (so a batch size is never confused with a constant that happens to equal it).
- **requantize**: an int8 quantize / dequantize of an activation (and the ``choose_qparams`` of
  dynamic quantization). The float activation it reads crosses instead and each stage that reads
  the pair runs it again (the same scale, the same rounding): an int8 stage keeps every Q/DQ pair
  with the node it feeds, so ONNX Runtime still sees its QDQ pattern, and a cut can still fall
  inside a residual block whose skip path is quantized.
- **activation**: everything else, in topological order; cuts fall between activations.

A position is *legal* when every value crossing it is an activation tensor (neither a quantize nor
a dequantize output) that, when the batch is dynamic, carries the batch on axis 0 and nothing else
that varies with it; and when every shape the rest of the program reads can be rebuilt from what
crosses.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

Kind = str  # "constant" | "shape" | "requantize"
_SHAPE_LEAVES = (torch.ops.aten.sym_size.int,)


@dataclasses.dataclass
class Program:
    """A graph with its values at the example inputs (and a probe batch when the batch is dynamic)."""

    gm: fx.GraphModule
    placeholders: list[fx.Node]
    order: list[fx.Node]  # activations, in topological order
    kinds: dict[fx.Node, Kind]  # constants, shapes, Q/DQ pairs: recomputed by each stage that reads them
    values: dict[str, Any]
    probe: dict[str, Any] | None
    batch: tuple[int, int] | None  # (example batch, probe batch)

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.order)}
        self._reads: dict[fx.Node, int] = {}
        self.leaves = [n for n, k in self.kinds.items() if k == "shape" and _is_leaf(n)]
        self.leaf_use = {leaf: self._last_use(leaf) for leaf in self.leaves}

    def _last_use(self, node: fx.Node) -> int:
        """The last activation (``len(order)``: the output) that reads ``node`` through shapes; -1: none."""
        last, stack, seen = -1, list(node.users), set()
        while stack:
            user = stack.pop()
            if user not in seen:
                seen.add(user)
                if user.op == "output":
                    last = len(self.order)
                elif user in self.index:
                    last = max(last, self.index[user])
                elif user in self.kinds:
                    stack.extend(user.users)
        return last

    def defined_before(self, node: fx.Node, position: int) -> bool:
        return node.op == "placeholder" or self.index.get(node, len(self.order)) < position

    def live(self, position: int) -> list[fx.Node]:
        """Activations defined before ``order[position]`` and read at or after it, directly or
        through a Q/DQ pair (a size read off one is rebuilt, not received)."""
        return [n for n in [*self.placeholders, *self.order[:position]] if self.read_from(n) >= position]

    def read_from(self, node: fx.Node) -> int:
        """The last position that reads ``node``'s value (``len(order)``: the output), -1: none."""
        if node not in self._reads:
            last, stack = -1, list(node.users)
            while stack:
                user = stack.pop()
                if user.op == "output":
                    last = len(self.order)
                elif user in self.index:
                    last = max(last, self.index[user])
                elif self.kinds.get(user) == "requantize":
                    stack.extend(user.users)
            self._reads[node] = last
        return self._reads[node]

    def crossing_reason(self, node: fx.Node) -> str | None:
        """Why ``node`` may not cross a cut, or None."""
        value = self.values.get(node.name)
        if not isinstance(value, torch.Tensor):
            return f"'{node.name}' is not a tensor ({type(value).__name__})"
        if node.op == "call_function" and "quantize_per_" in str(node.target):
            return f"'{node.name}' is one side of an int8 quantize/dequantize pair"
        if self.batch is not None and self.probe is not None:
            probe = self.probe.get(node.name)
            if not (isinstance(probe, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.batch[0]
                    and probe.shape[0] == self.batch[1] and probe.shape[1:] == value.shape[1:]):  # fmt: skip
                return f"'{node.name}' {list(value.shape)} does not carry the batch on axis 0 alone"
        return None

    def axis_for(self, leaf: fx.Node, tensors: list[fx.Node]) -> tuple[fx.Node, int | None] | None:
        """A tensor among ``tensors`` (and its axis; None: the whole shape) whose size is ``leaf``'s
        value at the example and at the probe."""
        want, want_probe = self.values.get(leaf.name), (self.probe or {}).get(leaf.name)
        for node in tensors:
            value, probe = self.values.get(node.name), (self.probe or {}).get(node.name)
            if not isinstance(value, torch.Tensor):
                continue
            shapes = [tuple(value.shape)] + ([tuple(probe.shape)] if isinstance(probe, torch.Tensor) else [])
            if self.probe is not None and len(shapes) < 2:
                continue
            wanted = [want] + ([want_probe] if self.probe is not None else [])
            if isinstance(want, (tuple, list)):
                if all(isinstance(w, (tuple, list)) and tuple(w) == s for w, s in zip(wanted, shapes)):
                    return node, None
                continue
            for axis in range(len(shapes[0])):
                if all(s[axis] == w for s, w in zip(shapes, wanted)):
                    return node, axis
        return None

    def cut_reason(self, position: int) -> str | None:
        """Why the program may not be cut before ``order[position]``, or None when it may."""
        live = self.live(position)
        for node in live:
            reason = self.crossing_reason(node)
            if reason:
                return reason
        for leaf in self.leaves:
            source = leaf.args[0]
            if (self.leaf_use[leaf] >= position and isinstance(source, fx.Node) and self.defined_before(source, position)
                    and source not in live and self.axis_for(leaf, live) is None and self.probe is not None):  # fmt: skip
                return f"no tensor crossing carries the size '{leaf.name}'"
        return None

    def legal(self) -> dict[int, int]:
        """Legal positions and the bytes that cross each."""
        result = {}
        for position in range(1, len(self.order)):
            if self.cut_reason(position) is None:
                result[position] = sum(tensor_bytes(self.values[n.name]) for n in self.live(position))
        return result


def analyse(gm: fx.GraphModule, flat: tuple[torch.Tensor, ...], batched: list[bool]) -> Program:
    """Run ``gm`` on ``flat`` (and, when some input is ``batched`` on axis 0, on a probe batch
    one larger) and sort its nodes into activations, constants and shapes."""
    values = run(gm, flat)
    probe, batch = None, None
    if any(batched):
        sizes = {t.shape[0] for t, b in zip(flat, batched) if b}
        if len(sizes) == 1:
            size = sizes.pop()
            grown = tuple(torch.cat([t, t[:1]]) if b else t for t, b in zip(flat, batched))
            probe, batch = run(gm, grown), (size, size + 1)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kinds = _kinds(gm, values)
    order = [n for n in gm.graph.nodes if n.op.startswith("call_") and n not in kinds]
    return Program(gm, placeholders, order, kinds, values, probe, batch)


def run(gm: fx.GraphModule, flat: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Every node's value on ``flat``, by node name."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n.name] = result = super().run_node(n)
            return result

    with torch.no_grad():
        Recorder(gm).run(*flat)
    return values


def _kinds(gm: fx.GraphModule, values: dict[str, Any]) -> dict[fx.Node, Kind]:
    kinds: dict[fx.Node, Kind] = {}
    reads_input: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            reads_input.add(node)
        if not node.op.startswith("call_"):
            continue
        if not any(a in reads_input for a in node.all_input_nodes):
            if not _impure(node):
                kinds[node] = "constant"
            continue
        reads_input.add(node)
        if _is_requantize(node, kinds):
            kinds[node] = "requantize"
        elif _is_size(values.get(node.name)) and (
            _is_leaf(node) or all(a in kinds for a in node.all_input_nodes)
        ):
            kinds[node] = "shape"
    return kinds


def _is_requantize(node: fx.Node, kinds: dict[fx.Node, Kind]) -> bool:
    """An int8 quantize / dequantize / choose_qparams of an activation, or an item of one's result."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return kinds.get(node.args[0]) == "requantize"  # type: ignore[arg-type]
    name = str(node.target)
    return "quantized_decomposed." in name and ("quantize_per_" in name or "choose_qparams" in name)


def _impure(node: fx.Node) -> bool:
    """A node to run once, where it is (an assertion, a random draw): never duplicated."""
    return node.op == "call_function" and node.is_impure()


def _is_size(value: Any) -> bool:
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return True
    return isinstance(value, (tuple, list, torch.Size)) and bool(value) and all(_is_size(v) for v in value)


def _is_leaf(node: fx.Node) -> bool:
    """A size read off a tensor: ``aten.sym_size.int(t, d)``, ``t.size()``, ``t.size(d)``, ``t.shape``."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_function" and node.target in _SHAPE_LEAVES:
        return True
    if node.op == "call_method" and node.target == "size":
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or a structure of them)."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def stage_module(program: Program, inputs: list[fx.Node], nodes: list[fx.Node], outputs: list[Any],
                 name: Any) -> fx.GraphModule:  # fmt: skip
    """A GraphModule taking ``inputs`` (named by ``name(node)``), running ``nodes`` and returning
    ``outputs``; the constants and shapes they read are recomputed inside it."""
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for node in inputs:
        env[node] = graph.placeholder(name(node))
        env[node].meta = dict(node.meta)

    def get(arg: fx.Node) -> Any:
        if arg not in env:
            if arg.op == "get_attr":
                env[arg] = graph.get_attr(str(arg.target))
                env[arg].meta = dict(arg.meta)
            elif program.kinds.get(arg) == "shape" and _is_leaf(arg) and arg.args[0] not in env:
                env[arg] = _rebuild(program, arg, inputs, env, graph)
            elif arg in program.kinds:
                env[arg] = graph.node_copy(arg, get)
            else:
                raise AssertionError(f"stage reads '{arg.name}', which it neither computes nor receives")
        return env[arg]

    for node in nodes:
        env[node] = graph.node_copy(node, get)
    graph.output(tuple(get(n) if isinstance(n, fx.Node) else n for n in outputs))
    module = fx.GraphModule(program.gm, graph)
    module.graph.lint()
    return module


def _rebuild(program: Program, leaf: fx.Node, inputs: list[fx.Node], env: dict[fx.Node, Any], graph: fx.Graph) -> Any:
    """``leaf`` (a size of a tensor this stage does not receive) read off a tensor it does receive;
    a static program (no probe batch) may take the example's value as it is."""
    found = program.axis_for(leaf, inputs)
    if found is None:
        assert program.probe is None, f"no input carries the size '{leaf.name}'"
        return program.values[leaf.name]
    source, axis = found
    if axis is None:
        return graph.call_function(getattr, (env[source], "shape"))
    if leaf.op == "call_function" and leaf.target in _SHAPE_LEAVES:
        return graph.call_function(leaf.target, (env[source], axis))
    return graph.call_method("size", (env[source], axis))


__all__ = ["Program", "analyse", "run", "stage_module"]
