"""ONNX translations of torchkiln's own IR ops (:mod:`torchkiln.compiler.quant_ops`).

Passed to ``torch.onnx.export`` as its ``custom_translation_table``; PyTorch's decomposed
quantize/dequantize ops need none (the exporter maps them to QuantizeLinear/DequantizeLinear).

* ``dynamic_linear`` → DynamicQuantizeLinear, MatMulInteger, Cast, Mul (and Add for the bias):
  the operator form ONNX Runtime fuses into its DynamicQuantizeMatMul kernel; for OpenVINO
  (``compressed_dynamic``) → DequantizeLinear of the int8 weight into a MatMul, which OpenVINO reads
  as compressed weights and runs with its own dynamic quantization of the activations.
* ``weight_only_linear`` → ``com.microsoft.MatMulNBits`` (ONNX Runtime's int4/int8 weight GEMM),
  with ``accuracy_level`` when one is asked for (4: activations quantized to int8 per block, the
  integer kernels of CPUs with VNNI / AMX; 0: ONNX Runtime's default, float compute).
  onnx has no schema for contrib ops, and the exporter's op builder needs one, so a minimal schema
  (inputs, attributes, types) is registered once.
* a mixture of experts' grouped matmul (rows sorted by expert, a running count per expert) —
  transformers' ``grouped_mm_fallback``, ``grouped_weight_only_mm``, ``grouped_dynamic_mm`` — →
  each expert's contiguous slice of rows (Slice) times its own weight (MatMul / MatMulNBits /
  dynamic_linear's ops), concatenated in order.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

MSFT_DOMAIN = "com.microsoft"


def translation_table(nbits_accuracy_level: int = 0, compressed_dynamic: bool = False) -> dict[Any, Any]:
    """The table for one export: torchkiln's ops, and transformers' grouped matmul where it is
    registered by now (transformers registers it when a model imports its MoE layers, which can be
    after an earlier export in the same process: that part is not cached). ``compressed_dynamic``
    writes ``dynamic_linear`` as its int8 weight dequantized into a float MatMul (no activation
    quantization in the graph): the compressed-weight form OpenVINO runs with its own per-group
    dynamic quantization of the activations."""
    table, grouped_mm = _translations(nbits_accuracy_level, compressed_dynamic)
    experts = _registered("transformers", "grouped_mm_fallback")
    return table | ({experts: grouped_mm} if experts is not None else {})


@functools.cache
def _translations(nbits_accuracy_level: int, compressed_dynamic: bool = False) -> tuple[dict[Any, Any], Any]:
    import onnxscript
    from onnxscript import opset18 as op

    from torchkiln.compiler.quant_ops import storage_bits  # importing it registers the ops (the keys below)

    _register_matmul_nbits_schema()
    msft = onnxscript.values.Opset(MSFT_DOMAIN, 1)

    def dynamic_linear(x: Any, weight: Any, scale: Any, bias: Any) -> Any:
        if compressed_dynamic:
            y = op.MatMul(x, op.Transpose(op.DequantizeLinear(weight, scale, axis=0), perm=[1, 0]))
            return y if _static_size(bias) == 0 else op.Add(y, bias)
        xq, x_scale, x_zero = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, op.Transpose(weight, perm=[1, 0]), x_zero)
        y = op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, scale))  # to=1: FLOAT
        return y if _static_size(bias) == 0 else op.Add(y, bias)

    def weight_only_linear(x: Any, packed: Any, scales: Any, bias: Any, bits: int, block_size: int) -> Any:
        n, blocks, _ = packed.shape
        in_features = x.shape[-1]
        level = {"accuracy_level": nbits_accuracy_level} if nbits_accuracy_level else {}
        y = msft.MatMulNBits(x, packed, scales, K=int(in_features), N=int(n), bits=storage_bits(bits),
                             block_size=block_size, **level)  # fmt: skip
        return y if _static_size(bias) == 0 else op.Add(y, bias)

    def weight_only_linear_zp(
        x: Any, packed: Any, scales: Any, zeros: Any, bias: Any, bits: int, block_size: int
    ) -> Any:  # zero points: MatMulNBits' fourth input, packed as its codes
        n = packed.shape[0]
        level = {"accuracy_level": nbits_accuracy_level} if nbits_accuracy_level else {}
        y = msft.MatMulNBits(x, packed, scales, zeros, K=int(x.shape[-1]), N=int(n), bits=storage_bits(bits),
                             block_size=block_size, **level)  # fmt: skip
        return y if _static_size(bias) == 0 else op.Add(y, bias)

    def expert_slices(x: Any, offsets: Any, experts: int) -> list[Any]:
        """Rows of ``x`` [S, in] sorted by expert, ``offsets`` [E] the running row count per expert:
        expert e's rows are the contiguous slice ``offsets[e-1]:offsets[e]``."""
        o: Any = op  # onnxscript's typed opset rejects the mixed index/list arguments below
        ends = o.Cast(offsets, to=7)  # INT64
        starts = o.Concat(o.Constant(value_ints=[0]), o.Slice(ends, [0], [-1]), axis=0)
        return [
            o.Slice(x, o.Slice(starts, [e], [e + 1]), o.Slice(ends, [e], [e + 1]), [0]) for e in range(experts)
        ]

    def grouped_mm(x: Any, weight: Any, offsets: Any) -> Any:
        """transformers' mixture-of-experts matmul, ``weight`` [E, in, out]: one MatMul per expert
        on its own rows, concatenated in order (no dense all-experts compute)."""
        o: Any = op
        pieces = [
            o.MatMul(rows, o.Gather(weight, o.Constant(value_int=e), axis=0))
            for e, rows in enumerate(expert_slices(x, offsets, int(weight.shape[0])))
        ]
        return o.Concat(*pieces, axis=0)

    def grouped_weight_only_mm(x: Any, packed: Any, scales: Any, offsets: Any, bits: int, block_size: int) -> Any:
        """One MatMulNBits per expert on its slice of rows (as grouped_mm), concatenated."""
        o: Any = op
        experts, n = int(packed.shape[0]), int(packed.shape[1])
        level = {"accuracy_level": nbits_accuracy_level} if nbits_accuracy_level else {}
        pieces = []
        for e, rows in enumerate(expert_slices(x, offsets, experts)):
            index = o.Constant(value_int=e)
            pieces.append(msft.MatMulNBits(
                rows, o.Gather(packed, index, axis=0), o.Gather(scales, index, axis=0), K=int(x.shape[-1]), N=n,
                bits=storage_bits(bits), block_size=block_size, **level,
            ))  # fmt: skip
        return o.Concat(*pieces, axis=0)

    def grouped_dynamic_mm(x: Any, weight: Any, scale: Any, offsets: Any) -> Any:
        """``dynamic_linear`` per expert on its slice of rows (an empty slice gives no rows)."""
        o: Any = op
        pieces = []
        for e, rows in enumerate(expert_slices(x, offsets, int(weight.shape[0]))):
            index = o.Constant(value_int=e)
            pieces.append(dynamic_linear(rows, o.Gather(weight, index, axis=0), o.Gather(scale, index, axis=0), None))
        return o.Concat(*pieces, axis=0)

    ops = torch.ops.torchkiln
    table = {
        ops.dynamic_linear.default: dynamic_linear, ops.weight_only_linear.default: weight_only_linear,
        ops.weight_only_linear_zp.default: weight_only_linear_zp,
        ops.grouped_weight_only_mm.default: grouped_weight_only_mm, ops.grouped_dynamic_mm.default: grouped_dynamic_mm,
    }  # fmt: skip
    return table, grouped_mm


def _registered(namespace: str, name: str) -> Any:
    """``torch.ops.<namespace>.<name>.default``, or None where nothing registered it."""
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


def _static_size(value: Any) -> int:
    if value is None:
        return 0
    shape = getattr(value, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) else 1


def _register_matmul_nbits_schema() -> None:
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("MatMulNBits", 1, MSFT_DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    formal, attribute, kind = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    schema = OpSchema(
        "MatMulNBits",
        MSFT_DOMAIN,
        1,
        inputs=[formal("A", "T1"), formal("B", "T2"), formal("scales", "T1"),
                formal("zero_points", "T2", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[formal("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[
            *(attribute(name, kind.INT, "") for name in ("K", "N", "bits", "block_size")),
            attribute("accuracy_level", kind.INT, "", required=False),
        ],
    )
    onnx.defs.register_schema(schema)
