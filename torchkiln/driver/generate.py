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

import contextlib
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from torchkiln.backends.base import CacheSession
from torchkiln.compiler.budget import check_allocation
from torchkiln.compiler.causal_lm import positions
from torchkiln.compiler.program import bind_inputs, dtype_from_name
from torchkiln.compiler.seq2seq import PROMPT, SPEECH
from torchkiln.compiler.state_space import is_state, state_names
from torchkiln.compiler.verify import cosine_similarity
from torchkiln.driver.compiled import check_outputs
from torchkiln.errors import ArtifactError, InputError

PAST = "past_"
STATE = state_names(1)[0]  # a state-space LM's first state input


class _FromModel:
    def __repr__(self) -> str:
        return "FROM_MODEL"


#: how many tokens generate() makes unless told (the CLI's --max-new-tokens default too)
MAX_NEW_TOKENS = 20

#: a setting's default: the model's own value (``CompiledModel.generation``)
FROM_MODEL: Any = _FromModel()


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
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
    """The prompt followed by up to ``max_new_tokens`` generated tokens, [batch, prompt + new]; for
    an encoder-decoder the decoder's sequence, [batch, 1 + new] (its start token first)."""
    specs = {spec.name: spec for spec in model.inputs}
    stepped = STATE in specs  # a state-space LM: one token per call, the prompt included
    if not stepped and not any(name.startswith(PAST) for name in specs):
        raise InputError(
            "this artifact was compiled without the KV cache: it cannot generate",
            hint="compile the causal LM with its cache on: torchkiln.compile(lm, {'input_ids': ids}) "
            "without use_cache=False, and with model.config.use_cache=True (MPT's config defaults to False)",
        )
    encoder = getattr(model, "encoder", None)
    speech = encoder is not None and SPEECH in {spec.name for spec in encoder.inputs}
    if speech:  # a speech encoder-decoder (Whisper): the first argument is the features
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 3 or not input_ids.is_floating_point():
            raise InputError("input_features must be a float tensor [batch, mels, frames]", where=SPEECH)
        if attention_mask is not None:
            raise InputError("a speech encoder takes no attention_mask", where="attention_mask")
    elif not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError("input_ids must be an integer tensor [batch, prompt]", where="input_ids")
    settings = getattr(model, "generation", None) or {}
    if eos_token_id is FROM_MODEL:
        eos_token_id = settings.get("eos_token_id")
    if pad_token_id is FROM_MODEL:
        pad_token_id = settings.get("pad_token_id")
        pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
    check_settings(model, dict(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    ))  # fmt: skip
    _check_positions(0 if speech else input_ids.shape[1], max_new_tokens, encoder is not None, settings)
    batch = input_ids.shape[0]
    check_cache_memory(model, batch, 1 if encoder is not None else input_ids.shape[1], max_new_tokens)
    mask = torch.ones(input_ids.shape[:2], dtype=torch.long) if attention_mask is None else attention_mask
    if not speech and (not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape):
        raise InputError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}", where="attention_mask")
    # A model whose forward takes no position_ids (Bloom's ALiBi, OPT) counts positions from the
    # mask itself, as under transformers' generate; without a mask input padding cannot be told.
    if encoder is None and "attention_mask" not in specs and not bool((mask != 0).all()):
        raise InputError(
            "this artifact has no attention_mask input: a padded batch would attend to its padding",
            where="attention_mask",
            hint="compile with an attention_mask in the example inputs, or generate each prompt in its own call",
        )
    # the cache holds at most the first tokens and the new ones (a runtime that keeps it in place
    # allocates this many positions: Artifact.cache_session)
    if stepped:
        first = input_ids
        session: _Session = _StateSession(model, mask, first.shape[1] + max_new_tokens)
    elif encoder is None:
        first = input_ids
        session = _CausalSession(model, mask, first.shape[1] + max_new_tokens)
    else:
        # a speech model's decoder prompt (start, forced tokens, no-timestamps: compiler.seq2seq.decoder_prompt)
        prompt = _decoder_prompt(settings)
        start = prompt if speech and prompt else [settings["decoder_start_token_id"]]
        first = torch.tensor([[int(t) for t in start if t is not None]] * batch, dtype=torch.long)
        sources = {SPEECH: input_ids} if speech else {"input_ids": input_ids, "attention_mask": mask}
        cross = encoder(**sources)
        session = _DecoderSession(model, cross, None if speech else mask, first.shape[1] + max_new_tokens)
    forced = {0: settings.get("forced_bos_token_id") if encoder else None}
    forced[max_new_tokens - 1] = settings.get("forced_eos_token_id")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with _bookkeeping_threads(model):
        done = torch.zeros(batch, dtype=torch.bool)
        tokens, step = [first], first
        for index in range(max_new_tokens):
            logits = session(step)
            if eos_token_id is not None and index < min_new_tokens:
                logits[:, eos_token_id] = -float("inf")
            if forced.get(index) is not None:  # the model's generation config forces this token here
                logits = torch.full_like(logits, -float("inf")).index_fill_(1, torch.tensor([forced[index]]), 0.0)
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
    return torch.cat(tokens, 1)


@contextlib.contextmanager
def _bookkeeping_threads(model: Any) -> Iterator[None]:
    """Torch at one thread while an artifact that runs outside torch generates: the loop's own
    torch ops (argmax over the vocabulary, the growing mask) would otherwise leave torch's OpenMP
    workers spinning on the cores the runtime needs (a 125M Llama int4 decode step at batch 8 on 2
    cores: 40-46 ms with torch's 2 threads, 24-27 ms with 1). The torch backend keeps its threads."""
    if getattr(model, "backend", "torch") == "torch":
        yield
        return
    # torch's thread count is the process's: with generations in several threads, the first lowers
    # it and the last one out restores it
    with _THREADS.lock:
        if _THREADS.running == 0:
            _THREADS.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS.running += 1
    try:
        yield
    finally:
        with _THREADS.lock:
            _THREADS.running -= 1
            if _THREADS.running == 0:
                torch.set_num_threads(_THREADS.saved)


class _Threads:
    """How many generations outside torch are running, and torch's thread count before the first."""

    def __init__(self) -> None:
        self.lock, self.running, self.saved = threading.Lock(), 0, 1


_THREADS = _Threads()


def _check_positions(prompt: int, new: int, encoder_decoder: bool, settings: dict[str, Any]) -> None:
    """A causal LM's prompt and new tokens share its positions; an encoder-decoder's prompt and
    its decoder's sequence (start token + new tokens) each have them."""
    limit = settings.get("max_positions")
    if limit is None or (max(prompt, 1 + new) if encoder_decoder else prompt + new) <= limit:
        return
    what = f"1 + max_new_tokens={new} decoder tokens" if encoder_decoder else f"plus max_new_tokens={new}"
    raise InputError(
        f"a prompt of {prompt} tokens {'or ' if encoder_decoder else ''}{what} exceeds the model's {limit} positions",
        where="input_ids" if prompt >= limit else "max_new_tokens",
        hint=f"keep within {limit} positions (shorten the prompt or ask for fewer tokens)",
    )


def check_cache_memory(
    model: Any, batch: int, prompt: int, new: int, setting: str = "max_new_tokens", value: Any = None
) -> None:
    """The cache a generation grows to (every past input whose length grows, at prompt + new positions) priced
    against the memory budget before it is allocated: a runtime that keeps it in place allocates
    all of it at the first step, and a model without a position limit has no other bound. The
    error names ``setting`` (default: ``max_new_tokens``) and ``value`` (default: ``new``)."""
    per_position, positions = 0, prompt + new
    for spec in model.inputs:
        shape = spec.shape
        if spec.name.startswith(PAST) and len(shape) == 4 and not isinstance(shape[2], int):
            fixed = math.prod(d for d in (shape[1], shape[3]) if isinstance(d, int))
            per_position += batch * fixed * dtype_from_name(spec.dtype).itemsize
    check_allocation(setting, new if value is None else value, per_position * positions,
                     f"a KV cache of {positions} positions at batch {batch}")  # fmt: skip


class _Session:
    """Runs one step over its own cache: tokens [batch, n] → the last position's logits [batch, vocab]."""

    def __init__(self, model: Any, past: dict[str, torch.Tensor], capacity: int):
        self.model, self.past = model, past
        self.kept = _KeptCache.open(model, past, capacity)

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kept is not None:
            logits = self.kept.run(inputs)
            if self.model.artifact in _AGREED:
                return logits[:, -1].float()
            return self._check(logits, inputs)[:, -1].float()
        return self._plain(inputs)[:, -1].float()

    def _check(self, kept: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The first step on an artifact's runtime-kept cache is also run the artifact's own way (the
        verified graph, the cache passed): the two logits must agree (finite, cosine >= AGREEMENT)
        before the runtime's form is trusted for this artifact; else a warning, and this generation
        goes on with the cache passed (from the plain run's cache)."""
        plain = self._plain(inputs)
        cosine = cosine_similarity(kept, plain) if kept.shape == plain.shape and bool(kept.isfinite().all()) else 0.0
        if cosine >= AGREEMENT:
            _AGREED.add(self.model.artifact)
            return kept
        warnings.warn(
            f"the {self.model.backend} runtime's in-place cache disagrees with the artifact's own graph on the prompt "
            f"(logits cosine {cosine:.6f} < {AGREEMENT}); generating with the cache passed in and out instead",
            RuntimeWarning,
            stacklevel=2,
        )
        self.kept = None
        return plain

    def _plain(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step with the cache passed in and out: the logits [batch, n, vocab]."""
        out = self.model(**inputs, **self.past)
        self.past = {name: out[_present(name)] for name in self.past}
        return out["logits"]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


#: the artifacts whose runtime-kept cache agreed with their own graph once (:meth:`_Session._check`)
_AGREED: weakref.WeakSet[Any] = weakref.WeakSet()
AGREEMENT = 0.999


class _KeptCache:
    """The cache kept inside the runtime from step to step (:meth:`Artifact.cache_session`, e.g.
    OpenVINO's stateful form): a step passes the other inputs and reads the logits; the cache never
    crosses into torch."""

    def __init__(self, model: Any, session: CacheSession, past: dict[str, torch.Tensor], cache_outputs: set[int], logits: int):
        self.session = session
        self.specs = [spec for spec in model.inputs if spec.name not in past]
        outputs = [i for i in range(len(model.outputs)) if i not in cache_outputs]
        self.logits = outputs.index(logits)
        self.checked = [model.outputs[i] for i in outputs] if model.declared_outputs else None

    @classmethod
    def open(cls, model: Any, past: dict[str, torch.Tensor], capacity: int) -> _KeptCache | None:
        artifact = getattr(model, "artifact", None)
        if artifact is None or not past:
            return None
        # the output structure with each output's flat index in place of its tensor
        index = pytree.tree_unflatten(list(range(len(model.outputs))), model.out_spec)
        if not isinstance(index, dict):
            return None
        names = [spec.name for spec in model.inputs]
        pairs = [(names.index(name), int(index[_present(name)])) for name in past]
        session = artifact.cache_session(pairs, list(past.values()), capacity)
        if session is None:
            return None
        return cls(model, session, past, {o for _, o in pairs}, int(index["logits"]))

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        results = self.session.run(bind_inputs(self.specs, (), inputs))
        if self.checked is not None:  # a loaded artifact is held to its manifest
            check_outputs(results, self.checked)
        return results[self.logits]


def _present(past: str) -> str:
    """The output that is the next value of the cache input ``past``."""
    return "present_" + past.removeprefix(PAST)


class _CausalSession(_Session):
    """A causal LM: the mask grows by each step's tokens (the prompt's is given)."""

    def __init__(self, model: Any, mask: torch.Tensor, capacity: int):
        super().__init__(model, empty_past(model, len(mask)), capacity)
        self.mask, self.started = mask, False
        self.names = frozenset(spec.name for spec in model.inputs)  # once, not per token

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.started:
            self.mask = torch.cat([self.mask, torch.ones_like(tokens)], 1)
        self.started = True
        inputs = step_inputs(self.names, tokens, self.mask, {})
        return self.run(inputs)


class _StateSession(_Session):
    """A state-space LM: the states start at zero and every token, the prompt's too, is one call
    (a padding token, mask 0, leaves them unchanged)."""

    def __init__(self, model: Any, mask: torch.Tensor, capacity: int):
        states = {s.name: torch.zeros(len(mask), *s.shape[1:]) for s in model.inputs if is_state(s.name)}
        super().__init__(model, states, capacity)
        self.mask, self.started = mask, False

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        masks = self.mask.split(1, 1) if not self.started else [torch.ones_like(tokens)]
        self.started = True
        logits = torch.empty(0)
        for column, mask in zip(tokens.split(1, 1), masks):
            logits = self.run({"input_ids": column, "attention_mask": mask})
        return logits


class _DecoderSession(_Session):
    """An encoder-decoder's decoder: the encoder's mask and cross cache stay for every step."""

    def __init__(self, model: Any, cross: dict[str, torch.Tensor], mask: torch.Tensor | None, capacity: int):
        batch = next(iter(cross.values())).shape[0]
        super().__init__(model, empty_past(model, batch), capacity)
        self.fixed = {**({} if mask is None else {"encoder_attention_mask": mask}), **cross}

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.run({"decoder_input_ids": tokens, **self.fixed})


def empty_past(model: Any, batch: int) -> dict[str, torch.Tensor]:
    """The cache inputs of a prompt: every ``past_*`` input with 0 positions (int8 codes and their
    scales where the cache is int8)."""
    return {
        s.name: torch.zeros(batch, s.shape[1], 0, s.shape[3], dtype=dtype_from_name(s.dtype))
        for s in model.inputs
        if s.name.startswith(PAST)
    }


def step_inputs(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, past: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The artifact's inputs for ``input_ids`` after ``past``: ``mask`` covers past + new tokens.
    ``model`` is an artifact or the names of its inputs."""
    names = {spec.name for spec in model.inputs} if hasattr(model, "inputs") else set(model)
    inputs = {"input_ids": input_ids, **past}
    if "attention_mask" in names:
        inputs["attention_mask"] = mask
    if "position_ids" in names:
        inputs["position_ids"] = positions(mask, input_ids.shape[1])
    return inputs


def lm_steps(
    call: Callable[..., Any], names: Collection[str], past: dict[str, torch.Tensor], ids: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The inputs of two steps of a causal LM with its cache passed in and out: the prefill of the
    prompt ``ids[:, :-1]`` over the empty ``past``, and the decode of ``ids[:, -1:]`` after it (its
    past the present ``call`` returned for the prefill: what a generation's second step sees)."""
    prompt, mask = ids[:, :-1], torch.ones_like(ids)
    prefill = step_inputs(names, prompt, mask[:, :-1], past)
    out = call(**prefill)
    present = {name: out[_present(name)] for name in past}
    return prefill, step_inputs(names, ids[:, -1:], mask, present)


def prompt_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, sequence, vocab] of unpadded prompts, run with an empty cache."""
    return model(
        **step_inputs(model, input_ids, torch.ones_like(input_ids), empty_past(model, len(input_ids)))
    )["logits"]


TOKEN_SETTINGS = ("eos_token_id", "pad_token_id", "forced_bos_token_id", "forced_eos_token_id", "decoder_start_token_id")
def _decoder_prompt(settings: dict[str, Any]) -> list[int]:
    """``decoder_prompt_0``, ``decoder_prompt_1``, ... in order; any other shape is a broken manifest."""
    found = {k.removeprefix(PROMPT): v for k, v in settings.items() if k.startswith(PROMPT)}
    if sorted(found) != sorted(str(i) for i in range(len(found))) or any(type(v) is not int for v in found.values()):
        raise ArtifactError(
            f"the artifact's generation settings hold a malformed decoder prompt: {sorted(found)}",
            where="generation",
            hint="rebuild the artifact",
        )
    return [found[str(i)] for i in range(len(found))]


def check_settings(model: Any, settings: dict[str, Any]) -> None:
    """Every generation setting, before the first token (a bad one failed mid-generation, after
    tokens were printed, with a raw IndexError / RuntimeError): counts are integers in range,
    temperature and top_p finite numbers in range, the seed fits 64 bits, and every special token —
    given or from the artifact's manifest — lies in the model's vocabulary."""
    _integer(settings, "max_new_tokens", 1, None)
    _integer(settings, "min_new_tokens", 0, settings["max_new_tokens"], "[0, max_new_tokens]")
    _integer(settings, "top_k", 0, None)
    if not isinstance(settings["do_sample"], bool):
        raise InputError(f"do_sample must be True or False, got {settings['do_sample']!r}", where="do_sample")
    for name, fits, shown in (("temperature", lambda v: v > 0, "> 0"), ("top_p", lambda v: 0 < v <= 1, "in (0, 1]")):
        value = settings[name]
        if not _real(value) or not math.isfinite(value) or not fits(value):
            raise InputError(f"{name} must be {shown}, got {value!r}", where=name)
    if settings["seed"] is not None:
        _integer(settings, "seed", 0, 2**64 - 1, "[0, 2**64)")
    vocab = vocabulary(model)
    tokens = {**{k: v for k, v in (getattr(model, "generation", None) or {}).items()
                 if k in TOKEN_SETTINGS or k.startswith(PROMPT)},
              **{k: settings[k] for k in ("eos_token_id", "pad_token_id")}}  # fmt: skip
    for name, value in tokens.items():
        if value is not None:
            _integer(tokens, name, 0, None if vocab is None else vocab - 1, f"[0, {vocab}) (the vocabulary)")


def _integer(settings: dict[str, Any], name: str, low: int, high: int | None, shown: str | None = None) -> None:
    value = settings[name]
    integral = isinstance(value, int) and not isinstance(value, bool)
    if not integral or value < low or (high is not None and value > high):
        raise InputError(f"{name} must be {shown or f'>= {low}'}, got {value!r}", where=name)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def vocabulary(model: Any) -> int | None:
    """The logits' last dimension (the outputs are named through the output structure)."""
    outputs, spec = getattr(model, "outputs", None), getattr(model, "out_spec", None)
    if outputs is None or spec is None:
        return None
    named = pytree.tree_unflatten(outputs, spec)
    logits = named.get("logits") if isinstance(named, dict) else None
    size = logits.shape[-1] if logits is not None else None
    return size if isinstance(size, int) else None


def _pick(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, generator: Any
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    # each row's best logit is 0 before scaling: every scaled logit is finite or -inf whatever the
    # temperature (1e-40 overflowed float32 to inf, then NaN probabilities); T -> 0 is greedy
    logits = logits.double()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
