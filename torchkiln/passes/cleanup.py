"""``cleanup``: remove what computes nothing.

Five rewrites, in order, on both graph flavours (module calls and ATen calls; the fourth on ATen only):

1. **No-ops in eval mode** — ``Dropout`` (module not training, or ``training=False``), ``Identity``,
   ``x.contiguous()``, and arithmetic identities ``x * 1``, ``1 * x``, ``x + 0``, ``0 + x``,
   ``x - 0``, ``x / 1`` when the result has the same shape and dtype as ``x`` (so a promotion such
   as ``bool * 1 -> int64`` or a broadcast is never dropped). ``y = op(x)`` becomes ``y = x``.
2. **Redundant reshapes** — ``reshape(reshape(x, a), b) -> reshape(x, b)`` when the inner result
   has no other user; a reshape/view/flatten whose output shape equals its input shape is dropped.
   With dynamic axes that equality must also hold at a second size along those axes, so
   ``x.view(1, -1)`` traced at batch 1 is kept.
3. **Constant folding** — a node whose inputs are all parameters, buffers or constants (and that
   is neither random nor side-effecting) is evaluated once and replaced by a buffer, unless the
   result is larger than both its inputs and ``max_constant_bytes``.
4. **Repeated key/value heads** — grouped-query attention written as transformers' ``repeat_kv``
   (``unsqueeze(kv, 2).expand(b, h, n, t, d).reshape(b, h * n, t, d)``) feeding
   ``scaled_dot_product_attention``: the attention reads the ``h`` heads themselves with
   ``enable_gqa=True`` (query head i uses key/value head i // n, exactly what the copy did). The
   copy of the whole cache per layer and step goes; ONNX opset 23 emits one ``Attention`` op.
5. **Dead code** — nodes whose results are unused, then the parameters/submodules nobody reads.
"""

from __future__ import annotations

import dataclasses
import operator
import sys
from collections.abc import Container
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from torchkiln.compiler import graph as G
from torchkiln.compiler.options import option
from torchkiln.compiler.passes import Pass, PassConfig, PassResult, register_pass
from torchkiln.compiler.program import Program

aten = torch.ops.aten

_DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
# target -> (index, keyword, default) of its "training" argument
_DROPOUT_FUNCTIONS: dict[Any, tuple[int, str, bool]] = {
    F.dropout: (2, "training", True),
    F.dropout1d: (2, "training", True),
    F.dropout2d: (2, "training", True),
    F.dropout3d: (2, "training", True),
    F.alpha_dropout: (2, "training", False),
    torch.dropout: (2, "train", True),
    aten.dropout.default: (2, "train", True),
}
# op -> (identity constant, constant may be on the left)
_IDENTITIES: dict[Any, tuple[float, bool]] = {}
for _ops, _identity in (
    ((operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar, "mul"), (1, True)),
    ((operator.add, torch.add, aten.add.Tensor, aten.add.Scalar, "add"), (0, True)),
    ((operator.sub, torch.sub, aten.sub.Tensor, aten.sub.Scalar, "sub"), (0, False)),
    ((operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar, "div"), (1, False)),
):
    _IDENTITIES.update(dict.fromkeys(_ops, _identity))

_FULL_RESHAPES = {
    "view",
    "reshape",
    torch.reshape,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
}
_RESHAPES = _FULL_RESHAPES | {"flatten", torch.flatten, aten.flatten.using_ints}
_RANDOM_WORDS = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "empty", "poisson")


@dataclasses.dataclass(frozen=True)
class CleanupConfig(PassConfig):
    remove_noops: bool = option(
        True, "drop eval-mode Dropout, Identity, contiguous and x*1 / x+0 style no-ops"
    )
    simplify_reshapes: bool = option(True, "collapse reshape chains and drop reshapes to the same shape")
    fold_constants: bool = option(True, "evaluate subgraphs that depend only on parameters/constants")
    group_attention: bool = option(
        True, "attention over key/value heads repeated for grouped-query attention reads the heads themselves"
    )
    max_constant_bytes: int = option(
        1 << 16, "a folded constant may exceed its inputs' size up to this many bytes"
    )

    def validate(self) -> None:
        if self.max_constant_bytes < 0:
            self.fail("max_constant_bytes", f"must be >= 0, got {self.max_constant_bytes}")


@register_pass
class Cleanup(Pass):
    """Dead code, eval-mode no-ops, redundant reshapes and constant subgraphs."""

    name = "cleanup"
    Config = CleanupConfig

    def run(self, program: Program) -> PassResult:
        config: CleanupConfig = self.config  # type: ignore[assignment]
        gm = program.graph_module
        stats: dict[str, int | float] = {}
        if config.remove_noops:
            stats["noops_removed"] = remove_noops(gm)
        if config.simplify_reshapes:
            stats["reshapes_removed"] = simplify_reshapes(program)
        if config.fold_constants:
            stats["constants_folded"] = fold_constants(gm, config.max_constant_bytes)
        if config.group_attention:
            stats["repeated_kv_removed"] = group_attention(gm)
        stats["dead_nodes_removed"] = remove_dead_code(gm)
        return PassResult(modified=any(stats.values()), stats=stats)


def _arg(node: fx.Node, index: int, keyword: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(keyword, default)


def _same_tensor_type(a: Any, b: fx.Node) -> bool:
    shape_a, shape_b = G.shape_of(a), G.shape_of(b)
    return shape_a is not None and shape_a == shape_b and G.dtype_of(a) == G.dtype_of(b)


def noop_source(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input that ``node`` merely passes through, or None if it computes something."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return _arithmetic_identity(node)  # 1 * x has the constant first
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.Identity) or (isinstance(module, _DROPOUT_MODULES) and not module.training):
            return first
        return None
    if node.op == "call_method" and node.target == "contiguous":
        return first
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        return None if _arg(node, *_DROPOUT_FUNCTIONS[node.target]) else first
    return _arithmetic_identity(node)


def _arithmetic_identity(node: fx.Node) -> fx.Node | None:
    if node.op not in ("call_function", "call_method") or node.target not in _IDENTITIES:
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    identity, commutative = _IDENTITIES[node.target]
    left, right = node.args
    for tensor, constant in ((left, right), (right, left)) if commutative else ((left, right),):
        is_number = isinstance(constant, (int, float)) and not isinstance(constant, bool)
        if (
            is_number
            and constant == identity
            and isinstance(tensor, fx.Node)
            and _same_tensor_type(tensor, node)
        ):
            return tensor
    return None


def remove_noops(gm: fx.GraphModule) -> int:
    removed = 0
    for node in list(gm.graph.nodes):
        source = noop_source(node, gm)
        if source is not None:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            removed += 1
    return removed


def _is_reshape(node: Any, kinds: set[Any] = _RESHAPES) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_method", "call_function") and node.target in kinds


def simplify_reshapes(program: Program) -> int:
    gm = program.graph_module
    removed = 0
    for node in list(gm.graph.nodes):
        inner = node.args[0] if node.args else None
        if (
            _is_reshape(node, _FULL_RESHAPES)
            and isinstance(inner, fx.Node)
            and _is_reshape(inner)
            and len(inner.users) == 1
        ):
            node.update_arg(0, inner.args[0])
            if node.target == "view":
                node.target = "reshape"  # view of a non-contiguous input would fail; reshape never does
            elif node.target is aten.view.default:
                node.target = aten.reshape.default
            gm.graph.erase_node(inner)
            removed += 1
    candidates = [n for n in gm.graph.nodes if _is_reshape(n) and _same_tensor_type(n.args[0], n)]
    if candidates and len(program.checks) > 1:
        gm.recompile()
        for check in program.checks[1:]:  # a no-op at every checked size (widened, a cached LM's prompt step)
            G.annotate(gm, check.inputs)
            candidates = [n for n in candidates if G.shape_of(n) == G.shape_of(n.args[0])]
        G.annotate(gm, program.example_inputs)
    for node in candidates:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        removed += 1
    return removed


def _foldable(node: fx.Node, constant: Container[fx.Node]) -> bool:
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    name = str(getattr(node.target, "__name__", node.target)).lower()
    if any(word in name for word in _RANDOM_WORDS):
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(n in constant for n in inputs)


def fold_constants(gm: fx.GraphModule, max_bytes: int) -> int:
    values: dict[fx.Node, Any] = {}
    roots: dict[fx.Node, frozenset[fx.Node]] = {}  # the stored tensors each constant derives from
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = G.get_attr_value(gm, str(node.target))
            roots[node] = frozenset([node])
        elif _foldable(node, values):
            values[node] = _evaluate(node, values)
            roots[node] = frozenset().union(*(roots[n] for n in node.all_input_nodes))
    folded = 0
    for node, value in values.items():
        if node.op == "get_attr" or not isinstance(value, torch.Tensor):
            continue
        if all(user in values for user in node.users):
            continue  # folded as part of a larger constant
        if _nbytes(value) > max(max_bytes, sum(_nbytes(values[r]) for r in roots[node])):
            continue  # e.g. an expand: storing the result would grow the model
        from_parameter = any(isinstance(values[r], nn.Parameter) for r in roots[node])
        name = G.add_attribute(gm, f"folded_{node.name}", value, parameter=from_parameter)
        with gm.graph.inserting_before(node):
            replacement = gm.graph.get_attr(name)
        node.replace_all_uses_with(replacement)
        folded += 1
    return folded


def _evaluate(node: fx.Node, values: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda n: values[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
    with torch.no_grad():
        if node.op == "call_method":
            self_value, *rest = args
            return getattr(self_value, str(node.target))(*rest, **kwargs)
        return node.target(*args, **kwargs)  # type: ignore[operator]


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


_ATTENTION = (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)


def _impure(node: fx.Node) -> bool:
    """FX's impurity, except attention without dropout: torch tags SDPA nondeterministic for its
    ``dropout_p``, which would keep an unused attention (and all that feeds it) alive."""
    if node.op == "call_function" and node.target in _ATTENTION and _arg(node, 4, "dropout_p", 0.0) == 0:
        return False
    return node.is_impure()


def group_attention(gm: fx.GraphModule) -> int:
    """Attention nodes whose keys and values were repeated from fewer heads, now reading those."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            continue
        if node.kwargs.get("enable_gqa", False) or len(node.args) < 3:
            continue
        key, value = _repeated_heads(node.args[1]), _repeated_heads(node.args[2])
        if key is None or value is None or key[1] != value[1]:
            continue
        node.update_arg(1, key[0])
        node.update_arg(2, value[0])
        node.update_kwarg("enable_gqa", True)
        changed += 1
    return changed


def _repeated_heads(node: Any) -> tuple[fx.Node, int] | None:
    """(x, n) when ``node`` is ``reshape(expand(unsqueeze(x, 2), [b, h, n, t, d]), [b, h * n, t, d])``
    (full slices in between pass through), from the traced shapes."""
    if not _is_reshape(node, {aten.reshape.default, aten.view.default, aten._unsafe_view.default}):
        return None
    expanded = _through_full_slices(node.args[0])
    if not (isinstance(expanded, fx.Node) and expanded.target is aten.expand.default):
        return None
    unsqueezed = _through_full_slices(expanded.args[0])
    if not (isinstance(unsqueezed, fx.Node) and unsqueezed.target is aten.unsqueeze.default):
        return None
    source = unsqueezed.args[0]
    if unsqueezed.args[1] != 2 or not isinstance(source, fx.Node):
        return None
    shapes = G.shape_of(source), G.shape_of(expanded), G.shape_of(node)
    if any(s is None for s in shapes):
        return None
    kv, repeated, out = shapes
    assert kv is not None and repeated is not None and out is not None
    if len(kv) != 4 or len(repeated) != 5 or repeated[:2] != kv[:2] or repeated[3:] != kv[2:]:
        return None
    b, h, t, d = kv
    n = repeated[2]
    return (source, n) if out == (b, h * n, t, d) else None


def _through_full_slices(node: Any) -> Any:
    """``x`` for ``x[..., 0:, ...]`` chains (``aten.slice(x, dim, 0, <max>)``), else ``node``."""
    while (
        isinstance(node, fx.Node)
        and node.target is aten.slice.Tensor
        and tuple(node.args[2:]) in ((), (0,), (0, sys.maxsize), (None, None), (0, None), (0, sys.maxsize, 1))
        and not node.kwargs
    ):
        node = node.args[0]
    return node


def remove_dead_code(gm: fx.GraphModule) -> int:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=_impure)
    removed = before - len(gm.graph.nodes)
    G.drop_unused_attributes(gm)
    return removed
