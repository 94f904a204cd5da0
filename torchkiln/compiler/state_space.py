"""State-space LMs (Mamba) with their recurrent state: one graph for one token.

Mamba's cache is not keys and values over positions but two fixed-size states per layer — the
convolution's last inputs ``conv_state_<i>`` [batch, channels, kernel] and the SSM state
``ssm_state_<i>`` ([batch, channels, state]; Mamba2: [batch, heads, head dim, state]) — so
:func:`with_state` wraps the model as one step:

* inputs ``input_ids`` [batch, 1], ``attention_mask`` [batch, 1] (1 for a token, 0 for padding:
  a masked token leaves the states as they were, as transformers' masked prompt scan does for
  left padding) and every layer's two states;
* outputs ``logits`` [batch, 1, vocab] and ``present_conv_state_<i>`` / ``present_ssm_state_<i>``.

Only the batch is dynamic. A prompt runs through the same graph one token at a time (the step
form of the scan, not transformers' unrolled sequence form, whose captured graph would fix the
prompt length); ``generate`` does that and then decodes. The layer shapes are read from one eager
call with the cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchkiln.compiler.causal_lm import cache_keyword, returned_cache, wants_cache, with_signature
from torchkiln.errors import InputError

KINDS = ("conv", "ssm")


def wants_state(model: nn.Module, example_inputs: Any) -> bool:
    """A causal LM with its cache on whose config has a state size and a convolution kernel."""
    if not wants_cache(model, example_inputs):
        return False
    config = getattr(model, "config", None)
    return all(isinstance(getattr(config, f, None), int) for f in ("state_size", "conv_kernel"))


def state_names(layers: int) -> list[str]:
    return [f"{kind}_state_{i}" for i in range(layers) for kind in KINDS]


def is_state(name: str) -> bool:
    """Whether ``name`` is one of :func:`state_names`."""
    return any(name.startswith(f"{kind}_state_") and name.rsplit("_", 1)[-1].isdigit() for kind in KINDS)


def with_state(
    model: nn.Module, example_inputs: Mapping[str, Any]
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, dict[int, str]]]:
    """The one-step wrapper, its example inputs (the example's first token, random states) and axes."""
    extra = sorted(set(example_inputs) - {"input_ids", "attention_mask", "use_cache"})
    ids = example_inputs.get("input_ids")
    if extra or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise InputError(
            f"a state-space LM with its state takes input_ids [batch, sequence] (and attention_mask); got "
            f"{sorted(example_inputs)}",
            where="example_inputs",
            hint="pass {'input_ids': ids}; for a graph without the state pass use_cache=False",
        )
    shapes = _state_shapes(model, ids)
    batch = ids.shape[0]
    generator = torch.Generator().manual_seed(0)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids[:, :1], "attention_mask": torch.ones_like(ids[:, :1])}
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}}
    for name, shape in zip(state_names(len(shapes) // 2), shapes):
        inputs[name] = 0.1 * torch.randn(batch, *shape, generator=generator)
        axes[name] = {0: "batch"}
    names = [*inputs]
    layers = len(shapes) // 2

    def run(self: StateSpaceStep, bound: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        states = [bound[n] for n in state_names(layers)]
        return self.run(bound["input_ids"], bound["attention_mask"], states)

    cls = with_signature(StateSpaceStep, f"{type(model).__name__}Step", names, run)
    return cls(model, layers).eval(), inputs, axes


def _state_shapes(model: nn.Module, ids: torch.Tensor) -> list[tuple[int, ...]]:
    """[channels, kernel] and [channels, state] per layer, from one eager call with the cache."""
    with torch.no_grad():
        out = model(input_ids=ids[:1, :2], use_cache=True)
    shapes: list[tuple[int, ...]] = []
    for i, layer in enumerate(getattr(returned_cache(out), "layers", None) or []):
        conv = (getattr(layer, "conv_states", None) or {}).get(0)
        ssm = (getattr(layer, "recurrent_states", None) or {}).get(0)
        if not isinstance(conv, torch.Tensor) or not isinstance(ssm, torch.Tensor):
            raise InputError(
                f"{type(model).__name__}'s cache layer {i} ({type(layer).__name__}) holds no convolution and "
                "recurrent state",
                hint="compile it with use_cache=False (a graph without the cache)",
            )
        shapes += [tuple(conv.shape[1:]), tuple(ssm.shape[1:])]
    if not shapes:
        raise InputError(f"{type(model).__name__} returned no per-layer state", hint="compile it with use_cache=False")
    return shapes


class StateSpaceStep(nn.Module):
    """``model`` run for one token over given states; forward's signature is set per layer count."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def run(self, ids: torch.Tensor, mask: torch.Tensor, states: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        import transformers

        model: Any = self.model
        cache = transformers.DynamicCache(config=model.config)
        for i in range(self.layers):
            conv, ssm = states[2 * i], states[2 * i + 1]
            layer: Any = cache.layers[i]
            # the states as a layer holds them after a prompt (its in-place updates then write copies)
            layer.dtype, layer.device = conv.dtype, conv.device
            layer.conv_states[0], layer.recurrent_states[0] = conv.clone(), ssm.clone()
            layer.conv_kernel_size[0] = conv.shape[-1]
            layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
            layer.has_previous_state[0] = True
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_keyword(model): cache})
        result = {"logits": out.logits}
        for i, layer in enumerate(returned_cache(out).layers):
            pairs = (("conv", layer.conv_states[0], states[2 * i]), ("ssm", layer.recurrent_states[0], states[2 * i + 1]))
            for kind, new, old in pairs:  # a masked (padding) token leaves the states unchanged
                keep = mask.to(new.dtype).reshape(-1, *[1] * (new.dim() - 1))
                result[f"present_{kind}_state_{i}"] = keep * new + (1 - keep) * old
        return result
