"""An int8 KV cache for a causal LM's cached graph: the cache crosses the graph's boundary (and
sits in memory between steps) as int8 with per-head scales, a quarter of float32's bytes.

Two ways to set the scales (``kv_cache`` of :func:`torchkiln.compile`):

* ``"int8"`` — **per step**: every new position gets its own scale per head, ``max|x| / 127`` over
  the head dim, when it enters the cache. The scales travel beside the cache as
  ``past_key_scale_<i>`` / ``past_value_scale_<i>`` [batch, kv heads, past, 1] (float32), so a
  position keeps the scale it was stored with; with head dim d the cache takes ``(d + 4) / 4d`` of
  float32's bytes (0.28 at d = 32, 0.27 at d = 64). Needs no data.
* ``"int8-calibrated"`` — **set at calibration**: one scale per layer, head and keys / values,
  ``max|x| / 127`` over the calibration prompts' caches (prefill and decode steps), a constant of
  the graph; the cache is exactly a quarter of float32's bytes. A value beyond the calibrated
  range is clamped.

Attention reads the cache as it is stored, the new positions too (quantized, then dequantized):
what a kernel over an int8 cache computes, and what the next step will read. The graph stays a
function of its inputs, so the passes and backends are checked against this cache's eager model
(:class:`Int8Layer` inside the wrapped model); how far the int8 cache moves the logits from the
float cache's is checked separately, on prompts run as prefill and greedy decode steps
(:func:`deviation`), and goes into the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from torchkiln.errors import ConfigError

MODES = ("float", "int8", "int8-calibrated")
QMAX = 127
PROMISE = 0.99  # the least cosine of the int8 cache's logits to the float cache's, per step
_TINY = torch.finfo(torch.float32).tiny


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ConfigError(
            f"unknown kv_cache '{mode}'",
            where="kv_cache",
            hint="use float (the default), int8 (per-head scales set per step) or int8-calibrated "
            "(per-head scales set at calibration; needs calibration prompts)",
        )
    return str(mode)


def per_step(mode: str) -> bool:
    return mode == "int8"


def quantize(x: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [batch, heads, positions, dim] → (int8 codes, scales). ``scale`` None: per position and
    head (``max|x| / 127`` over dim, [batch, heads, positions, 1]); else the given per-head scales
    [heads] (values beyond their range clamp)."""
    if scale is None:
        scale = (x.detach().abs().amax(-1, keepdim=True).float() / QMAX).clamp(min=_TINY)
    else:
        scale = scale.view(1, -1, 1, 1)
    codes = torch.clamp(torch.round(x.float() / scale), -QMAX, QMAX).to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale


def _layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class Int8Layer(DynamicLayer):  # type: ignore[misc]
        """A DynamicLayer that keeps its keys and values as int8 codes and scales; ``keys`` /
        ``values`` (what attention reads) are their dequantized values."""

        def __init__(
            self, stored: Sequence[torch.Tensor | None], fixed: tuple[torch.Tensor, torch.Tensor] | None
        ):
            super().__init__()
            self.fixed = fixed
            self.codes: list[torch.Tensor] = [stored[0], stored[2]]  # type: ignore[list-item]
            self.scales: list[torch.Tensor] = (
                [stored[1], stored[3]] if fixed is None else [f.view(1, -1, 1, 1) for f in fixed]  # type: ignore[list-item]
            )
            self.keys = dequantize(self.codes[0], self.scales[0])
            self.values = dequantize(self.codes[1], self.scales[1])
            self.device, self.is_initialized = self.keys.device, True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            read = []
            for part, new in enumerate((key_states, value_states)):
                codes, scale = quantize(new, None if self.fixed is None else self.fixed[part])
                # concatenated as float: Inductor (torch 2.13) wrote wrong int8 codes concatenating onto an
                # empty int8 past (the prompt's step), while float concatenation is right
                self.codes[part] = torch.cat([self.codes[part].float(), codes.float()], dim=-2).to(torch.int8)
                if self.fixed is None:
                    self.scales[part] = torch.cat([self.scales[part], scale], dim=-2)
                read.append(dequantize(codes, scale).to(new.dtype))
            self.keys = torch.cat([self.keys.to(key_states.dtype), read[0]], dim=-2)  # type: ignore[union-attr]
            self.values = torch.cat([self.values.to(value_states.dtype), read[1]], dim=-2)  # type: ignore[union-attr]
            return self.keys, self.values

    return Int8Layer


def cache(
    stored: Sequence[Sequence[torch.Tensor | None]], fixed: Sequence[tuple[torch.Tensor, torch.Tensor]] | None
) -> Any:
    """A transformers DynamicCache over int8 layers: ``stored[i]`` = (key codes, key scales, value
    codes, value scales) of layer i (the scales None where ``fixed`` per-head scales are given)."""
    import transformers

    layer = _layer_class()
    result = transformers.DynamicCache()
    result.layers = [layer(s, None if fixed is None else fixed[i]) for i, s in enumerate(stored)]
    return result


def calibrated_scales(
    pasts: Iterable[dict[str, torch.Tensor]], layers: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-head scales (``max|x| / 127``) of every layer's keys and values over the float caches
    ``pasts`` (graph input sets holding ``past_key_<i>`` / ``past_value_<i>``)."""
    peaks: dict[str, torch.Tensor] = {}
    for inputs in pasts:
        for i in range(layers):
            for kind in ("key", "value"):
                name = f"past_{kind}_{i}"
                tensor = inputs[name]
                if tensor.shape[2] == 0:
                    continue
                peak = tensor.detach().abs().float().amax(dim=(0, 2, 3))
                peaks[name] = peak if name not in peaks else torch.maximum(peaks[name], peak)
    if len(peaks) < 2 * layers:
        raise ConfigError(
            "kv_cache=int8-calibrated found no cache to calibrate on",
            where="calibration_data",
            hint="give calibration prompts (each runs as a prefill, then decode steps) or use kv_cache=int8",
        )
    return [
        tuple((peaks[f"past_{kind}_{i}"] / QMAX).clamp(min=_TINY) for kind in ("key", "value"))  # type: ignore[misc]
        for i in range(layers)
    ]


def bytes_per_position(shapes: Sequence[tuple[tuple[int, int], tuple[int, int]]], mode: str) -> int:
    """Bytes one cached position takes over all layers (per batch row)."""
    total = 0
    for key, value in shapes:
        for heads, dim in (key, value):
            total += heads * (dim * 4 if mode == "float" else dim + (4 if per_step(mode) else 0))
    return total
