"""fp16 / bf16 conversion with a keep-in-fp32 list and fp32 inputs and outputs.

Every op runs in the low precision except those named in ``keep_fp32`` (normalisations, softmax,
reductions by default: their sums and variances lose too much in 10 mantissa bits). ``router`` in
``keep_fp32`` (a default) keeps a mixture-of-experts router in float32: every ``topk`` and the ops
from the projection that scores the experts to it (linear → softmax/sigmoid → topk): a score
rounded to 10 bits can swap which experts a token goes to, and a swapped expert is not a rounding
error. Parameters of
low-precision ops are stored in the low precision. Casts are inserted exactly where a value's dtype
differs from what its consumer runs in, found by running the graph once on the example inputs::

    x (fp32 input) → x.to(fp16) → conv (fp16 weights) → relu → y.to(fp32) → layer_norm → … → fp32 out
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from torchkiln.compiler import graph as G

ROUTER = "router"  # not an op: the ops that score and pick experts (see _routing)
DEFAULT_KEEP_FP32 = (
    "layer_norm", "batch_norm", "group_norm", "instance_norm", "softmax", "log_softmax",
    "mean", "sum", "var", "std", "norm", "cumsum", "logsumexp", "mse_loss", "cross_entropy", ROUTER,
)  # fmt: skip


def op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """``LayerNorm`` / ``aten.native_layer_norm`` / ``.softmax`` → ``layer_norm`` / ``softmax``."""
    key = G.op_key(node, gm) or ""
    key = key.removeprefix("aten.").lstrip("._")
    key = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower() if node.op == "call_module" else key
    key = re.sub(r"_?[123]d$", "", key)
    return key.removeprefix("native_").removeprefix("_")


def convert(
    gm: fx.GraphModule, dtype: torch.dtype, keep_fp32: Iterable[str], example: tuple[torch.Tensor, ...], fp32_io: bool
) -> tuple[int, int]:
    """Convert ``gm`` in place; returns (ops in low precision, ops kept in fp32)."""
    _drop_dtype_assertions(gm)
    keep = set(keep_fp32)
    wants: dict[fx.Node, torch.dtype] = {}
    for node in gm.graph.nodes:
        if node.op.startswith("call_"):
            wants[node] = torch.float32 if op_name(node, gm) in keep else dtype
    if ROUTER in keep:
        wants.update(dict.fromkeys(_routing(gm), torch.float32))
    for node in gm.graph.nodes:
        if node.op == "call_module" and wants[node] is dtype:
            gm.get_submodule(str(node.target)).to(dtype)
        elif node.op == "get_attr" and node.users and all(wants.get(u) is dtype for u in node.users):
            _convert_attribute(gm, str(node.target), dtype)
    _Caster(gm, wants, torch.float32 if fp32_io else dtype).run(*(t.clone() for t in example))
    low = sum(1 for w in wants.values() if w is dtype)
    return low, len(wants) - low


_SCORES = {"linear", "addmm", "mm", "matmul", "bmm"}


def _routing(gm: fx.GraphModule, depth: int = 8) -> list[fx.Node]:
    """Every ``topk`` and, where its input comes from a projection within ``depth`` ops (through
    each op's first input), the ops from that projection to it."""
    found: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or op_name(node, gm) != "topk":
            continue
        found.append(node)
        path: list[fx.Node] = []
        current = node.args[0] if node.args else None
        for _ in range(depth):
            if not isinstance(current, fx.Node) or not current.op.startswith("call_"):
                break
            path.append(current)
            if op_name(current, gm) in _SCORES:
                found.extend(path)
                break
            current = next((a for a in current.args if isinstance(a, fx.Node)), None)
    return list(dict.fromkeys(found))


def _drop_dtype_assertions(gm: fx.GraphModule) -> None:
    """torch.export records ``x.to(dtype)`` with ``_assert_tensor_metadata(x, dtype=float32)``: a
    check of the dtypes at trace time, which this conversion changes on purpose."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)


_FLOAT_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout}


def _retarget_float_cast(node: fx.Node, value: Any, dtype: torch.dtype) -> None:
    """A cast from one float dtype to another (``x.to(self.weight.dtype)``, ``x.float()``) was
    written for the dtypes at trace time; in a converted graph it casts to what its op runs in.
    Casts to or from integers keep their meaning and are left alone."""
    if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        return
    if node.op == "call_method" and node.target in ("float", "double", "half", "bfloat16"):
        node.target, node.args = "to", (node.args[0], dtype)
    elif node.op == "call_method" and node.target == "to" or node.target in _FLOAT_CASTS:
        args: list[Any] = list(node.args)
        if len(args) > 1 and isinstance(args[1], torch.dtype) and args[1].is_floating_point:
            args[1] = dtype
        kwargs: dict[str, Any] = dict(node.kwargs)
        cast_to = kwargs.get("dtype")
        if isinstance(cast_to, torch.dtype) and cast_to.is_floating_point:
            kwargs["dtype"] = dtype
        node.args, node.kwargs = tuple(args), kwargs


_FILLS = {torch.ops.aten.masked_fill.Scalar, torch.ops.aten.masked_fill_.Scalar, torch.ops.aten.fill.Scalar}


def _clamp_fill_value(node: fx.Node, dtype: torch.dtype) -> None:
    """Masks fill with ``torch.finfo(float32).min`` as "minus infinity"; in fp16 that value
    overflows (torch raises), so it becomes the low dtype's own extreme, which plays the same role."""
    if node.target not in _FILLS or not dtype.is_floating_point:
        return
    position = len(node.args) - 1
    value = node.args[position]
    limit = torch.finfo(dtype).max
    if isinstance(value, float) and math.isfinite(value) and abs(value) > limit:
        node.args = (*node.args[:position], math.copysign(limit, value))


def _convert_attribute(gm: fx.GraphModule, target: str, dtype: torch.dtype) -> None:
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    value = getattr(module, leaf)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        converted = value.detach().to(dtype)
        if isinstance(value, torch.nn.Parameter):
            setattr(module, leaf, torch.nn.Parameter(converted, requires_grad=False))
        else:
            setattr(module, leaf, converted)


class _Caster(fx.Interpreter):
    """Runs the graph once, inserting a cast wherever a float input's dtype differs from what its
    consumer runs in (outputs: ``output_dtype``)."""

    def __init__(self, gm: fx.GraphModule, wants: dict[fx.Node, torch.dtype], output_dtype: torch.dtype):
        super().__init__(gm)
        self.graph: fx.Graph = gm.graph
        self.wants, self.output_dtype = wants, output_dtype
        self.casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}

    def run_node(self, n: fx.Node) -> Any:
        want = self.output_dtype if n.op == "output" else self.wants.get(n)
        if want is not None:
            for arg in list(n.all_input_nodes):
                value = self.env.get(arg)
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != want:
                    n.replace_input_with(arg, self._cast(arg, want, n))
            if n.op != "output" and n.all_input_nodes:
                _retarget_float_cast(n, self.env.get(n.all_input_nodes[0]), want)
                _clamp_fill_value(n, want)
        with torch.no_grad():
            return super().run_node(n)

    def _cast(self, arg: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
        key = (arg, dtype)
        if key not in self.casts:
            with self.graph.inserting_before(before):
                self.casts[key] = self.graph.call_method("to", (arg, dtype))
            self.env[self.casts[key]] = self.env[arg].to(dtype)
        return self.casts[key]
