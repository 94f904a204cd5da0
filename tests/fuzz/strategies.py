"""Hypothesis strategy for :class:`ModelSpec`: shape-aware, so every drawn model is valid.

Value shapes exclude the batch dimension: (C, H, W) images, (L, D) sequences, (F,) features and
(L,) int64 token ids. Each step lists every (op, sources) that applies to the live values and
draws one, then its parameters; hypothesis shrinks towards fewer layers and earlier choices.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

from fuzz.spec import ACTIVATIONS, InputSpec, Layer, ModelSpec

Shape = tuple[int, ...]
MAX_ELEMENTS = 2048  # per sample, per value: keeps every model CPU-cheap
_WEIGHTED = {"conv2d", "conv1d", "conv_transpose2d", "linear"}

_SHAPE_KEEPING = [
    "batchnorm",
    "dropout",
    "identity",
    "scale",
    "softmax",
    "same_view",
    "contiguous",
    "layernorm",
]
_SHAPE_KEEPING += sorted(ACTIVATIONS)


def _unary_ops(shape: Shape) -> list[str]:
    ops = list(_SHAPE_KEEPING)
    if len(shape) == 3:
        ops += ["conv2d", "global_pool", "flatten"]
        if shape[1] >= 2 and shape[2] >= 2:
            ops += ["maxpool", "avgpool"]
        if 4 * math.prod(shape) <= MAX_ELEMENTS:
            ops += ["conv_transpose2d", "interpolate"]
    elif len(shape) == 2:
        ops += ["linear", "conv1d", "from_sequence"]
    elif len(shape) == 1:
        ops += ["linear"]
        if any(shape[0] % n == 0 and shape[0] > n for n in (2, 3, 4)):
            ops += ["to_sequence"]
    return ops


@st.composite
def _input(draw: Any) -> InputSpec:
    kind = draw(st.sampled_from(["image", "sequence", "features", "tokens"]))
    if kind == "image":
        size = draw(st.integers(3, 10))
        return InputSpec((draw(st.integers(1, 6)), size, draw(st.sampled_from([size, size + 1]))))
    if kind == "sequence":
        return InputSpec((draw(st.integers(2, 6)), draw(st.integers(2, 12))))
    if kind == "features":
        return InputSpec((draw(st.integers(2, 24)),))
    return InputSpec((draw(st.integers(2, 6)),), "int64")


def _params(draw: Any, op: str, shape: Shape) -> tuple[tuple[str, Any], ...]:
    """Draw an op's parameters for an input of ``shape``."""
    if op == "conv2d":
        out = draw(st.integers(1, 8))
        kernel = draw(st.sampled_from([1, 3] if min(shape[1:]) >= 3 else [1]))
        stride, padding = draw(st.sampled_from([1, 2])), draw(st.sampled_from([0, kernel // 2]))
        groups = draw(st.sampled_from(sorted({1, math.gcd(shape[0], out)})))
        params = {"out": out, "kernel": kernel, "stride": stride, "padding": padding, "groups": groups}
        return _items(params, bias=draw(st.booleans()))
    if op in ("conv_transpose2d", "conv1d", "linear"):
        params = {"out": draw(st.integers(1, 16 if op == "linear" else 8))}
        if op == "conv1d":
            params["kernel"] = draw(st.sampled_from([1, 3]))
        return _items(params, bias=draw(st.booleans()))
    if op == "scale":
        factor, offset = draw(st.sampled_from([1.0, 2.0, -0.5])), draw(st.sampled_from([0.0, 0.25]))
        return _items({"factor": factor, "offset": offset})
    if op == "to_sequence":
        return _items(
            {"length": draw(st.sampled_from([n for n in (2, 3, 4) if shape[0] % n == 0 and shape[0] > n]))}
        )
    if op == "embedding":
        return _items({"dim": draw(st.integers(2, 12))})
    return ()


def out_shape(layer: Layer, shapes: list[Shape]) -> Shape:
    """The shape (without batch) of a layer's result, from the shapes of its sources."""
    op, p, shape = layer.op, layer.param, shapes[layer.srcs[0]]
    if op == "conv2d":
        size = lambda n: (n + 2 * p("padding") - p("kernel")) // p("stride") + 1  # noqa: E731
        return (p("out"), size(shape[1]), size(shape[2]))
    if op in ("conv_transpose2d", "interpolate"):
        return (p("out", shape[0]), shape[1] * 2, shape[2] * 2)
    if op == "conv1d":
        return (p("out"), shape[1])
    if op == "linear":
        return (*shape[:-1], p("out"))
    if op == "to_sequence":
        return (p("length"), shape[0] // p("length"))
    if op == "embedding":
        return (*shape, p("dim"))
    if op == "concat":
        axis = 0 if len(shape) == 3 else len(shape) - 1
        return tuple(x + y if k == axis else x for k, (x, y) in enumerate(zip(shape, shapes[layer.srcs[1]])))
    if op == "attention_scores":
        return (shape[0], shape[0])
    if op in ("maxpool", "avgpool"):
        return (shape[0], shape[1] // 2, shape[2] // 2)
    if op == "global_pool":
        return (shape[0],)
    if op in ("flatten", "from_sequence"):
        return (math.prod(shape),)
    return shape


def _items(params: dict[str, Any], **more: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted({**params, **more}.items()))


def _binary_candidates(values: list[tuple[Shape, str]]) -> list[tuple[str, tuple[int, int]]]:
    out = []
    floats = [(i, s) for i, (s, dtype) in enumerate(values) if dtype == "float32"]
    for i, a in floats:
        for j, b in floats:
            if a == b:
                out += [("add", (i, j)), ("mul", (i, j))]
                if len(a) == 2:
                    out.append(("attention_scores", (i, j)))
            concat_axis = 0 if len(a) == 3 else len(a) - 1
            if (
                i < j
                and len(a) == len(b)
                and all(x == y for k, (x, y) in enumerate(zip(a, b)) if k != concat_axis)
            ):
                out.append(("concat", (i, j)))
    return out


@st.composite
def model_specs(draw: Any, max_layers: int = 8) -> ModelSpec:
    inputs = tuple(draw(st.lists(_input(), min_size=1, max_size=2)))
    values: list[tuple[Shape, str]] = [(i.shape, i.dtype) for i in inputs]
    layers: list[Layer] = []
    for _ in range(draw(st.integers(1, max_layers) | st.just(max_layers))):
        unary = [(op, (i,)) for i, (s, d) in enumerate(values) if d == "float32" for op in _unary_ops(s)]
        unary += [c for c in unary if c[0] in _WEIGHTED] * 3  # layers with weights are what passes rewrite
        unary += [("embedding", (i,)) for i, (_, d) in enumerate(values) if d == "int64"]
        op, srcs = draw(st.sampled_from(unary + _binary_candidates(values)))
        params = _params(draw, op, values[srcs[0]][0]) if len(srcs) == 1 else ()
        shape = out_shape(Layer(op, srcs, params), [v[0] for v in values])
        if math.prod(shape) > MAX_ELEMENTS or 0 in shape:
            continue
        layers.append(Layer(op, srcs, params))
        values.append((shape, "float32"))
        if op in _WEIGHTED and draw(st.booleans()):  # conv/linear -> BN: what fold_batchnorm looks for
            layers.append(Layer("batchnorm", (len(values) - 1,)))
            values.append((shape, "float32"))
    floats = [i for i, (_, d) in enumerate(values) if d == "float32"]
    last = len(values) - 1 if values[-1][1] == "float32" else floats[-1] if floats else None
    if last is None:  # only token ids: embed them so the model has a float output
        layers.append(Layer("embedding", (0,), _items({"dim": 4})))
        last = len(values)
    extra = draw(st.lists(st.sampled_from(floats), max_size=2, unique=True)) if floats else []
    outputs = tuple(dict.fromkeys([last, *extra]))
    return ModelSpec(
        inputs,
        tuple(layers),
        outputs,
        batch=draw(st.integers(1, 3)),
        dynamic_batch=draw(st.sampled_from([True, False])),
    )


def value_shapes(spec: ModelSpec) -> list[Shape]:
    """Shapes of every value of a spec (for building its modules)."""
    shapes: list[Shape] = [i.shape for i in spec.inputs]
    for layer in spec.layers:
        shapes.append(out_shape(layer, shapes))
    return shapes
