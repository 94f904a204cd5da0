"""Quantized ops of the IR, with their eager (reference) kernels.

Quantization lives in the graph as ops whose eager kernels define the arithmetic, so the numeric
check of every pass and the ``torch`` backend run exactly what the artifact means. Backends lower
them: the ONNX backend maps each to ONNX / ONNX Runtime operators (``backends/onnx_lowering.py``).

* Static int8 uses PyTorch's own decomposed ops, which ``torch.onnx`` already lowers to
  QuantizeLinear / DequantizeLinear: ``quantize_per_tensor`` + ``dequantize_per_tensor`` on
  activations (constant scale and zero point) and ``dequantize_per_channel`` on int8 weight
  buffers, so the exported file holds int8 initializers.
* ``torchkiln::dynamic_linear(x, w_int8, w_scale, bias)``: ``x`` quantized to uint8 per call with
  ONNX's DynamicQuantizeLinear rule (range ``[min(x, 0), max(x, 0)]``, ``scale = range / 255``,
  zero point rounded half to even), times a per-output-channel int8 weight.
* ``torchkiln::weight_only_linear(x, packed, scales, bias, bits, block_size)``: weights quantized
  symmetrically in blocks of ``block_size`` along the input dim, stored as ONNX Runtime's
  MatMulNBits layout: unsigned ``q + 2**(bits-1)``, two 4-bit values per byte (low nibble first);
  ``bits=3`` keeps 3-bit values in 4-bit codes (:func:`block_grid`).
* ``torchkiln::weight_only_linear_zp(x, packed, scales, zeros, bias, bits, block_size)``: the same
  with a stored zero point per block (asymmetric), packed as MatMulNBits' ``zero_points``.
* ``torchkiln::grouped_weight_only_mm(x, packed, scales, offsets, bits, block_size)``: a mixture of
  experts' grouped matmul (rows of ``x`` sorted by expert, ``offsets`` the running row count per
  expert) whose every expert's [out, in] weight is stored as ``weight_only_linear``'s blocks.
* ``torchkiln::grouped_dynamic_mm(x, weight, scale, offsets)``: the same with every expert's
  weight int8 per output channel (``weight`` [E, out, in], ``scale`` [E, out]) and each expert's
  rows quantized per call as ``dynamic_linear`` quantizes its input.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed

decomposed = torch.ops.quantized_decomposed
QUANTIZE = decomposed.quantize_per_tensor.default
DEQUANTIZE = decomposed.dequantize_per_tensor.default
DEQUANTIZE_CHANNEL = decomposed.dequantize_per_channel.default


def _no_bias(bias: torch.Tensor, out_features: int) -> torch.Tensor | None:
    # Custom ops take no Optional tensors in the ONNX translation; an empty bias means "none".
    return bias if bias.numel() == out_features else None


@torch.library.custom_op("torchkiln::dynamic_linear", mutates_args=())
def dynamic_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Linear with a uint8 activation quantized per call and an int8 per-channel weight."""
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    step = (high - low) / 255.0
    step = torch.where(step > 0, step, torch.ones_like(step))
    zero = torch.clamp(torch.round(-low / step), 0, 255)
    xq = (torch.clamp(torch.round(x / step) + zero, 0, 255) - zero) * step
    w = weight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return torch.nn.functional.linear(xq, w, _no_bias(bias, weight.shape[0]))


@dynamic_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("torchkiln::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, bits: int, block_size: int
) -> torch.Tensor:
    """Linear whose weight is stored as ``bits``-bit blocks (see :func:`pack_blocks`)."""
    weight = unpack_blocks(packed, scales, bits, block_size, x.shape[-1]).to(x.dtype)
    return torch.nn.functional.linear(x, weight, _no_bias(bias, packed.shape[0]))


@weight_only_linear.register_fake
def _(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, bits: int, block_size: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("torchkiln::weight_only_linear_zp", mutates_args=())
def weight_only_linear_zp(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor,
    bits: int, block_size: int,
) -> torch.Tensor:  # fmt: skip
    """``weight_only_linear`` with a stored zero point per block (asymmetric grids, see :func:`block_grid`)."""
    weight = unpack_blocks(packed, scales, bits, block_size, x.shape[-1], zeros).to(x.dtype)
    return torch.nn.functional.linear(x, weight, _no_bias(bias, packed.shape[0]))


@weight_only_linear_zp.register_fake
def _(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor,
    bits: int, block_size: int,
) -> torch.Tensor:  # fmt: skip
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("torchkiln::grouped_weight_only_mm", mutates_args=())
def grouped_weight_only_mm(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int, block_size: int
) -> torch.Tensor:
    """Each expert's rows of ``x`` times its blocks (``packed`` [E, out, blocks, bytes], ``scales``
    [E, out * blocks]); expert e owns rows ``offsets[e-1]:offsets[e]``."""
    result = x.new_zeros(x.shape[0], packed.shape[1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            weight = unpack_blocks(packed[expert], scales[expert], bits, block_size, x.shape[-1]).to(x.dtype)
            result[start:end] = torch.nn.functional.linear(x[start:end], weight)
        start = end
    return result


@torch.library.custom_op("torchkiln::grouped_dynamic_mm", mutates_args=())
def grouped_dynamic_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each expert's rows of ``x`` through ``dynamic_linear`` with its int8 weight."""
    result = x.new_zeros(x.shape[0], weight.shape[1])
    start, none = 0, torch.zeros(0)
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            result[start:end] = dynamic_linear(x[start:end], weight[expert], scale[expert], none)
        start = end
    return result


@grouped_dynamic_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[1]))


@grouped_weight_only_mm.register_fake
def _(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int, block_size: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[1]))


def storage_bits(bits: int) -> int:
    """The bits each stored code takes: 3-bit values live in 4-bit codes (MatMulNBits and Inductor
    read 4 and 8 bits; a 3-bit grid keeps 3 bits' accuracy at 4 bits' size)."""
    return 4 if bits == 3 else bits


def block_grid(
    w: torch.Tensor, bits: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The grid of each block of ``w`` [..., block]: (scale [...], zero [...], lowest code, highest code).

    A weight is stored as an unsigned code of :func:`storage_bits` bits and means ``(code - zero) *
    scale``. Symmetric: ``zero = 2**(storage-1)`` (implicit in the file), ``scale = max |w| / (2**(bits-1)
    - 1)``, codes ``zero - 2**(bits-1) .. zero + 2**(bits-1) - 1``. Asymmetric: the block's range
    (widened to hold 0) over codes ``0 .. 2**bits - 1``, ``zero = round(-min / scale)`` (stored).
    """
    middle = 2 ** (storage_bits(bits) - 1)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = w.abs().amax(-1) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, float(middle)), middle - top - 1, middle + top
    high = 2**bits - 1
    low_w, high_w = w.amin(-1).clamp(max=0.0), w.amax(-1).clamp(min=0.0)
    scale = (high_w - low_w) / high
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-low_w / scale), 0, high)
    return scale, zero, 0, high


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """``w`` [..., n] on the grid (scale, zero [...] broadcast over the last dim): unsigned codes."""
    return torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], low, high)


def _block_codes(
    weight: torch.Tensor, bits: int, block_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` [N, K] zero-padded to whole blocks and rounded to nearest on :func:`block_grid`:
    (codes [N, blocks, block_size], scale [N, blocks], zero [N, blocks])."""
    n, k = weight.shape
    blocks = -(-k // block_size)
    w = torch.nn.functional.pad(weight.detach().float(), (0, blocks * block_size - k)).view(n, blocks, block_size)
    scale, zero, low, high = block_grid(w, bits, symmetric)
    return to_codes(w, scale, zero, low, high), scale, zero


def round_trip_blocks(weight: torch.Tensor, bits: int, block_size: int, symmetric: bool = True) -> torch.Tensor:
    """``weight`` [N, K] rounded to nearest on the block grid and back to float (what it computes as)."""
    n, k = weight.shape
    codes, scale, zero = _block_codes(weight, bits, block_size, symmetric)
    return ((codes - zero[..., None]) * scale[..., None]).view(n, -1)[:, :k]


def pack_blocks(
    weight: torch.Tensor, bits: int, block_size: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``weight`` [N, K] rounded to nearest on :func:`block_grid` → :func:`pack_codes`' format (packed,
    scales, zero points or None when symmetric); K is zero-padded to whole blocks."""
    n, k = weight.shape
    codes, scale, zero = _block_codes(weight, bits, block_size, symmetric)
    return pack_codes(codes.view(n, -1)[:, :k], scale, bits, block_size, None if symmetric else zero)


def pack_codes(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, zeros: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unsigned codes [N, K] with scales (and zero points) [N, blocks] → ONNX Runtime's MatMulNBits
    layout: packed uint8 [N, blocks, block_size * storage / 8] (two 4-bit codes per byte, low nibble
    first), scales [N * blocks], zero points uint8 [N * ceil(blocks * storage / 8)] packed the same way
    (None: symmetric, the implicit middle code). How the codes were chosen is the caller's."""
    n, k = codes.shape
    blocks = -(-k // block_size)
    store = storage_bits(bits)
    if scales.shape != (n, blocks) or (zeros is not None and zeros.shape != (n, blocks)):
        raise ValueError(f"scales / zero points do not fit [{n}, {blocks}] blocks of {block_size}")
    if bool((codes < 0).any() or (codes > 2**store - 1).any()):
        raise ValueError(f"codes outside {store} bits")
    padded = torch.nn.functional.pad(codes.to(torch.int16), (0, blocks * block_size - k), value=2 ** (store - 1))
    stored = _nibbles(padded.view(n, blocks, block_size).to(torch.uint8), store)
    packed_zeros = None
    if zeros is not None:
        z = zeros.to(torch.uint8)
        if store == 4 and blocks % 2:
            z = torch.nn.functional.pad(z, (0, 1), value=2 ** (store - 1))
        packed_zeros = _nibbles(z, store).reshape(-1).contiguous()
    return stored.contiguous(), scales.float().reshape(-1).contiguous(), packed_zeros


def _nibbles(values: torch.Tensor, store: int) -> torch.Tensor:
    return values[..., 0::2] | (values[..., 1::2] << 4) if store == 4 else values


def unpack_blocks(
    packed: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, in_features: int,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    n, blocks, _ = packed.shape
    store = storage_bits(bits)
    q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, blocks, block_size) if store == 4 else packed
    if zeros is None:
        zero = torch.full((n, blocks, 1), float(2 ** (store - 1)))
    else:
        z = torch.stack([zeros & 0x0F, zeros >> 4], dim=-1).reshape(n, -1) if store == 4 else zeros.reshape(n, -1)
        zero = z[:, :blocks].float().view(n, blocks, 1)
    values = (q.float() - zero) * scales.view(n, blocks, 1)
    return values.reshape(n, blocks * block_size)[:, :in_features]


def round_trip_per_channel(weight: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """``weight`` through :func:`quantize_weight_per_channel` and back to float."""
    q, scale = quantize_weight_per_channel(weight, levels)
    return q.float() * scale.view((-1,) + (1,) * (weight.dim() - 1))


def quantize_weight_per_channel(weight: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel (dim 0) int8: ``scale_c = max |w_c| / levels``; returns
    (int8 weight, float scales). ``levels=63`` is the 7-bit "reduce range" variant."""
    w = weight.detach().float()
    scale = w.abs().reshape(w.shape[0], -1).amax(1) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w / scale.view(shape)), -levels, levels).to(torch.int8)
    return q, scale
