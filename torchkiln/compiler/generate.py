"""Token generation with an artifact compiled with its KV cache (:mod:`torchkiln.compiler.causal_lm`).

The prompt runs with an empty past (prefill), then one token at a time with the returned present
(decode). Greedy by default; with ``do_sample`` the logits are scaled by ``temperature`` and
filtered by ``top_k`` / ``top_p`` before sampling from a generator seeded with ``seed``. A sequence
stops at ``eos_token_id`` (then emits ``pad_token_id``); the loop stops when all have, or after
``max_new_tokens``. ``on_token`` receives each step's tokens [batch].

A batch of prompts of different lengths is left-padded (``attention_mask`` 0 on the left); the
artifact's ``position_ids`` input then counts each row from its first token. ``eos_token_id`` and
``pad_token_id`` default to the model's (:data:`FROM_MODEL`, kept in the artifact's manifest);
``None`` turns them off. The prompt plus ``max_new_tokens`` must fit the model's positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from torchkiln.compiler.causal_lm import positions
from torchkiln.errors import InputError

PAST = "past_"


class _FromModel:
    def __repr__(self) -> str:
        return "FROM_MODEL"


#: a setting's default: the model's own value (``CompiledModel.generation``)
FROM_MODEL: Any = _FromModel()


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = FROM_MODEL,
    pad_token_id: int | None = FROM_MODEL,
    seed: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The prompt followed by up to ``max_new_tokens`` generated tokens, [batch, prompt + new]."""
    specs = {spec.name: spec for spec in model.inputs}
    past_names = [name for name in specs if name.startswith(PAST)]
    if not past_names:
        raise InputError(
            "this artifact was compiled without the KV cache: it cannot generate",
            hint="compile the causal LM with its cache on: torchkiln.compile(lm, {'input_ids': ids}) "
            "without use_cache=False",
        )
    _check_settings(max_new_tokens, min_new_tokens, temperature, top_k, top_p)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError("input_ids must be an integer tensor [batch, prompt]", where="input_ids")
    settings = getattr(model, "generation", None) or {}
    if eos_token_id is FROM_MODEL:
        eos_token_id = settings.get("eos_token_id")
    if pad_token_id is FROM_MODEL:
        pad_token_id = settings.get("pad_token_id")
        pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
    limit = settings.get("max_positions")
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise InputError(
            f"a prompt of {input_ids.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceeds "
            f"the model's {limit} positions",
            where="input_ids" if input_ids.shape[1] >= limit else "max_new_tokens",
            hint=f"keep prompt + max_new_tokens <= {limit} (shorten the prompt or ask for fewer tokens)",
        )
    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask must have input_ids' shape {list(input_ids.shape)}", where="attention_mask"
        )
    if "position_ids" not in specs and not bool((mask != 0).all()):
        raise InputError(
            "this artifact has no position_ids input: padded prompts would get the wrong positions",
            where="attention_mask",
            hint="compile with an attention_mask in the example inputs, or generate each prompt in its own call",
        )
    past = empty_past(model, batch)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    done = torch.zeros(batch, dtype=torch.bool)
    tokens, step = [input_ids], input_ids
    for index in range(max_new_tokens):
        out = model(**step_inputs(model, step, mask, past))
        logits = out["logits"][:, -1].float()
        if eos_token_id is not None and index < min_new_tokens:
            logits[:, eos_token_id] = -float("inf")
        step = _pick(logits, do_sample, temperature, top_k, top_p, generator).unsqueeze(1)
        if pad_token_id is not None:
            step = torch.where(done.unsqueeze(1), torch.full_like(step, pad_token_id), step)
        if eos_token_id is not None:
            done |= step.squeeze(1) == eos_token_id
        tokens.append(step)
        if on_token is not None:
            on_token(step.squeeze(1))
        if bool(done.all()):
            break
        past = {name: out["present_" + name[len(PAST) :]] for name in past_names}
        mask = torch.cat([mask, torch.ones_like(step)], 1)
    return torch.cat(tokens, 1)


def empty_past(model: Any, batch: int) -> dict[str, torch.Tensor]:
    """The cache inputs of a prompt: every ``past_*`` input with 0 positions."""
    return {
        s.name: torch.zeros(batch, s.shape[1], 0, s.shape[3]) for s in model.inputs if s.name.startswith(PAST)
    }


def step_inputs(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, past: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The artifact's inputs for ``input_ids`` after ``past``: ``mask`` covers past + new tokens."""
    names = {spec.name for spec in model.inputs}
    inputs = {"input_ids": input_ids, **past}
    if "attention_mask" in names:
        inputs["attention_mask"] = mask
    if "position_ids" in names:
        inputs["position_ids"] = positions(mask, input_ids.shape[1])
    return inputs


def prompt_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, sequence, vocab] of unpadded prompts, run with an empty cache."""
    return model(
        **step_inputs(model, input_ids, torch.ones_like(input_ids), empty_past(model, len(input_ids)))
    )["logits"]


def _check_settings(max_new_tokens: int, min_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}", where="max_new_tokens")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise InputError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}", where="min_new_tokens")
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}", where="temperature")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0, got {top_k}", where="top_k")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}", where="top_p")


def _pick(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, generator: Any
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
