"""Encoder-decoder LMs (BART, T5, ...) with their KV cache: an encoder and a decoder-with-cache.

Like the peers (Optimum's encoder + decoder-with-past), :func:`split` gives two modules to compile:

* the **encoder** — inputs ``input_ids`` [batch, source], ``attention_mask`` [batch, source]
  (a speech model such as Whisper: ``input_features`` [batch, mels, frames], no mask); outputs the cross-attention cache ``cross_key_<i>`` / ``cross_value_<i>`` [batch, heads,
  source, head dim] of every decoder layer. It runs the encoder and the decoder once (on a start
  token) and keeps only the cross-attention keys and values, which depend on the encoder alone:
  the decoder's self-attention work is dead code there, removed by cleanup;
* the **decoder with cache** — inputs ``decoder_input_ids`` [batch, sequence],
  ``encoder_attention_mask`` [batch, source] (text encoders), ``past_key_<i>`` / ``past_value_<i>`` [batch, heads,
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


def settings(model: nn.Module, speech: bool = False) -> dict[str, int | None]:
    """:func:`~torchkiln.compiler.causal_lm.generation_settings` plus the decoder's start token
    and the tokens the model's generation config forces first and last; for a speech model, the
    decoder prompt as ``decoder_prompt_<i>`` (see :func:`decoder_prompt`)."""
    extra = ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id")
    found = generation_settings(model, SPECIAL_TOKENS + extra)
    if found["decoder_start_token_id"] is None:
        raise InputError(
            f"{type(model).__name__}'s config has no decoder_start_token_id: generation cannot start",
            hint="set model.config.decoder_start_token_id (often the pad or EOS token)",
        )
    if speech:
        prompt = decoder_prompt(model, int(found["decoder_start_token_id"]))
        found |= {f"{PROMPT}{i}": token for i, token in enumerate(prompt)}
    return found


PROMPT = "decoder_prompt_"  # a speech model's decoder prompt tokens in the generation settings


def decoder_prompt(model: nn.Module, start: int) -> list[int]:
    """The tokens Whisper's generate puts before the first new token, as transformers builds them
    without a language or task: the start token, the generation config's ``forced_decoder_ids``
    (positions 1, 2, ... in order) and, unless timestamps are asked for, the no-timestamps token.
    A config that picks language or task tokens at generate time (multilingual checkpoints:
    ``lang_to_id``, ``task_to_id``, ``language``, ``task``) is refused: not supported yet."""
    generation = getattr(model, "generation_config", None)
    config = getattr(model, "config", None)
    chosen = [f for f in ("lang_to_id", "task_to_id", "language", "task") if getattr(generation, f, None)]
    if chosen or getattr(generation, "is_multilingual", False):
        raise InputError(
            f"{type(model).__name__}'s generation config chooses language / task tokens at generate time "
            f"({', '.join(chosen) or 'is_multilingual'}): not supported yet",
            hint="use an English-only checkpoint, or compile the decoder without its cache (decoder_input_ids "
            "and use_cache=False in the example inputs) and run your own loop",
        )
    forced = getattr(generation, "forced_decoder_ids", None) or getattr(config, "forced_decoder_ids", None) or []
    tokens: list[int | None] = [start]
    for position, (index, token) in enumerate(forced, start=1):
        if index != position:
            raise InputError(
                f"{type(model).__name__}'s forced_decoder_ids {forced} are not the positions 1, 2, ... in order",
                hint="fix generation_config.forced_decoder_ids (transformers refuses them too)",
            )
        tokens.append(token)
    no_timestamps = getattr(generation, "no_timestamps_token_id", None)
    if no_timestamps is not None and not getattr(generation, "return_timestamps", False) and tokens[-1] != no_timestamps:
        tokens.append(no_timestamps)
    return [int(t) for t in tokens if t is not None]


SPEECH = "input_features"  # a speech encoder's input (Whisper: log-mel frames [batch, mels, frames])


def split(
    model: nn.Module, example_inputs: Mapping[str, Any]
) -> tuple[tuple[nn.Module, dict[str, torch.Tensor], dict[str, dict[int, str]]], ...]:
    """(encoder, its example inputs, its dynamic axes), (decoder with cache, ..., ...).

    A text encoder takes ``input_ids`` (and ``attention_mask``) with batch and source dynamic; a
    speech encoder (Whisper) takes ``input_features`` [batch, mels, frames] with the batch dynamic
    (its encoder accepts exactly the frames of its position table) and no mask."""
    speech = SPEECH in example_inputs
    allowed = {SPEECH, "use_cache"} if speech else {"input_ids", "attention_mask", "use_cache"}
    extra = sorted(set(example_inputs) - allowed)
    source = example_inputs.get(SPEECH if speech else "input_ids")
    shape_ok = isinstance(source, torch.Tensor) and (
        (source.dim() == 3 and source.is_floating_point()) if speech else (source.dim() == 2 and not source.is_floating_point())
    )
    if extra or not shape_ok:
        raise InputError(
            f"an encoder-decoder with its KV cache takes input_ids [batch, source] (and attention_mask), or "
            f"input_features [batch, mels, frames] for a speech model; got {sorted(example_inputs)}",
            where="example_inputs",
            hint="pass {'input_ids': ids, 'attention_mask': mask} or {'input_features': features}; for one graph "
            "without the cache pass decoder_input_ids and use_cache=False",
        )
    assert isinstance(source, torch.Tensor)
    batch = source.shape[0]
    if speech:
        encoder_inputs: dict[str, torch.Tensor] = {SPEECH: source}
        encoder_axes: dict[str, dict[int, str]] = {SPEECH: {0: "batch"}}
        cross_axes: dict[int, str] = {0: "batch"}
        mask = None
    else:
        mask = example_inputs.get("attention_mask")
        mask = torch.ones_like(source) if mask is None else mask
        source_axes = {0: "batch", 1: "source"}
        encoder_inputs = {"input_ids": source, "attention_mask": mask}
        encoder_axes = {"input_ids": source_axes, "attention_mask": source_axes}
        cross_axes = {0: "batch", 2: "source"}
    encoder = _encoder(model, [*encoder_inputs])
    with torch.no_grad():
        cross = encoder(**encoder_inputs)
    layers = len(cross) // 2

    start = int(settings(model, speech)["decoder_start_token_id"] or 0)
    generator = torch.Generator().manual_seed(0)
    inputs: dict[str, torch.Tensor] = {"decoder_input_ids": torch.full((batch, 1), start, dtype=torch.long)}
    axes: dict[str, dict[int, str]] = {"decoder_input_ids": {0: "batch", 1: "sequence"}}
    if mask is not None:
        inputs["encoder_attention_mask"], axes["encoder_attention_mask"] = mask, encoder_axes["attention_mask"]
    self_shapes = _self_cache_shapes(model, encoder_inputs)
    for name, (heads, dim) in zip(past_names(layers), self_shapes):
        inputs[name] = torch.randn(batch, heads, EXAMPLE_PAST, dim, generator=generator)
        axes[name] = {0: "batch", 2: "past"}
    for name, tensor in cross.items():
        inputs[name] = tensor
        axes[name] = dict(cross_axes)
    return (encoder, encoder_inputs, encoder_axes), (_decoder(model, [*inputs], layers), inputs, axes)


def _self_cache_shapes(model: nn.Module, encoder_inputs: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
    with torch.no_grad():
        first = {name: value[:1] for name, value in encoder_inputs.items()}
        start = torch.zeros(1, 1, dtype=torch.long)
        out = model(**first, decoder_input_ids=start, use_cache=True)
    shapes = []
    for layer in returned_cache(out).self_attention_cache.layers:
        shapes += [(layer.keys.shape[1], layer.keys.shape[3]), (layer.values.shape[1], layer.values.shape[3])]
    return shapes


class EncoderWithCrossCache(nn.Module):
    """The encoder, returning the decoder's cross-attention cache; forward's signature is set to
    the encoder's inputs (``input_ids, attention_mask`` or ``input_features``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model: Any = self.model
        encoded = model.get_encoder()(**inputs)
        batch = next(iter(inputs.values())).shape[0]
        start = torch.zeros(batch, 1, dtype=torch.long)  # any token: the cross cache does not depend on it
        mask = {"attention_mask": inputs["attention_mask"]} if "attention_mask" in inputs else {}
        out = model(encoder_outputs=encoded, decoder_input_ids=start, use_cache=True, **mask)
        result = {}
        for i, layer in enumerate(returned_cache(out).cross_attention_cache.layers):
            result[f"cross_key_{i}"], result[f"cross_value_{i}"] = layer.keys, layer.values
        return result


def _encoder(model: nn.Module, names: list[str]) -> nn.Module:
    def run(self: EncoderWithCrossCache, bound: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run({n: bound[n] for n in names})

    cls = with_signature(EncoderWithCrossCache, f"{type(model).__name__}Encoder", names, run)
    return cls(model).eval()


class DecoderWithCache(nn.Module):
    """One decoder step (or several) over the self-attention past and the cross cache."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def run(
        self, tokens: torch.Tensor, mask: torch.Tensor | None, past: list[torch.Tensor], cross: list[torch.Tensor]
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
        masked = {} if mask is None else {"attention_mask": mask}
        out = model(
            encoder_outputs=(states,), decoder_input_ids=tokens, use_cache=True, **masked,
            **{cache_keyword(model): cache},
        )  # fmt: skip
        result = {"logits": out.logits}
        for i, layer in enumerate(returned_cache(out).self_attention_cache.layers):
            result[f"present_key_{i}"], result[f"present_value_{i}"] = layer.keys, layer.values
        return result


def _decoder(model: nn.Module, names: list[str], layers: int) -> nn.Module:
    past, cross = past_names(layers), cross_names(layers)

    def run(self: DecoderWithCache, bound: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens, mask = bound["decoder_input_ids"], bound.get("encoder_attention_mask")
        return self.run(tokens, mask, [bound[n] for n in past], [bound[n] for n in cross])

    cls = with_signature(DecoderWithCache, f"{type(model).__name__}DecoderWithCache", names, run)
    return cls(model, layers).eval()
