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
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchkiln.compiler import kv_cache
from torchkiln.compiler.calibration import CACHE_AXIS, Expanded, guarded, held_back_count, hold_back
from torchkiln.compiler.verify import cosine_similarity
from torchkiln.errors import InputError

EXAMPLE_PAST = 2  # past length traced with: 0 and 1 would be specialized by torch.export
DECODE_STEPS = 4  # calibration: greedy decode steps run after each prompt's prefill
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
    model: nn.Module, example_inputs: Mapping[str, Any], kv: str = "float", prompts: Any = None
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, dict[int, str]]]:
    """The wrapped model, its example inputs (with a past of ``EXAMPLE_PAST`` positions) and its
    dynamic axes. ``kv`` is the cache's form (:data:`kv_cache.MODES`); ``int8-calibrated`` sets
    its scales on ``prompts`` (calibration prompts; those held back are not read)."""
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
    past = _real_past(model, ids, shapes)
    fixed = None
    if kv == "int8-calibrated":
        float_inputs = inputs | {f"past_{name}": tensor for name, tensor in past.items()}
        steps = calibration_steps(_wrapper(model, [*float_inputs], len(shapes)), float_inputs, prompts)
        fixed = kv_cache.calibrated_scales(hold_back(steps)[0], len(shapes))
    for i in range(len(shapes)):
        for kind in ("key", "value"):
            tensor = past[f"{kind}_{i}"]
            if kv != "float":
                tensor, scale = kv_cache.quantize(
                    tensor, None if fixed is None else fixed[i][kind == "value"]
                )
            inputs[f"past_{kind}_{i}"] = tensor
            if kv_cache.per_step(kv):
                inputs[f"past_{kind}_scale_{i}"] = scale
            for name in (f"past_{kind}_{i}", f"past_{kind}_scale_{i}"):
                if name in inputs:
                    axes[name] = {0: "batch", 2: CACHE_AXIS}
    return _wrapper(model, [*inputs], len(shapes), kv, fixed), inputs, axes


def calibration_steps(wrapped: nn.Module, example: Mapping[str, torch.Tensor], source: Any) -> Any:
    """Calibration prompts as the cached graph's inputs: each prompt batch (``{'input_ids': ids[,
    'attention_mask': mask]}`` or an ids tensor) as its prefill (a past of 0 positions), then
    :data:`DECODE_STEPS` greedy decode steps of one token with the cache the eager model returned —
    what generation feeds the graph. A batch that already holds the graph's inputs (``past_key_0``,
    ...) is used as it is. A list is expanded now (prompts held back stay held back, whole); other
    iterables are expanded as they are read."""
    what = f"each calibration prompt runs as a prefill, then {DECODE_STEPS} greedy decode steps"
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes, torch.Tensor)):
        count = held_back_count(source)
        expand = [list(_steps(wrapped, example, prompt, index)) for index, prompt in enumerate(source)]
        flat = [[item for items in part for item in items] for part in (expand[: len(expand) - count], expand[len(expand) - count :])]
        return Expanded(flat[0], flat[1] if count else [], what)
    if isinstance(source, (str, bytes, torch.Tensor)) or not isinstance(source, Iterable):
        return source  # CalibrationData says what is wrong with it
    return _Streamed(wrapped, example, source)


class _Streamed:
    """A non-list iterable of prompts expanded as it is read (re-iterable when the source is)."""

    def __init__(self, wrapped: nn.Module, example: Mapping[str, torch.Tensor], source: Iterable[Any]):
        self.wrapped, self.example, self.source = wrapped, example, source

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for index, prompt in enumerate(guarded(self.source, "calibration_data")):
            yield from _steps(self.wrapped, self.example, prompt, index)


def _steps(
    wrapped: nn.Module, example: Mapping[str, torch.Tensor], prompt: Any, index: int
) -> Iterator[dict[str, torch.Tensor]]:
    if isinstance(prompt, Mapping) and "past_key_0" in prompt:
        yield dict(prompt)
        return
    rollout = _Rollout(wrapped, example, prompt, index)
    for step in range(DECODE_STEPS + 1):
        yield rollout.inputs
        if step < DECODE_STEPS:
            rollout.advance(rollout.run())


class _Rollout:
    """A prompt's prefill, then one token at a time with the cache the wrapped model returned."""

    def __init__(self, wrapped: nn.Module, example: Mapping[str, torch.Tensor], prompt: Any, index: int):
        if isinstance(prompt, torch.Tensor):
            prompt = {"input_ids": prompt}
        extra = sorted(set(prompt) - {"input_ids", "attention_mask"}) if isinstance(prompt, Mapping) else None
        ids = prompt.get("input_ids") if isinstance(prompt, Mapping) else None
        if (
            extra
            or not isinstance(ids, torch.Tensor)
            or ids.dim() != 2
            or ids.is_floating_point()
            or not ids.numel()
        ):
            raise InputError(
                f"calibration batch {index}: a causal LM compiled with its cache is calibrated on prompts",
                where=f"calibration batch {index}",
                hint="give {'input_ids': ids [batch, sequence] (integers), 'attention_mask': mask} or an ids tensor; "
                "each prompt runs as a prefill, then greedy decode steps",
            )
        assert isinstance(prompt, Mapping)
        _check_vocabulary(wrapped, ids, f"calibration batch {index}")
        self.wrapped, self.example, self.batch, self.dtype = wrapped, example, ids.shape[0], ids.dtype
        self.inputs: dict[str, torch.Tensor] = {"input_ids": ids}
        self.mask = None
        if "attention_mask" in example:
            mask = prompt.get("attention_mask")
            if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
                mask = torch.ones_like(ids)
            self.mask = mask.to(example["attention_mask"].dtype)
            self.inputs["attention_mask"] = self.mask
        if "position_ids" in example:
            self.inputs["position_ids"] = positions(self.mask, ids.shape[1])  # type: ignore[arg-type]
        self.names = [n for n in example if n.startswith("past_")]
        for name in self.names:
            shape = example[name].shape
            self.inputs[name] = example[name].new_zeros(self.batch, shape[1], 0, shape[3])

    def run(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return dict(self.wrapped(**self.inputs))

    def advance(self, out: Mapping[str, torch.Tensor], token: torch.Tensor | None = None) -> None:
        """The next step's inputs: ``token`` [batch, 1] (the greedy one when None) after ``out``."""
        if token is None:
            token = out["logits"][:, -1].argmax(-1, keepdim=True)
        following: dict[str, torch.Tensor] = {"input_ids": token.to(self.dtype)}
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch, 1)], 1)
            following["attention_mask"] = self.mask
        if "position_ids" in self.example:
            following["position_ids"] = positions(self.mask, 1)  # type: ignore[arg-type]
        for name in self.names:
            following[name] = out[name.replace("past_", "present_")].detach()
        self.inputs = following


def _check_vocabulary(wrapped: nn.Module, ids: torch.Tensor, where: str) -> None:
    """Prompt ids within the model's input embedding (the eager model fails on others with a bare
    ``IndexError: index out of range in self``)."""
    model = getattr(wrapped, "model", wrapped)
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None or not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= rows:
        raise InputError(
            f"{where}: input_ids has values in [{low}, {high}], outside the model's vocabulary [0, {rows})",
            where=where,
            hint=f"ids must be in [0, {rows - 1}]: tokenize with this model's tokenizer",
        )


def prompt_step(wrapped: nn.Module, example: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The graph's inputs for the example's prompt with an empty cache (a past of 0 positions) — the
    first step of every generation, which the traced example (a past of ``EXAMPLE_PAST``) and its
    widened check never run; None when ``wrapped`` is not a cached causal LM."""
    if not isinstance(wrapped, CausalLMWithCache) or "past_key_0" not in example:
        return None
    prompt = {"input_ids": example["input_ids"]}
    if "attention_mask" in example:
        prompt["attention_mask"] = example["attention_mask"][:, EXAMPLE_PAST:]
    return dict(_Rollout(wrapped, example, prompt, 0).inputs)


def kv_deviation(
    wrapped: nn.Module, example: Mapping[str, torch.Tensor], prompts: Sequence[Any]
) -> dict[str, Any]:
    """How far the int8 cache of ``wrapped`` moves its logits from the float cache's: each prompt
    runs as a prefill, then :data:`DECODE_STEPS` greedy steps (the float cache's tokens, fed to
    both); the least cosine and the largest absolute difference over every step's logits."""
    assert isinstance(wrapped, CausalLMWithCache)
    float_example = {
        name: tensor.float() if name.startswith("past_") else tensor
        for name, tensor in example.items()
        if "_scale_" not in name
    }
    twin = _wrapper(wrapped.model, [*float_example], wrapped.layers)
    worst_cosine, worst_abs, steps = 1.0, 0.0, 0
    for index, prompt in enumerate(prompts):
        exact, rounded = (
            _Rollout(twin, float_example, prompt, index),
            _Rollout(wrapped, example, prompt, index),
        )
        for step in range(DECODE_STEPS + 1):
            want, got = exact.run(), rounded.run()
            cosine = cosine_similarity(got["logits"], want["logits"])
            worst_cosine = min(worst_cosine, cosine if math.isfinite(cosine) else -1.0)
            worst_abs = max(worst_abs, float((got["logits"] - want["logits"]).abs().max()))
            steps += 1
            if step < DECODE_STEPS:
                token = want["logits"][:, -1].argmax(-1, keepdim=True)
                exact.advance(want, token)
                rounded.advance(got, token)
    return {"min_cosine": worst_cosine, "max_abs_error": worst_abs, "prompts": len(prompts), "steps": steps}


def _real_past(
    model: nn.Module, ids: torch.Tensor, shapes: list[tuple[tuple[int, int], tuple[int, int]]]
) -> dict[str, torch.Tensor]:
    """The cache the model itself makes for ``EXAMPLE_PAST`` tokens (the example's first ones,
    repeated if it is shorter): the example's past, so that checks on the example inputs see values a
    generation does (random values there failed static int8's promise on ranges calibrated on real
    caches, cosine 0.89, while real prompts read 0.9998)."""
    prefix = ids[:, :1].repeat(1, EXAMPLE_PAST) if ids.shape[1] < EXAMPLE_PAST else ids[:, :EXAMPLE_PAST]
    with torch.no_grad():
        out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True)
    layers = returned_cache(out).layers
    generator = torch.Generator().manual_seed(0)
    past: dict[str, torch.Tensor] = {}
    for i, ((key, value), layer) in enumerate(zip(shapes, layers)):
        for kind, (heads, dim), tensor in (("key", key, layer.keys), ("value", value, layer.values)):
            shape = (ids.shape[0], heads, EXAMPLE_PAST, dim)
            real = isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == shape
            # a cache of another layout (it keeps other positions): random values, as before
            past[f"{kind}_{i}"] = tensor.detach().float().clone() if real else torch.randn(shape, generator=generator)
    return past


def positions(mask: torch.Tensor, sequence: int) -> torch.Tensor:
    """The positions of the last ``sequence`` tokens under ``mask`` [batch, total]: each row counts
    from its first unmasked token (padding gets 1), as transformers' generate computes them."""
    counted = mask.long().cumsum(-1) - 1
    return counted.masked_fill(mask == 0, 1)[:, mask.shape[1] - sequence :]


def cache_layers(example: Mapping[str, torch.Tensor]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(heads, head dim) of every layer's keys and values, read from the cached graph's inputs."""
    count = sum(1 for name in example if name.startswith("past_key_") and "_scale_" not in name)
    return [
        tuple(
            (example[f"past_{kind}_{i}"].shape[1], example[f"past_{kind}_{i}"].shape[3])
            for kind in ("key", "value")
        )  # type: ignore[misc]
        for i in range(count)
    ]


def past_names(layers: int, kv: str = "float") -> list[str]:
    """The cache inputs in the wrapper's order: per layer its keys then values (each followed by its
    scales when the int8 cache sets them per step)."""
    scales = ("", "_scale") if kv_cache.per_step(kv) else ("",)
    return [f"past_{kind}{scale}_{i}" for i in range(layers) for kind in ("key", "value") for scale in scales]


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

    def __init__(
        self,
        model: nn.Module,
        layers: int,
        kv: str = "float",
        fixed: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        super().__init__()
        self.model, self.layers, self.kv = model, layers, kv
        for i, pair in enumerate(fixed or []):  # int8-calibrated: the per-head scales, constants of the graph
            self.register_buffer(f"key_scale_{i}", pair[0])
            self.register_buffer(f"value_scale_{i}", pair[1])

    def run(self, inputs: dict[str, torch.Tensor], past: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        import transformers

        # Full-length layers even where the config has a sliding window: a cropped cache would count
        # its positions from its kept length, misplacing a padded batch's mask; the model's
        # sliding-window mask applies the window to the full cache instead (same tokens attended).
        if self.kv == "float":
            cache = transformers.DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
            )
        elif kv_cache.per_step(self.kv):
            cache = kv_cache.cache([past[4 * i : 4 * i + 4] for i in range(self.layers)], None)
        else:
            fixed = [
                (getattr(self, f"key_scale_{i}"), getattr(self, f"value_scale_{i}"))
                for i in range(self.layers)
            ]
            cache = kv_cache.cache(
                [(past[2 * i], None, past[2 * i + 1], None) for i in range(self.layers)], fixed
            )
        keyword = cache_keyword(self.model)
        out = self.model(**inputs, use_cache=True, **{keyword: cache})
        result = {"logits": out.logits}
        for i, layer in enumerate(returned_cache(out).layers):
            if self.kv == "float":
                result[f"present_key_{i}"], result[f"present_value_{i}"] = layer.keys, layer.values
                continue
            result[f"present_key_{i}"] = layer.codes[0]
            if kv_cache.per_step(self.kv):
                result[f"present_key_scale_{i}"] = layer.scales[0]
            result[f"present_value_{i}"] = layer.codes[1]
            if kv_cache.per_step(self.kv):
                result[f"present_value_scale_{i}"] = layer.scales[1]
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


def _wrapper(
    model: nn.Module,
    names: list[str],
    layers: int,
    kv: str = "float",
    fixed: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    cached = past_names(layers, kv)

    def run(self: CausalLMWithCache, bound: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run({n: bound[n] for n in names if n not in cached}, [bound[n] for n in cached])

    cls = with_signature(CausalLMWithCache, f"{type(model).__name__}WithCache", names, run)
    return cls(model, layers, kv, fixed).eval()
