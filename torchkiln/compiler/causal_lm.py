"""Decoder LMs with their KV cache: one graph for the prompt (prefill) and each new token (decode).

A Hugging Face causal LM called with its cache returns a ``Cache`` object, which is not a tensor
and cannot be a graph output. :func:`with_cache` wraps the model so that the cache is tensors in
and out, as the peers do (Optimum's causal-lm-with-past, ONNX Runtime GenAI):

* inputs ``input_ids`` [batch, sequence], ``attention_mask`` [batch, past + sequence] and
  ``position_ids`` [batch, sequence] (when the example has a mask; positions when the model's
  forward takes them), and ``past_key_<i>`` / ``past_value_<i>`` [batch, kv heads, past, head dim]
  for every layer i;
* outputs ``logits`` and ``present_key_<i>`` / ``present_value_<i>`` (the past with the new
  positions appended).

Batch, sequence, past (and the mask's ``past+sequence``) are dynamic axes; a past of length 0 is the prompt.
The layer shapes (grouped-query heads, head dim) are read from one eager call with the cache, not
from config fields that differ between architectures. Positions are an input so that a
left-padded batch counts each row from its first real token, as transformers' generate does
(``mask.cumsum(-1) - 1``); without a mask they come from the cache length.

:func:`generation_settings` keeps what generation needs from the model's config (special tokens,
the number of positions); it goes into the artifact's manifest.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchkiln.errors import InputError

EXAMPLE_PAST = 2  # past length traced with: 0 and 1 would be specialized by torch.export
TOTAL = "past+sequence"  # the mask's axis: a sum, so the widened check grows it by two (export.widen)


def wants_cache(model: nn.Module, example_inputs: Any) -> bool:
    """A Hugging Face causal LM whose example inputs leave its cache on (no ``use_cache=False``,
    no ``past_key_values`` of their own)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not getattr(config, "use_cache", False):
        return False
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        return False
    if not isinstance(example_inputs, Mapping):
        return False
    return example_inputs.get("use_cache", True) is not False and "past_key_values" not in example_inputs


def with_cache(
    model: nn.Module, example_inputs: Mapping[str, Any]
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, dict[int, str]]]:
    """The wrapped model, its example inputs (with a past of ``EXAMPLE_PAST`` positions) and its
    dynamic axes."""
    extra = sorted(set(example_inputs) - {"input_ids", "attention_mask", "use_cache"})
    if "input_ids" not in example_inputs or extra:
        raise InputError(
            f"a causal LM with its KV cache takes input_ids (and attention_mask); got {sorted(example_inputs)}",
            where="example_inputs",
            hint="pass {'input_ids': ids} or {'input_ids': ids, 'attention_mask': mask}; "
            "for a graph without the cache pass use_cache=False",
        )
    ids = example_inputs["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise InputError("input_ids must be an integer tensor [batch, sequence]", where="input_ids")
    mask = example_inputs.get("attention_mask")
    shapes = _cache_shapes(model, ids)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"}}
    has_positions = mask is not None and "position_ids" in inspect.signature(model.forward).parameters
    if mask is not None:
        inputs["attention_mask"] = torch.cat([torch.ones(ids.shape[0], EXAMPLE_PAST, dtype=mask.dtype), mask], 1)
        axes["attention_mask"] = {0: "batch", 1: TOTAL}
    if has_positions:
        inputs["position_ids"] = positions(inputs["attention_mask"], ids.shape[1])
        axes["position_ids"] = {0: "batch", 1: "sequence"}
    generator = torch.Generator().manual_seed(0)
    for i, (key, value) in enumerate(shapes):
        for kind, shape in (("key", key), ("value", value)):
            name = f"past_{kind}_{i}"
            inputs[name] = torch.randn(ids.shape[0], shape[0], EXAMPLE_PAST, shape[1], generator=generator)
            axes[name] = {0: "batch", 2: "past"}
    names = [*inputs]
    return _wrapper(model, names, len(shapes)), inputs, axes


def positions(mask: torch.Tensor, sequence: int) -> torch.Tensor:
    """The positions of the last ``sequence`` tokens under ``mask`` [batch, total]: each row counts
    from its first unmasked token (padding gets 1), as transformers' generate computes them."""
    counted = mask.long().cumsum(-1) - 1
    return counted.masked_fill(mask == 0, 1)[:, mask.shape[1] - sequence :]


def past_names(layers: int) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_positions", "max_target_positions")


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def generation_settings(model: nn.Module, tokens: tuple[str, ...] = SPECIAL_TOKENS) -> dict[str, int | None]:
    """``tokens`` (from the generation config, else the config; the first of a list) and the number
    of positions, ``None`` where the model has none."""
    config = getattr(model, "config", None)
    generation = getattr(model, "generation_config", None)

    def token(name: str) -> int | None:
        value = getattr(generation, name, None)
        value = getattr(config, name, None) if value is None else value
        if isinstance(value, list):  # several EOS ids: the first (generate takes one)
            value = value[0] if value else None
        return int(value) if isinstance(value, int) else None

    limit = next((getattr(config, f) for f in _POSITION_FIELDS if isinstance(getattr(config, f, None), int)), None)
    return {name: token(name) for name in tokens} | {"max_positions": limit}


def _cache_shapes(model: nn.Module, ids: torch.Tensor) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(heads, head dim) of every layer's keys and values, from one eager call with the cache."""
    with torch.no_grad():
        out = model(input_ids=ids[:1, :1], use_cache=True)
    cache = returned_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise InputError(
            f"{type(model).__name__} returned no per-layer KV cache ({type(cache).__name__})",
            hint="compile it with use_cache=False (a graph without the cache)",
        )
    shapes = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
            raise InputError(
                f"{type(model).__name__}'s cache layer {type(layer).__name__} holds no [batch, heads, positions, dim] tensors",
                hint="compile it with use_cache=False (a graph without the cache)",
            )
        shapes.append(((keys.shape[1], keys.shape[3]), (values.shape[1], values.shape[3])))
    return shapes


def cache_keyword(model: nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    return output["cache"] if "cache" in output else getattr(output, "past_key_values", None)


class CausalLMWithCache(nn.Module):
    """``model`` with its cache as tensors; forward's signature is set per layer count."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def run(self, inputs: dict[str, torch.Tensor], past: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        import transformers

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        # Full-length layers even where the config has a sliding window: a cropped cache would count
        # its positions from its kept length, misplacing a padded batch's mask; the model's
        # sliding-window mask applies the window to the full cache instead (same tokens attended).
        cache = transformers.DynamicCache(ddp_cache_data=pairs)
        keyword = cache_keyword(self.model)
        out = self.model(**inputs, use_cache=True, **{keyword: cache})
        result = {"logits": out.logits}
        for i, layer in enumerate(returned_cache(out).layers):
            result[f"present_key_{i}"], result[f"present_value_{i}"] = layer.keys, layer.values
        return result


def with_signature(cls: type[nn.Module], name: str, names: list[str], run: Any) -> type[nn.Module]:
    """A subclass of ``cls`` named ``name`` whose ``forward`` takes ``names`` (positional or by
    keyword, as capture binds them) and calls ``run(self, {name: tensor})``."""

    def forward(self: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        return run(self, dict(zip(names, args)) | kwargs)

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", positional), *(inspect.Parameter(n, positional) for n in names)]
    )
    return type(name, (cls,), {"forward": forward})


def _wrapper(model: nn.Module, names: list[str], layers: int) -> nn.Module:
    cached = past_names(layers)

    def run(self: CausalLMWithCache, bound: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run({n: bound[n] for n in names if n not in cached}, [bound[n] for n in cached])

    cls = with_signature(CausalLMWithCache, f"{type(model).__name__}WithCache", names, run)
    return cls(model, layers).eval()
