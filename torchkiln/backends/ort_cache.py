"""The KV cache in place on ONNX Runtime: generation without copying the cache every step.

An artifact's graph takes each cache tensor ``past_*`` [batch, kv heads, past, head] and returns the
next one, ``present_*`` = ``Concat(past, new)``, which attention then reads: every decode step copies
the whole cache once more. For generation the graph is rewritten in memory (the artifact's files are
never touched) into ONNX Runtime's ``GroupQueryAttention`` over a buffer that holds ``capacity``
positions and is bound, with IO binding, as both the past input and the present output of its layer:
each step writes only its new positions into the buffer (what ONNX Runtime GenAI does on the CPU).

The rewrite applies to the form the exporter writes at opset 23: ``Attention(Q, Concat(past_k, k),
Concat(past_v, v), mask)`` with 4-D inputs, where both Concats are the layer's present outputs and
read by nothing else. Q, the new key and value go in as [batch, sequence, heads x head]; the mask,
boolean or additive, becomes GroupQueryAttention's ``attention_bias`` (GroupQueryAttention applies
causality itself, consistent with the mask's); scale and softcap carry over. The number of positions
already cached — which the graph otherwise reads from the past's shape — is a new input, so every
``Shape`` of a past input answers [batch, heads, cached, head] as before. Any other form (opset 18's
decomposed attention, cross-attention, a past read by something else, a GPU provider, a model over
2 GB) is left as it is: the caller then passes the cache in and out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from torchkiln.backends.base import CacheSession
from torchkiln.errors import BackendError

#: the rewritten graph's extra input: how many positions the cache holds before this step
PAST_LENGTH = "torchkiln_past_length"
#: and its extra output: how many it holds after the step (checked against the step's tokens)
CACHED_LENGTH = "torchkiln_cached_length"
_PREFIX = "torchkiln_cache"
_TWO_GB = 2**31 - 1


def shared_cache_model(model: Any, pairs: Sequence[tuple[str, str]]) -> Any | None:
    """A copy of ``model`` (onnx ModelProto) whose attention over each (past input, present output)
    of ``pairs`` runs in place (see the module docstring), or None when the graph has another form."""
    import onnx

    if model.ByteSize() > _TWO_GB:
        return None
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's stays as it was
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    shapes = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input, *graph.output]}
    present_of = dict(pairs)
    rewritten: set[str] = set()
    added: list[Any] = []
    removed: set[int] = set()
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        layer = _attention_layer(node, producer, readers, shapes, present_of)
        if layer is None:
            continue
        removed |= {id(node), id(layer["key_concat"]), id(layer["value_concat"])}
        rewritten |= {layer["past_key"], layer["past_value"]}
        added += _group_query_attention(node, layer, len(rewritten) // 2)
    if not rewritten or rewritten != set(present_of):
        return None  # every cache tensor in place, or none: a half-shared cache would be two conventions
    for name in rewritten:
        others = [n for n in readers.get(name, []) if id(n) not in removed]
        if any(n.op_type != "Shape" for n in others):
            return None
        for shape in others:
            removed.add(id(shape))
            added += _cached_shape(shape)
    for output in graph.output:
        if output.name in present_of.values():
            dims = output.type.tensor_type.shape.dim
            if len(dims) == 4:
                dims[2].Clear()
                dims[2].dim_param = "capacity"
    taken = {i.name for i in graph.input} | {o.name for o in graph.output}
    if PAST_LENGTH in taken or CACHED_LENGTH in taken:
        return None
    graph.input.append(onnx.helper.make_tensor_value_info(PAST_LENGTH, onnx.TensorProto.INT64, [1]))
    graph.output.append(onnx.helper.make_tensor_value_info(CACHED_LENGTH, onnx.TensorProto.INT64, [1]))
    added.append(onnx.helper.make_node("Identity", [f"{_PREFIX}_1_total1"], [CACHED_LENGTH]))
    nodes = [n for n in graph.node if id(n) not in removed] + _constants() + added
    del graph.node[:]
    graph.node.extend(_topological(nodes, {i.name for i in graph.input} | {t.name for t in graph.initializer}))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def _attention_layer(
    node: Any, producer: dict[str, Any], readers: dict[str, list[Any]], shapes: dict[str, Any], present_of: dict[str, str]
) -> dict[str, Any] | None:
    """The parts of one self-attention over its cache, or None when ``node`` is not that form."""
    from onnx import TensorProto, helper

    inputs = list(node.input)
    if len(inputs) < 3 or len(inputs) > 4 or any(node.output[1:]):
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("qk_matmul_output_mode", 0) != 0 or "q_num_heads" in attributes:
        return None
    key, value = producer.get(inputs[1]), producer.get(inputs[2])
    layer: dict[str, Any] = {"attributes": attributes, "mask": inputs[3] if len(inputs) == 4 and inputs[3] else ""}
    for concat, part in ((key, "key"), (value, "value")):
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            return None
        axis = {a.name: helper.get_attribute_value(a) for a in concat.attribute}.get("axis")
        if axis not in (2, -2) or concat.input[0] not in present_of:
            return None
        if present_of[concat.input[0]] != concat.output[0] or [id(n) for n in readers.get(concat.output[0], [])] != [id(node)]:
            return None
        layer[f"past_{part}"], layer[f"new_{part}"], layer[f"{part}_concat"] = concat.input[0], concat.input[1], concat
    query, past = _dims(shapes.get(inputs[0])), _dims(shapes.get(layer["past_key"]))
    if len(query) != 4 or len(past) != 4 or query[1] is None or past[1] is None or past[3] is None:
        return None
    if shapes[layer["past_key"]].elem_type != TensorProto.FLOAT:  # GroupQueryAttention's CPU kernels: float32 here
        return None
    if not layer["mask"] and not attributes.get("is_causal", 0):
        return None  # GroupQueryAttention is causal: a maskless non-causal attention is not this form
    if layer["mask"]:
        mask = shapes.get(layer["mask"])
        if mask is None or mask.elem_type not in (TensorProto.BOOL, TensorProto.FLOAT):
            return None
        layer["mask_bool"] = mask.elem_type == TensorProto.BOOL
    layer.update(heads=query[1], kv_heads=past[1], head=past[3])
    return layer


def _dims(tensor_type: Any) -> list[int | None]:
    if tensor_type is None or not tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _group_query_attention(node: Any, layer: dict[str, Any], index: int) -> list[Any]:
    """GroupQueryAttention in place of ``node``: inputs flattened to [batch, sequence, heads x head],
    its present outputs the layer's, its output back to Attention's [batch, heads, sequence, head]."""
    from onnx import helper, numpy_helper

    p = f"{_PREFIX}_{index}"
    nodes = []

    def flat(name: str, tag: str) -> str:
        nodes.append(helper.make_node("Transpose", [name], [f"{p}_{tag}_t"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"{p}_{tag}_t", f"{_PREFIX}_flat"], [f"{p}_{tag}"]))
        return f"{p}_{tag}"

    query, key, value = flat(node.input[0], "q"), flat(layer["new_key"], "k"), flat(layer["new_value"], "v")
    bias = ""
    if layer["mask"]:
        bias = f"{p}_bias"
        # a boolean mask becomes additive (HF's convention: the lowest float, so a row with every
        # position masked stays finite); an additive one (ALiBi, a float mask) is the bias itself
        if layer["mask_bool"]:
            nodes.append(helper.make_node("Where", [layer["mask"], f"{_PREFIX}_zero", f"{_PREFIX}_lowest"], [bias]))
        else:
            nodes.append(helper.make_node("Identity", [layer["mask"]], [bias]))
    # the new key's sequence length and the cached count give each step's total
    nodes += [
        helper.make_node("Shape", [layer["new_key"]], [f"{p}_kshape"], start=2, end=3),
        helper.make_node("Add", [PAST_LENGTH, f"{p}_kshape"], [f"{p}_total1"]),
        helper.make_node("Sub", [f"{p}_total1", f"{_PREFIX}_one"], [f"{p}_last1"]),
        helper.make_node("Shape", [layer["new_key"]], [f"{p}_batch"], start=0, end=1),
        helper.make_node("Expand", [f"{p}_last1", f"{p}_batch"], [f"{p}_last"]),
        helper.make_node("Cast", [f"{p}_last"], [f"{p}_seqlens"], to=6),  # int32
        helper.make_node("Squeeze", [f"{p}_total1"], [f"{p}_total64"]),
        helper.make_node("Cast", [f"{p}_total64"], [f"{p}_total"], to=6),
    ]
    attributes = layer["attributes"]
    extra: dict[str, Any] = {"scale": float(attributes["scale"])} if attributes.get("scale") else {}
    if attributes.get("softcap"):
        extra["softcap"] = float(attributes["softcap"])
    nodes.append(helper.make_node(
        "GroupQueryAttention",
        [query, key, value, layer["past_key"], layer["past_value"], f"{p}_seqlens", f"{p}_total", "", "", "", bias],
        [f"{p}_out", layer["key_concat"].output[0], layer["value_concat"].output[0]],
        domain="com.microsoft", name=f"{node.name}/GroupQueryAttention", num_heads=layer["heads"],
        kv_num_heads=layer["kv_heads"], **extra,
    ))  # fmt: skip
    back = numpy_helper.from_array(np.array([0, 0, layer["heads"], layer["head"]], np.int64))
    nodes += [
        helper.make_node("Constant", [], [f"{p}_oshape"], value=back),
        helper.make_node("Reshape", [f"{p}_out", f"{p}_oshape"], [f"{p}_o4"]),
        helper.make_node("Transpose", [f"{p}_o4"], [node.output[0]], perm=[0, 2, 1, 3]),
    ]
    return nodes


def _cached_shape(shape: Any) -> list[Any]:
    """``Shape(past)`` (with its start / end) answering [batch, heads, cached positions, head] of a
    buffer that holds more: the cached count is :data:`PAST_LENGTH`."""
    from onnx import helper, numpy_helper

    attributes = {a.name: helper.get_attribute_value(a) for a in shape.attribute}
    out = shape.output[0]
    whole = helper.make_node("Shape", [shape.input[0]], [f"{out}_buffer"])
    start = numpy_helper.from_array(np.array([attributes.get("start", 0)], np.int64))
    end = numpy_helper.from_array(np.array([attributes.get("end", 2**62)], np.int64))
    return [
        whole,
        helper.make_node("Slice", [f"{out}_buffer", f"{_PREFIX}_zero_i", f"{_PREFIX}_two"], [f"{out}_lead"]),
        helper.make_node("Slice", [f"{out}_buffer", f"{_PREFIX}_three", f"{_PREFIX}_four"], [f"{out}_tail"]),
        helper.make_node("Concat", [f"{out}_lead", PAST_LENGTH, f"{out}_tail"], [f"{out}_cached"], axis=0),
        helper.make_node("Constant", [], [f"{out}_start"], value=start),
        helper.make_node("Constant", [], [f"{out}_end"], value=end),
        helper.make_node("Slice", [f"{out}_cached", f"{out}_start", f"{out}_end"], [out]),
    ]


def _constants() -> list[Any]:
    from onnx import helper, numpy_helper

    values: dict[str, np.ndarray] = {
        "flat": np.array([0, 0, -1], np.int64), "zero": np.array(0.0, np.float32),
        "lowest": np.array(np.finfo(np.float32).min, np.float32), "one": np.array([1], np.int64),
        "zero_i": np.array([0], np.int64), "two": np.array([2], np.int64), "three": np.array([3], np.int64),
        "four": np.array([4], np.int64),
    }  # fmt: skip
    return [helper.make_node("Constant", [], [f"{_PREFIX}_{k}"], value=numpy_helper.from_array(v)) for k, v in values.items()]


def _topological(nodes: list[Any], available: set[str]) -> list[Any]:
    """``nodes`` in an order where each reads only what is already computed (ONNX requires it)."""
    ready, order, pending = set(available) | {""}, [], list(nodes)
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise BackendError(f"the in-place cache rewrite left node '{rest[0].name or rest[0].op_type}' unreachable")
        pending = rest
    return order


class SharedCacheSession(CacheSession):
    """One generation on the rewritten graph: one buffer per cache tensor, ``capacity`` positions
    long, bound as both its past input and its present output; a step binds the other inputs and the
    cached count, runs, and reads the other outputs."""

    def __init__(
        self, session: Any, pairs: Sequence[tuple[str, str]], initial: Sequence[torch.Tensor], capacity: int,
        path: str,
    ):  # fmt: skip
        import onnxruntime as ort

        self.session, self.path, self.capacity = session, path, capacity
        cached = {past for past, _ in pairs}
        present = {out for _, out in pairs}
        self.inputs = [i.name for i in session.get_inputs() if i.name not in cached and i.name != PAST_LENGTH]
        self.outputs = [o.name for o in session.get_outputs() if o.name not in present and o.name != CACHED_LENGTH]
        self.length = int(initial[0].shape[2]) if initial else 0
        self.binding = session.io_binding()
        self.buffers = []
        for (past, _), start in zip(pairs, initial):
            if start.dim() != 4 or start.shape[2] != self.length or self.length > capacity:
                raise BackendError(f"the cache '{past}' starts as {list(start.shape)}: not [batch, heads, "
                                   f"{self.length} positions, head] within {capacity}")  # fmt: skip
            buffer = np.zeros((*start.shape[:2], capacity, start.shape[3]), dtype=start.detach().numpy().dtype)
            buffer[:, :, : self.length] = start.detach().numpy()
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            self.buffers.append((buffer, value))  # the array must outlive the OrtValue that shares it
            self.binding.bind_ortvalue_input(past, value)
        self.presents = [(out, value) for (_, out), (_, value) in zip(pairs, self.buffers)]
        # the buffers are the present outputs for the whole generation: bound once, first (get_outputs
        # follows the binding order); a step rebinds only the other outputs, whose shapes change
        for name, value in self.presents:
            self.binding.bind_ortvalue_output(name, value)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not inputs or inputs[0].dim() != 2 or inputs[0].is_floating_point():
            raise BackendError("the cache in place needs the step's tokens [batch, n] as the first input")
        new = int(inputs[0].shape[1])
        if self.length + new > self.capacity:
            raise BackendError(f"the in-place cache holds {self.capacity} positions; this step would need "
                               f"{self.length + new}")  # fmt: skip
        binding = self.binding
        for name, value in zip(self.inputs, inputs):
            binding.bind_cpu_input(name, value.detach().cpu().contiguous().numpy())
        binding.bind_cpu_input(PAST_LENGTH, np.array([self.length], np.int64))
        # the other outputs bound anew each step (in their places): ONNX Runtime would otherwise
        # reuse the previous step's logits array, whose shape no longer fits
        for name in [*self.outputs, CACHED_LENGTH]:
            binding.bind_output(name, "cpu")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed to run {self.path} (cache in place): {exc}") from exc
        results = binding.get_outputs()
        if len(results) != len(self.presents) + len(self.outputs) + 1:
            raise BackendError(f"ONNX Runtime returned {len(results)} outputs for {self.path}, expected "
                               f"{len(self.presents) + len(self.outputs) + 1}")  # fmt: skip
        cached = int(results[-1].numpy()[0])
        if cached != self.length + new:  # the graph wrote other than the step's tokens' positions
            raise BackendError(f"the cache in place of {self.path} holds {cached} positions after a step of {new} "
                               f"from {self.length}")  # fmt: skip
        self.length = cached
        # get_outputs follows the binding order: the cache buffers, the others in order, the count
        return [torch.from_numpy(value.numpy()) for value in results[len(self.presents) : -1]]
