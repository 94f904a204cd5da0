"""``torchkiln.compile``: trace → passes → backend, verified against the eager model."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import statistics
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from torchkiln.backends import Artifact, BackendOptions, get_backend
from torchkiln.backends import backend_options as backend_options_for
from torchkiln.compiler import arguments, causal_lm, seq2seq, state_space
from torchkiln.compiler import graph as G
from torchkiln.compiler import kv_cache as kv_cache_module
from torchkiln.compiler.calibration import (
    CalibrationData,
    Expanded,
    held_back_count,
    hold_back,
    no_progress,
    take,
    tqdm_progress,
)
from torchkiln.compiler.files import remove_private
from torchkiln.compiler.machine import int8_saturates
from torchkiln.compiler.manager import PassManager, default_instruments
from torchkiln.compiler.passes import Pass, PassItem, parse_pipeline
from torchkiln.compiler.program import Check, Program, deterministic, fresh
from torchkiln.compiler.report import ArtifactRecord, Report
from torchkiln.compiler.trace import DynamicAxes, eval_copy, private_copy, trace
from torchkiln.compiler.verify import FP32, ErrorStats, Tolerance, compare
from torchkiln.driver import auto
from torchkiln.driver import cache as cache_module
from torchkiln.driver.cache import Cache
from torchkiln.driver.compiled import CompiledEncoderDecoder, CompiledModel, versions
from torchkiln.errors import ArtifactError, BackendError, ConfigError, KilnError, VerificationError

DEFAULT_PASSES = ("cleanup", "fold_batchnorm")


def compile(  # noqa: A001 - the public name users expect
    model: nn.Module,
    example_inputs: Any,
    passes: str | Iterable[PassItem] = DEFAULT_PASSES,
    backend: str = "onnxruntime",
    backend_options: Mapping[str, Any] | BackendOptions | None = None,
    dynamic_axes: DynamicAxes = None,
    calibration_data: Iterable[Any] | None = None,
    train_data: Iterable[Any] | None = None,
    val_data: Iterable[Any] | None = None,
    verify: bool = True,
    tolerance: Tolerance | None = None,
    frontend: str = "auto",
    leaf_modules: Sequence[str] = (),
    latency_runs: int = 10,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    cache: str | os.PathLike[str] | None = None,
    kv_cache: str = "float",
) -> CompiledModel:
    """Compile ``model`` for ``example_inputs`` (a tensor, a tuple, or a dict of keyword tensors).

    ``passes`` is a pipeline string (``"cleanup,fold_batchnorm"``) or a list of specs, Pass
    objects and ``(name, {option: value})`` pairs. ``model`` and the input tensors are never
    changed: eager runs use a private copy and every run gets cloned inputs. ``dynamic_axes`` is
    ``"batch"`` or ``{input: {axis: name}}``. ``calibration_data`` is an iterable of input batches
    (tensors, tuples or dicts) for passes that calibrate (``quantize``; of a list of n >= 2 batches
    the last ``max(1, min(4, n // 8))`` are held back from calibration and lossy promises are
    checked on them too);
    ``train_data`` / ``val_data`` (batches of inputs or ``(inputs, labels)``) for ``distill``, which
    trains the rewritten graph toward ``model``.
    With ``verify`` every pass is checked against the eager model and the artifact must match it
    within ``tolerance`` — by default fp32 (:data:`FP32`), or what the pipeline's lossy passes
    promise (int8: cosine similarity) — else :class:`VerificationError`. ``latency_runs`` > 0 adds
    eager vs artifact latency (median) to the report. ``progress`` receives a line per stage; with
    it, long loops inside passes (calibration) show a progress bar on stderr.

    ``backend="auto"`` builds every runtime the program and machine allow, verifies each, times them
    side by side and keeps the fastest within the tolerance (:mod:`torchkiln.driver.auto`; its
    ``backend_options`` are ``candidates`` and ``runs``); the report lists every candidate.

    ``cache`` is a directory in which the two stages — optimize (trace + passes) and lower (the
    backend) — keep their outputs under a content hash of their inputs (:mod:`torchkiln.driver.cache`);
    the report's ``cache`` says which stages were hits. Data iterables are read into lists first.

    ``kv_cache`` is the form of a causal LM's KV cache (:mod:`torchkiln.compiler.kv_cache`):
    ``"float"``, ``"int8"`` (per-head scales set per step) or ``"int8-calibrated"`` (per-head scales
    set on ``calibration_data``'s prompts). The int8 cache's distance from the float cache (logits
    over prompts run as prefill and decode steps) is checked and reported (``report.kv_cache``).
    """
    _check_arguments(backend=backend, frontend=frontend, name=name, leaf_modules=leaf_modules, verify=verify,
                     latency_runs=latency_runs, kv_cache=kv_cache, cache=cache, tolerance=tolerance)  # fmt: skip
    say = progress or (lambda _: None)
    pipeline = parse_pipeline(passes)
    # Eager runs (checks, latency, the distillation teacher) use this copy, never the user's module;
    # trace makes its own full copy to rewrite.
    model = private_copy(model, share_parameters=True)
    switched = eval_copy(model)
    if switched:
        warnings.warn(f"{switched}; call model.eval() before compiling to silence this", RuntimeWarning, stacklevel=2)
    kv_cache_module.check_mode(kv_cache)
    if kv_cache != "float" and (
        not causal_lm.wants_cache(model, example_inputs) or state_space.wants_state(model, example_inputs)
    ):  # an encoder-decoder's cache, a state-space model's states: not this option's
        raise ConfigError(
            f"kv_cache={kv_cache} applies to a causal LM compiled with its KV cache; {type(model).__name__} "
            "with these example inputs has none",
            where="kv_cache",
            hint="leave kv_cache at float, or give a Hugging Face causal LM's {'input_ids': ...} without use_cache=False",
        )
    if seq2seq.wants_cache(model, example_inputs):  # an encoder and a decoder with its cache
        if any(d is not None for d in (calibration_data, train_data, val_data)):
            raise ConfigError(
                "calibration / training data for an encoder-decoder compiled with its cache is not supported yet",
                hint="use passes that need no data (cleanup, quantize mode=dynamic / weight_only / fp16)",
            )
        pair_settings = seq2seq.settings(model, speech=seq2seq.SPEECH in example_inputs)
        (encoder, encoder_inputs, encoder_axes), (decoder, decoder_inputs, decoder_axes) = seq2seq.split(
            model, example_inputs
        )
        common: dict[str, Any] = dict(
            passes=passes, backend=backend, backend_options=backend_options, verify=verify, tolerance=tolerance,
            frontend=frontend, leaf_modules=leaf_modules, latency_runs=latency_runs, cache=cache,
        )  # fmt: skip
        parts = []
        for part, module, inputs, axes in (
            ("encoder", encoder, encoder_inputs, encoder_axes), ("decoder", decoder, decoder_inputs, decoder_axes)
        ):  # fmt: skip
            say(f"{part}:")
            label = f"{name} {part}" if name else None
            parts.append(compile(module, inputs, dynamic_axes=axes, name=label, progress=progress, **common))
        return CompiledEncoderDecoder(parts[0], parts[1], pair_settings)
    generation: dict[str, int | None] | None = None
    kv_record: dict[str, Any] | None = None
    if state_space.wants_state(model, example_inputs):  # Mamba: one token over the recurrent states
        generation = causal_lm.generation_settings(model)
        model, example_inputs, dynamic_axes = state_space.with_state(model, example_inputs)
    elif causal_lm.wants_cache(model, example_inputs):  # the KV cache as tensors in and out
        generation = causal_lm.generation_settings(model)
        prompts = example_inputs
        if kv_cache == "int8-calibrated":
            if calibration_data is None:
                raise ConfigError(
                    "kv_cache=int8-calibrated sets its scales on calibration prompts; none were given",
                    where="calibration_data",
                    hint="pass calibration_data (prompts: {'input_ids': ids} or ids tensors), or use kv_cache=int8",
                )
            calibration_data = take(calibration_data, None, "calibration_data")  # read twice: scales, then passes
        model, example_inputs, dynamic_axes = causal_lm.with_cache(model, example_inputs, kv_cache, calibration_data)
        if kv_cache != "float":
            kv_record = _kv_check(model, example_inputs, prompts, calibration_data, kv_cache, verify)
    auto_options = auto.AutoOptions.parse(backend_options) if backend == "auto" else None
    options = backend_options_for(backend, backend_options) if auto_options is None else None
    store = Cache(cache) if cache is not None else None
    if store is not None:  # hashing reads the data; a one-shot iterator must survive it
        calibration_data, train_data, val_data = (
            None if d is None else take(d, None, label)
            for d, label in ((calibration_data, "calibration_data"), (train_data, "train_data"), (val_data, "val_data"))
        )
    if generation is not None and "past_key_0" in example_inputs:  # prompts → the cached graph's inputs
        calibration_data, train_data, val_data = (
            None if d is None else causal_lm.calibration_steps(model, example_inputs, d)
            for d in (calibration_data, train_data, val_data)
        )
    stage = Stage(
        model, example_inputs, pipeline, dynamic_axes, calibration_data, train_data, val_data,
        verify, tolerance, frontend, tuple(leaf_modules), name,
    )  # fmt: skip
    program, report = _optimize_cached(stage, store, say, progress)
    build = Build(program, report, store, stage.key, tolerance or pipeline_tolerance(pipeline), pipeline, say)
    if auto_options is not None:
        artifact, options, record = auto.choose(build, auto_options, strict=verify)
    else:
        assert options is not None
        artifact, record = build(backend, options, strict=verify)
    report.artifact = record
    report.kv_cache = kv_record
    report.eval_copy = switched
    if latency_runs > 0:
        _measure_latency(model, program, artifact, record, latency_runs)
    names = [p.spec for p in pipeline]
    return CompiledModel(
        artifact, program.inputs, program.outputs, program.out_spec, report, options, names, program.constants,
        generation,
    )  # fmt: skip


def _kv_check(
    wrapped: nn.Module, example: dict[str, torch.Tensor], prompt: Any, calibration: Any, mode: str, strict: bool
) -> dict[str, Any]:
    """The int8 cache against the float cache (:func:`causal_lm.kv_deviation`) on the calibration
    prompts held back (else the first 4 of a list) and the example's prompt; what it costs in
    bytes per cached position. Below :data:`kv_cache.PROMISE` it fails unless ``strict`` is off."""
    prompts: list[Any] = [{k: v for k, v in prompt.items() if k in ("input_ids", "attention_mask")}]
    which = "the example's prompt"
    if isinstance(calibration, list) and calibration:
        count = held_back_count(calibration)
        chosen = calibration[len(calibration) - count :] if count else calibration[:4]
        prompts += chosen
        which += f" and {len(chosen)} calibration prompt{'s' * (len(chosen) > 1)}{' held back' if count else ''}"
    measured = causal_lm.kv_deviation(wrapped, example, prompts)
    layers = causal_lm.cache_layers(example)
    record = {
        "mode": mode,
        "scales": "per head, set per step" if kv_cache_module.per_step(mode) else "per head, set at calibration",
        "bytes_per_position": kv_cache_module.bytes_per_position(layers, mode),
        "float_bytes_per_position": kv_cache_module.bytes_per_position(layers, "float"),
        "promise": kv_cache_module.PROMISE,
        "checked_on": f"{which}: prefill + {causal_lm.DECODE_STEPS} greedy decode steps each "
        f"({measured['steps']} steps' logits)",
        **{k: measured[k] for k in ("min_cosine", "max_abs_error")},
    }
    if strict and not measured["min_cosine"] >= kv_cache_module.PROMISE:
        raise VerificationError(
            f"kv_cache={mode} moves the logits from the float cache's: cosine {measured['min_cosine']:.5f} < "
            f"{kv_cache_module.PROMISE} on {record['checked_on']}",
            where="kv_cache",
            hint="use kv_cache=int8 (scales per step) or float, or verify=False to accept it",
        )
    return record


@dataclasses.dataclass
class Build:
    """The lower stage for one backend: lower (or load from the cache) and verify against eager."""

    program: Program
    report: Report
    store: Cache | None
    key: str | None
    tolerance: Tolerance | None  # None: a lossy pass promised nothing; the lowering is checked instead
    pipeline: list[Pass]
    say: Callable[[str], None]

    def __call__(self, backend: str, options: BackendOptions, strict: bool) -> tuple[Artifact, ArtifactRecord]:
        self.say(f"lowering to {backend}")
        start = time.perf_counter()
        artifact = _lower_cached(self.program, self.report, backend, options, self.store, self.key)
        record = ArtifactRecord(backend, seconds=time.perf_counter() - start, file_bytes=artifact.file_bytes())
        self.say("verifying against the eager model")
        if self.tolerance is None:
            _verify_lowering(self.program, artifact, record, lowering_tolerance(self.pipeline), strict=strict)
        else:
            _verify(self.program, artifact, record, self.tolerance, strict=strict)
        record.notes = artifact.notes()
        return artifact, record


@dataclasses.dataclass
class Stage:
    """What the optimize stage depends on."""

    model: nn.Module
    example_inputs: Any
    pipeline: list[Pass]
    dynamic_axes: DynamicAxes
    calibration_data: Any
    train_data: Any
    val_data: Any
    verify: bool
    tolerance: Tolerance | None
    frontend: str
    leaf_modules: tuple[str, ...]
    name: str | None
    key: str | None = None  # set once hashed

    def hash(self) -> str:
        hasher = cache_module.model_fingerprint(self.model)
        hasher.add_tensors("example_inputs", [self.example_inputs])
        for label in ("calibration_data", "train_data", "val_data"):
            hasher.add_tensors(label, getattr(self, label) or [])
        hasher.add("settings", {
            "passes": [p.spec for p in self.pipeline], "dynamic_axes": self.dynamic_axes, "verify": self.verify,
            "tolerance": dataclasses.asdict(self.tolerance) if self.tolerance else None,
            "frontend": self.frontend, "leaf_modules": self.leaf_modules, "name": self.name,
            "code": cache_module.code_version(), "torch": torch.__version__,
            # quantize's reduce_range=auto picks 7-bit weights on such a CPU: a different program
            "int8_saturates": int8_saturates(),
        })  # fmt: skip
        return hasher.hexdigest()


def _check_arguments(**given: Any) -> None:
    """compile()'s plain arguments, by type, before any work."""
    for setting in ("backend", "frontend", "kv_cache"):
        arguments.text(setting, given[setting])
    arguments.text("name", given["name"], optional=True)
    arguments.strings("leaf_modules", given["leaf_modules"])
    arguments.flag("verify", given["verify"])
    arguments.integer("latency_runs", given["latency_runs"], low=0, high=10_000)
    arguments.path("cache", given["cache"], optional=True)
    Tolerance.given(given["tolerance"])


def _optimize_cached(
    stage: Stage, store: Cache | None, say: Callable[[str], None], progress: Callable[[str], None] | None
) -> tuple[Program, Report]:
    """Trace and run the passes, or load their result from the cache."""
    stale = ""
    if store is not None:
        stage.key = stage.hash()
        entry = store.get("optimize", stage.key)
        loaded = cache_module.load_program(entry) if entry is not None else None
        if loaded is not None and _eager_unchanged(stage.model, loaded[0]):
            say("optimize: cache hit")
            program, extra = loaded
            report = Report.from_dict(extra["report"])
            report.cache = {"optimize": f"hit {stage.key[:12]}"}
            return program, report
        if loaded is not None:
            stale = " (the cached entry was stale: the model's outputs changed)"
    program, report = _optimize(stage, say, progress)
    try:
        cache_module.round_trip(program)  # lower the same graph a later cache hit would load
    except cache_module.NotCacheable as exc:
        report.cache = {"optimize": f"not cacheable: {exc}"}
        stage.key = None
        return program, report
    if store is not None and stage.key is not None:
        extra = {"report": report.to_dict()}
        state = _store(store, "optimize", stage.key, lambda d: cache_module.save_program(program, d, extra))
        report.cache = {"optimize": state + stale}
    return program, report


def _eager_unchanged(model: nn.Module, program: Program) -> bool:
    """Does the model still give the cached eager outputs? The key hashes weights and class
    sources; this catches what it cannot see (helpers in other files, globals)."""
    try:
        with deterministic():
            for check in program.checks:
                kwargs = program.eager_kwargs(fresh(check.inputs))
                outputs = [t for t in pytree.tree_leaves(model(**kwargs)) if isinstance(t, torch.Tensor)]
                if [o.shape for o in outputs] != [o.shape for o in check.outputs]:
                    return False
                if not compare(outputs, check.outputs, FP32).within():
                    return False
    except Exception:  # noqa: BLE001 - a model that no longer runs on the cached inputs changed too
        return False
    return True


def _attach_calibration(stage: Stage, program: Program) -> None:
    """Calibration batches for the passes, and held-back ones (with eager outputs) to check on."""
    if isinstance(stage.calibration_data, Sequence):  # in memory anyway: every batch checked up front
        for _ in CalibrationData(stage.calibration_data, program.inputs, program.constants):
            pass
    calibrate_on, held_back = hold_back(stage.calibration_data)
    program.calibration = CalibrationData(calibrate_on, program.inputs, program.constants)
    program.held_back = _eager_checks(stage.model, program, held_back)
    if isinstance(stage.calibration_data, Expanded):
        program.notes.append(stage.calibration_data.what)
    program.notes.append(
        f"{len(held_back)} calibration batch(es) held back: lossy promises are checked on them too"
        if held_back
        else "no calibration batch held back (give a list of >= 2 batches): lossy promises are checked "
        "on the example inputs only"
    )


DRAWN = 2  # held-back inputs drawn like the example's when a lossy pipeline has no calibration data


def drawn_like(program: Program, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` inputs at the example's shapes and dtypes with fresh values: floats from a normal
    with each example tensor's mean and standard deviation, integer inputs that index an
    embedding uniformly from its range; other integer and bool inputs (masks, positions) kept."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        batch = {}
        for spec, value in zip(program.inputs, program.example_inputs):
            drawn = value.clone()
            if value.is_floating_point() and value.numel() > 1:
                mean, std = value.double().mean(), value.double().std()
                if bool(torch.isfinite(std)) and float(std) > 0:
                    noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
                    drawn = (noise * std + mean).to(value.dtype)
            elif spec.value_range is not None and not value.is_floating_point() and value.dtype != torch.bool:
                low, high = spec.value_range
                drawn = torch.randint(low, high, value.shape, generator=generator, dtype=value.dtype)
            batch[spec.name] = drawn
        batches.append(batch)
    return batches


def _eager_checks(model: nn.Module, program: Program, batches: list[Any]) -> list[Check]:
    """Checks (inputs and the eager outputs on them) for held-back batches (calibration or drawn)."""
    if not batches:
        return []
    checks = []
    with deterministic():
        for batch in CalibrationData(batches, program.inputs, program.constants):
            outputs = pytree.tree_leaves(model(**program.eager_kwargs(fresh(batch))))
            checks.append(Check(batch, tuple(t for t in outputs if isinstance(t, torch.Tensor))))
    return checks


def _optimize(
    stage: Stage, say: Callable[[str], None], progress: Callable[[str], None] | None
) -> tuple[Program, Report]:
    say("tracing")
    start = time.perf_counter()
    program = trace(
        stage.model, stage.example_inputs, frontend=stage.frontend, dynamic_axes=stage.dynamic_axes,
        leaf_modules=stage.leaf_modules, name=stage.name,
    )  # fmt: skip
    prompt = causal_lm.prompt_step(stage.model, stage.example_inputs)
    if prompt is not None:  # every pass and backend is also checked on a generation's first step
        program.checks.extend(_eager_checks(stage.model, program, [prompt]))
    if stage.calibration_data is not None:
        _attach_calibration(stage, program)
    elif any(not p.lossless for p in stage.pipeline):
        program.held_back = _eager_checks(stage.model, program, drawn_like(program, DRAWN))
        program.notes.append(
            f"no calibration data: {DRAWN} input(s) drawn like the example's (floats from its mean and spread, "
            "ids from the embedding's range) are held back, and lossy promises are checked on them too"
        )
    teacher = functools.partial(stage.model, **program.constants) if program.constants else stage.model
    program.training, program.validation, program.teacher = stage.train_data, stage.val_data, teacher
    program.progress = tqdm_progress if progress else no_progress
    report = Report(
        program.name, program.flavour, trace_seconds=time.perf_counter() - start, notes=list(program.notes)
    )
    instruments = default_instruments(stage.tolerance or FP32, stage.verify, progress, len(stage.pipeline))
    report.passes = PassManager(stage.pipeline, instruments).run(program)
    report.params, report.param_bytes = G.parameter_stats(program.graph_module)
    program.calibration = program.training = program.validation = program.teacher = None
    return program, report


def _lower_cached(
    program: Program,
    report: Report,
    backend: str,
    options: BackendOptions,
    store: Cache | None,
    key: str | None,
) -> Artifact:
    """``backend.lower(program)``, or the artifact the cache holds for the same program and options.
    ``key`` is the optimize key, None when the program could not be cached (nothing is then)."""
    if store is None or key is None:
        return get_backend(backend).lower(program, options)
    lower_key = cache_module.Hasher().add("program", cache_module.program_digest(program)).add(
        "backend", backend).add("options", options.to_dict()).add("versions", versions()).hexdigest()  # fmt: skip
    entry = store.get("lower", lower_key)
    if entry is not None:
        artifact = _load_artifact(entry, backend, options)
        if artifact is not None:
            report.cache["lower"] = f"hit {lower_key[:12]}"
            return artifact
    artifact = get_backend(backend).lower(program, options)
    report.cache["lower"] = _store(store, "lower", lower_key, artifact.save)
    return artifact


def _store(store: Cache, stage: str, key: str, write: Callable[[Path], Any]) -> str:
    """Write a cache entry; a cache that cannot be written costs the next build time, not this one."""
    try:
        with store.store(stage, key) as staging:
            write(staging)
    except (OSError, ArtifactError, cache_module.NotCacheable) as exc:  # a full disk, a read-only cache
        why = getattr(exc, "message", None) or str(exc)
        warnings.warn(f"the {stage} stage was not stored in the build cache {store.directory}: {why}; "
                      "building without it", RuntimeWarning, stacklevel=2)  # fmt: skip
        return f"miss {key[:12]} (not stored: {why})"
    return f"miss {key[:12]}"


def _load_artifact(entry: Path, backend: str, options: BackendOptions) -> Artifact | None:
    """A private copy of a cached artifact (the cache may be cleared while it is in use), or None
    when the entry cannot be loaded."""
    copy = Path(tempfile.mkdtemp(prefix="torchkiln-cached-"))
    try:
        shutil.copytree(entry, copy, dirs_exist_ok=True)
        artifact = get_backend(backend).load(copy, options)
    except (OSError, KilnError):
        remove_private(copy)
        return None
    weakref.finalize(artifact, remove_private, copy)
    return artifact


def _verify(
    program: Program, artifact: Artifact, record: ArtifactRecord, tolerance: Tolerance, strict: bool
) -> None:
    worst = measure_error(program, _explained(program, artifact), tolerance)
    record.max_abs_error, record.max_rel_error, record.tolerance = (
        worst.max_abs,
        worst.max_rel,
        str(tolerance),
    )
    record.cosine = worst.cosine
    _raise_unless_within(worst, tolerance, record, strict, "")
    if program.held_back:
        held = measure_error(program, artifact.run, tolerance, program.held_back)
        record.held_back_batches = len(program.held_back)
        record.held_back_cosine, record.held_back_max_abs_error = held.cosine, held.max_abs
        _raise_unless_within(held, tolerance, record, strict, " on a held-back input")


def _explained(program: Program, artifact: Artifact) -> Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]:
    """``artifact.run``, whose failure with dynamic axes says at which shapes and axes (the exporter
    can write a traced size into the graph, e.g. a recurrent layer's Reshape)."""

    def run(inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        try:
            return artifact.run(inputs)
        except BackendError as exc:
            axes = program.dynamic_axes
            if not axes:
                raise
            shapes = ", ".join(f"{s.name}: {list(t.shape)}" for s, t in zip(program.inputs, inputs))
            raise BackendError(
                f"the {artifact.backend} artifact fails at input shapes {shapes} (dynamic axes {axes}): "
                f"{exc.message.splitlines()[0]}",
                hint="the exporter fixed a dynamic axis to its traced size: drop that axis from dynamic_axes, "
                "or use backend='torch'",
            ) from exc

    return run


def _raise_unless_within(
    worst: ErrorStats, tolerance: Tolerance, record: ArtifactRecord, strict: bool, on: str
) -> None:
    if strict and not worst.within():
        measured = (
            f"cosine similarity {worst.cosine:.5f}"
            if tolerance.min_cosine is not None
            else f"max abs error {worst.max_abs:.3e}, above the {worst.allowed:.3e} allowed"
        )
        raise VerificationError(
            f"the {record.backend} artifact differs from the eager model{on}: output {worst.worst_output} has "
            f"{measured} by the tolerance ({tolerance})",
            hint="pass a looser `tolerance`, or verify=False to accept it; compare the backends to find the op",
        )


def _verify_lowering(
    program: Program, artifact: Artifact, record: ArtifactRecord, tolerance: Tolerance, strict: bool
) -> None:
    """Error against eager is reported; the artifact must match the rewritten graph within
    ``tolerance`` (fp32, or what the pipeline's other lossy passes promise, e.g. int8 rounding)."""
    worst = measure_error(program, artifact.run, FP32)
    record.max_abs_error, record.max_rel_error, record.cosine = worst.max_abs, worst.max_rel, worst.cosine
    record.tolerance = (
        f"{tolerance} against the rewritten graph (a lossy pass promised no bound against eager)"
    )
    if program.held_back:
        held = measure_error(program, artifact.run, FP32, program.held_back)
        record.held_back_batches = len(program.held_back)
        record.held_back_cosine, record.held_back_max_abs_error = held.cosine, held.max_abs
    for check in program.checks + program.held_back:
        stats = compare(artifact.run(fresh(check.inputs)), program.run(check.inputs), tolerance)
        if strict and not stats.within():
            raise VerificationError(
                f"the {record.backend} artifact differs from the rewritten graph: output {stats.worst_output} "
                f"has max abs error {stats.max_abs:.3e}, cosine {stats.cosine:.5f} ({tolerance})",
                hint="this is a lowering bug; try another backend and report the model",
            )


def pipeline_tolerance(pipeline: Sequence[Pass]) -> Tolerance | None:
    """FP32 for lossless pipelines; else the loosest promise of the lossy passes (a cosine floor
    wins over absolute tolerances, which cannot describe int8 error). None when a lossy pass
    promises nothing (pruning before distillation): the artifact is then held to the rewritten graph."""
    lossy = [p.tolerance() for p in pipeline if not p.lossless]
    if any(t is None for t in lossy):
        return None
    return _loosest([t for t in lossy if t is not None])


def lowering_tolerance(pipeline: Sequence[Pass]) -> Tolerance:
    """How far the artifact may be from the rewritten graph: what the promising lossy passes allow
    (int8 kernels round differently from the IR's reference arithmetic), else fp32."""
    return _loosest([t for t in (p.tolerance() for p in pipeline if not p.lossless) if t is not None])


def _loosest(promises: Sequence[Tolerance]) -> Tolerance:
    if not promises:
        return FP32
    floors = [t.min_cosine for t in promises if t.min_cosine is not None]
    if floors:
        return Tolerance(min_cosine=min(floors))
    return Tolerance(atol=max(t.atol for t in promises), rtol=max(t.rtol for t in promises))


def _measure_latency(
    model: nn.Module, program: Program, artifact: Artifact, record: ArtifactRecord, runs: int
) -> None:
    """A quick sample, not a benchmark: ``runs`` calls of each, eager and artifact in alternating
    blocks (a machine that slows down mid-sample slows both), medians recorded with the count."""
    from torchkiln.driver.benchmark import interleaved_times

    inputs = fresh(program.example_inputs)  # a model that writes into its inputs changes these only
    by_name = program.eager_kwargs(inputs)
    times = interleaved_times({"eager": lambda: model(**by_name), "artifact": lambda: artifact.run(inputs)},
                              runs, block=max(1, runs // 5))  # fmt: skip
    record.eager_ms = statistics.median(times["eager"])
    record.artifact_ms = statistics.median(times["artifact"])
    record.latency_runs = len(times["artifact"])


def measure_error(
    program: Program,
    run: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]],
    tolerance: Tolerance,
    checks: Sequence[Check] | None = None,
) -> ErrorStats:
    """Worst error of ``run`` against the eager outputs over ``checks`` (the program's checks)."""
    worst: ErrorStats | None = None
    compared = 0
    for check in program.checks if checks is None else checks:
        stats = compare(run(fresh(check.inputs)), check.outputs, tolerance)
        compared += stats.compared
        if worst is None or stats.ratio > worst.ratio:
            worst = stats
    assert worst is not None
    if compared == 0:
        raise VerificationError(
            "nothing to verify: the eager outputs have no finite elements on the example inputs",
            hint="give example inputs on which the model returns non-empty, finite outputs",
        )
    return worst


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
