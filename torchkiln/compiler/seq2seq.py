"""Encoder-decoder LMs (BART, T5, ...) with their KV cache: an encoder and a decoder-with-cache.

Like the peers (Optimum's encoder + decoder-with-past), :func:`split` gives two modules to compile:

* the **encoder** — inputs ``input_ids`` [batch, source], ``attention_mask`` [batch, source];
  outputs the cross-attention cache ``cross_key_<i>`` / ``cross_value_<i>`` [batch, heads,
  source, head dim] of every decoder layer. It runs the encoder and the decoder once (on a start
  token) and keeps only the cross-attention keys and values, which depend on the encoder alone:
  the decoder's self-attention work is dead code there, removed by cleanup;
* the **decoder with cache** — inputs ``decoder_input_ids`` [batch, sequence],
  ``encoder_attention_mask`` [batch, source], ``past_key_<i>`` / ``past_value_<i>`` [batch, heads,
  past, head dim] (self-attention) and the cross cache; outputs ``logits`` and ``present_key_<i>``
  / ``present_value_<i>``. With the cross cache given, the model reads it instead of projecting
  the encoder states again; those states are then only a shape (zeros in the graph).

Batch, source, sequence and past are dynamic axes. Layer shapes come from one eager call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchkiln.compiler.causal_lm import (
    EXAMPLE_PAST,
    SPECIAL_TOKENS,
    cache_keyword,
    generation_settings,
    past_names,
    returned_cache,
    with_signature,
)
from torchkiln.errors import InputError


def wants_cache(model: nn.Module, example_inputs: Any) -> bool:
    """A Hugging Face encoder-decoder LM whose example inputs leave its cache on and give no
    decoder inputs of their own."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "is_encoder_decoder", False) or not getattr(config, "use_cache", False):
        return False
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate() or not isinstance(example_inputs, Mapping):
        return False
    own = {"past_key_values", "decoder_input_ids", "encoder_outputs", "labels"}
    return example_inputs.get("use_cache", True) is not False and not own & set(example_inputs)


def cross_names(layers: int) -> list[str]:
    return [f"cross_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def settings(model: nn.Module) -> dict[str, int | None]:
    """:func:`~torchkiln.compiler.causal_lm.generation_settings` plus the decoder's start token
    and the tokens the model's generation config forces first and last."""
    extra = ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id")
    found = generation_settings(model, SPECIAL_TOKENS + extra)
    if found["decoder_start_token_id"] is None:
        raise InputError(
            f"{type(model).__name__}'s config has no decoder_start_token_id: generation cannot start",
            hint="set model.config.decoder_start_token_id (often the pad or EOS token)",
        )
    return found


def split(
    model: nn.Module, example_inputs: Mapping[str, Any]
) -> tuple[tuple[nn.Module, dict[str, torch.Tensor], dict[str, dict[int, str]]], ...]:
    """(encoder, its example inputs, its dynamic axes), (decoder with cache, ..., ...)."""
    extra = sorted(set(example_inputs) - {"input_ids", "attention_mask", "use_cache"})
    ids = example_inputs.get("input_ids")
    if extra or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise InputError(
            f"an encoder-decoder with its KV cache takes input_ids [batch, source] (and attention_mask); "
            f"got {sorted(example_inputs)}",
            where="example_inputs",
            hint="pass {'input_ids': ids, 'attention_mask': mask}; for one graph without the cache pass "
            "decoder_input_ids and use_cache=False",
        )
    mask = example_inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    encoder = type(f"{type(model).__name__}Encoder", (EncoderWithCrossCache,), {})(model).eval()
    with torch.no_grad():
        cross = encoder(ids, mask)
    layers = len(cross) // 2
    source_axes = {0: "batch", 1: "source"}
    encoder_part = (encoder, {"input_ids": ids, "attention_mask": mask}, {"input_ids": source_axes, "attention_mask": source_axes})

    start = int(settings(model)["decoder_start_token_id"] or 0)
    generator = torch.Generator().manual_seed(0)
    inputs: dict[str, torch.Tensor] = {
        "decoder_input_ids": torch.full((ids.shape[0], 1), start, dtype=ids.dtype),
        "encoder_attention_mask": mask,
    }
    axes: dict[str, dict[int, str]] = {"decoder_input_ids": {0: "batch", 1: "sequence"}, "encoder_attention_mask": source_axes}
    self_shapes = _self_cache_shapes(model, ids, mask)
    for name, (heads, dim) in zip(past_names(layers), self_shapes):
        inputs[name] = torch.randn(ids.shape[0], heads, EXAMPLE_PAST, dim, generator=generator)
        axes[name] = {0: "batch", 2: "past"}
    for name, tensor in cross.items():
        inputs[name] = tensor
        axes[name] = {0: "batch", 2: "source"}
    return encoder_part, (_decoder(model, [*inputs], layers), inputs, axes)


def _self_cache_shapes(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, int]]:
    with torch.no_grad():
        start = torch.zeros_like(ids[:1, :1])
        out = model(input_ids=ids[:1], attention_mask=mask[:1], decoder_input_ids=start, use_cache=True)
    shapes = []
    for layer in returned_cache(out).self_attention_cache.layers:
        shapes += [(layer.keys.shape[1], layer.keys.shape[3]), (layer.values.shape[1], layer.values.shape[3])]
    return shapes


class EncoderWithCrossCache(nn.Module):
    """The encoder, returning the decoder's cross-attention cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        model: Any = self.model
        encoded = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        start = torch.zeros_like(input_ids[:, :1])  # any token: the cross cache does not depend on it
        out = model(encoder_outputs=encoded, attention_mask=attention_mask, decoder_input_ids=start, use_cache=True)
        result = {}
        for i, layer in enumerate(returned_cache(out).cross_attention_cache.layers):
            result[f"cross_key_{i}"], result[f"cross_value_{i}"] = layer.keys, layer.values
        return result


class DecoderWithCache(nn.Module):
    """One decoder step (or several) over the self-attention past and the cross cache."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def run(
        self, tokens: torch.Tensor, mask: torch.Tensor, past: list[torch.Tensor], cross: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        import transformers

        model: Any = self.model
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        cross_pairs = [(cross[2 * i], cross[2 * i + 1]) for i in range(self.layers)]
        cache = transformers.EncoderDecoderCache(
            transformers.DynamicCache(ddp_cache_data=pairs, config=model.config),
            transformers.DynamicCache(ddp_cache_data=cross_pairs, config=model.config),
        )
        hidden = getattr(model.config, "d_model", None) or model.config.hidden_size
        states = cross[0].new_zeros(cross[0].shape[0], cross[0].shape[2], hidden)  # a shape only: the cache is read
        out = model(
            encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=tokens, use_cache=True,
            **{cache_keyword(model): cache},
        )  # fmt: skip
        result = {"logits": out.logits}
        for i, layer in enumerate(returned_cache(out).self_attention_cache.layers):
            result[f"present_key_{i}"], result[f"present_value_{i}"] = layer.keys, layer.values
        return result


def _decoder(model: nn.Module, names: list[str], layers: int) -> nn.Module:
    past, cross = past_names(layers), cross_names(layers)

    def run(self: DecoderWithCache, bound: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens, mask = bound["decoder_input_ids"], bound["encoder_attention_mask"]
        return self.run(tokens, mask, [bound[n] for n in past], [bound[n] for n in cross])

    cls = with_signature(DecoderWithCache, f"{type(model).__name__}DecoderWithCache", names, run)
    return cls(model, layers).eval()
