"""``torchkiln.workflows.compare``: find the first layer where an artifact stops agreeing with the eager model.

The eager model runs with a forward hook on every module, recording each call's output; the ONNX
artifact runs once with every module's output exposed (:mod:`torchkiln.backends.onnx_intermediates`).
Outputs are paired by module path and call, compared with the tolerance, and walked in the order
the eager calls finished (inner modules before the blocks that contain them): the first failing
one is where the difference starts, since everything after it consumes it.

Rewrites move module boundaries. A BatchNorm folded into its convolution leaves no ONNX node of
its own, and the convolution's ONNX output is then the eager BatchNorm's output; when a module's
output misses, the eager outputs of the vanished modules that ran right after it are tried too,
and a match is reported as ``conv (+ bn)``. Modules whose shapes differ (pruned) are not compared.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.compiler import arguments
from torchkiln.compiler.program import bind_inputs, fresh
from torchkiln.compiler.trace import private_copy
from torchkiln.compiler.verify import FP32, ErrorStats, Tolerance, compare
from torchkiln.driver.compiled import CompiledModel, load
from torchkiln.errors import BackendError, ConfigError, InputError


@dataclasses.dataclass
class LayerDiff:
    module: str
    call: int
    shape: tuple[int, ...]
    onnx_node: str
    max_abs: float | None = None
    cosine: float | None = None
    passed: bool | None = None  # None: not compared (see note)
    fused: list[str] = dataclasses.field(default_factory=list)
    note: str = ""

    @property
    def label(self) -> str:
        name = self.module + (f" (call {self.call + 1})" if self.call else "")
        return name + (f" (+ {', '.join(self.fused)})" if self.fused else "")


@dataclasses.dataclass
class Comparison:
    tolerance: Tolerance
    outputs: ErrorStats
    layers: list[LayerDiff]
    unmapped: list[str]  # eager modules with no ONNX value (fused away, or their own output not kept)

    @property
    def first_failure(self) -> LayerDiff | None:
        return next((layer for layer in self.layers if layer.passed is False), None)

    @property
    def passed(self) -> bool:
        return self.outputs.within() and self.first_failure is None

    def summary(self) -> str:
        first = self.first_failure
        if first is not None:
            return (
                f"first layer over the tolerance: {first.label} (ONNX node {first.onnx_node}): "
                f"max abs error {first.max_abs:.3e}, cosine {first.cosine:.5f} ({self.tolerance})"
            )
        if not self.outputs.within():
            return (
                f"output {self.outputs.worst_output} differs (max abs error {self.outputs.max_abs:.3e}) but no "
                "module output does: the difference arises after the last compared module or in ONNX Runtime's "
                "fusions (compare with optimize=False / --no-optimize)"
            )
        return f"all {sum(layer.passed is True for layer in self.layers)} compared module outputs and the outputs agree ({self.tolerance})"

    def table(self) -> str:
        rows = [("module", "shape", "max abs err", "cosine", "status")]
        for layer in self.layers:
            status = {True: "ok", False: "OVER", None: layer.note}[layer.passed]
            rows.append((
                layer.label, "x".join(map(str, layer.shape)),
                "-" if layer.max_abs is None else f"{layer.max_abs:.2e}",
                "-" if layer.cosine is None else f"{layer.cosine:.5f}", status,
            ))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in rows]
        return "\n".join([*lines, f"  outputs: max abs error {self.outputs.max_abs:.3e}, cosine "
                          f"{self.outputs.cosine:.5f}", self.summary()])  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": str(self.tolerance),
            "passed": self.passed,
            "summary": self.summary(),
            "first_failure": self.first_failure.module if self.first_failure else None,
            "outputs": dataclasses.asdict(self.outputs),
            "layers": [{**dataclasses.asdict(layer), "label": layer.label} for layer in self.layers],
            "unmapped": self.unmapped,
        }


def promise(compiled: CompiledModel) -> Tolerance:
    """The tolerance the artifact was verified against (its report's), else fp32's."""
    recorded = getattr(compiled.report.artifact, "tolerance", None)
    return Tolerance.parse(recorded) if recorded else FP32


def compare_artifact(
    model: nn.Module,
    artifact: CompiledModel | str | os.PathLike[str],
    inputs: Any,
    tolerance: Tolerance | None = None,
    optimize: bool = True,
) -> Comparison:
    """Compare every module output of ``model`` with the artifact's (a saved directory or a
    :class:`CompiledModel` with an ONNX artifact) on ``inputs`` (keyword tensors, a tuple of
    positional ones, or one tensor). ``model`` itself is not touched: a copy carries the hooks.
    ``tolerance`` defaults to the artifact's own promise, as its report recorded it (an int8
    artifact: cosine similarity >= 0.99; a lossless one: fp32 bounds)."""
    from torchkiln.backends.onnx_intermediates import module_values, run_values

    if not isinstance(model, nn.Module):
        raise ConfigError(f"compare_artifact needs a torch.nn.Module, got {type(model).__name__}", where="model")
    Tolerance.given(tolerance)
    arguments.flag("optimize", optimize)
    compiled = artifact if isinstance(artifact, CompiledModel) else load(artifact)
    model_path = getattr(compiled.artifact, "model_path", None)
    if model_path is None:
        raise ConfigError(
            f"compare needs an ONNX artifact; this one is '{compiled.backend}'",
            hint="build with the onnx or onnxruntime backend",
        )
    tolerance = tolerance or promise(compiled)
    if isinstance(inputs, Mapping):
        flat = bind_inputs(compiled.inputs, (), dict(inputs), compiled.constants)
    else:
        args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        flat = bind_inputs(compiled.inputs, args, {}, compiled.constants)
    named = dict(zip((s.name for s in compiled.inputs), flat))
    calls, order, result = _eager_calls(private_copy(model, share_parameters=True), named, compiled.constants)
    eager_outputs = _flat_tensors(result)
    try:
        outputs = compare(compiled.artifact.run(list(fresh(flat))), eager_outputs, tolerance)
    except ValueError as exc:  # another number or shape of outputs: not the model the artifact was built from
        raise InputError(
            f"the model's outputs do not match the artifact's: {exc}",
            where="model",
            hint="compare the artifact with the model it was compiled from",
        ) from exc

    mapped = module_values(Path(model_path))
    wanted = [v.value for values in mapped.values() for v in values]
    feeds = {spec.name: t.detach().cpu().contiguous().numpy() for spec, t in zip(compiled.inputs, flat)}
    try:
        values = run_values(Path(model_path), feeds, wanted, optimize=optimize)
    except Exception as exc:  # ORT's errors name the node; keep them, typed
        raise BackendError(
            f"ONNX Runtime could not run {model_path} with its intermediate outputs: {exc}"
        ) from exc
    layers = [_diff(key, calls, order, mapped, values, tolerance) for key in order]
    compared = [layer for layer in layers if layer is not None]
    unmapped = sorted({module for module, _ in order if module not in mapped})
    return Comparison(tolerance, outputs, compared, unmapped)


def _diff(
    key: tuple[str, int],
    calls: dict[tuple[str, int], torch.Tensor],
    order: list[tuple[str, int]],
    mapped: dict[str, Any],
    values: dict[str, Any],
    tolerance: Tolerance,
) -> LayerDiff | None:
    module, call = key
    found = mapped.get(module, [])
    if len(found) != sum(1 for m, _ in order if m == module) or call >= len(found):
        return None  # the module was fused away, or its calls cannot be paired one to one
    exposed = found[call]
    actual = torch.from_numpy(values[exposed.value])
    diff = LayerDiff(module, call, tuple(calls[key].shape), exposed.node)
    if tuple(actual.shape) != diff.shape:
        diff.note = f"shape {list(actual.shape)} in the artifact (rewritten)"
        return diff
    # Its own output, or a vanished successor's (folded into it): a match wins, else the closest.
    candidates = [
        key,
        *(c for c in _vanished_successors(key, order, mapped) if calls[c].shape == actual.shape),
    ]
    scored = [(compare([actual], [calls[c]], tolerance), c) for c in candidates]
    stats, chosen = next(((s, c) for s, c in scored if s.within()), max(scored, key=lambda sc: sc[0].cosine))
    diff.max_abs, diff.cosine, diff.passed = stats.max_abs, stats.cosine, stats.within()
    diff.fused = [c[0] for c in candidates[1 : candidates.index(chosen) + 1]]
    return diff


def _vanished_successors(
    key: tuple[str, int], order: list[tuple[str, int]], mapped: dict[str, Any]
) -> list[tuple[str, int]]:
    """Calls that finished right after ``key`` and left no ONNX value (folded into it)."""
    following = []
    for later in order[order.index(key) + 1 :]:
        if later[0] in mapped:
            break
        following.append(later)
    return following


def _eager_calls(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], constants: Mapping[str, Any]
) -> tuple[dict[tuple[str, int], torch.Tensor], list[tuple[str, int]], Any]:
    """Output of every module call that returns one tensor, by (module path, call number), the
    order the calls finished in, and the model's result."""
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    order: list[tuple[str, int]] = []
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            call = counts.get(name, 0)
            counts[name] = call + 1
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                outputs[(name, call)] = output.detach().clone()
                order.append((name, call))

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        result = _call(model, inputs, constants)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, order, result


def _call(model: nn.Module, inputs: Mapping[str, torch.Tensor], constants: Mapping[str, Any]) -> Any:
    try:
        with torch.no_grad():
            return model(**{name: t.clone() for name, t in inputs.items()}, **constants)
    except Exception as exc:
        shapes = ", ".join(f"{n}: {list(t.shape)} {t.dtype}" for n, t in inputs.items())
        raise InputError(
            f"the model fails on the artifact's inputs ({shapes}): {type(exc).__name__}: {exc}",
            where="model",
            hint="compare the artifact with the model it was compiled from",
        ) from exc



def _flat_tensors(value: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]
