"""Architectures nobody here wrote (tests/coverage_models.py), end to end: lossless ONNX Runtime with
dynamic axes, dynamic and static (calibrated) int8 on ONNX Runtime, fp16 on the torch backend, and
save/load. Quantization must reach every weight layer with no silent miss.

For each model the expected count is computed here, independently of the pass's stats: every op
that multiplies by a stored weight (``weight_ops``) minus the documented exclusions — embedding
lookups, recurrent layers, conv layers in dynamic mode, a mixture of experts' grouped matmuls in
static int8, weights computed in the graph.

The table of docs/coverage.md is this test's output: every case that runs compares its cell with
the page's (a stale page fails), and ``TORCHKILN_WRITE_COVERAGE=1`` with the whole matrix run
(``make coverage``) rewrites it. ONNX Runtime cases take 10-25 s each (an ONNX export each),
so CI runs them on an encoder (``CI_ARCHITECTURES``; decoders reach ONNX Runtime in test_causal_lm; T5, ViT and recurrent models
reach ONNX Runtime in test_huggingface, test_backends and test_quantize_coverage) and the rest are marked ``slow``; the
graph-level and fp16 cases run on every model.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from conftest import compile_quietly
from coverage_models import ARCHITECTURES, Arch, calibration_batches, resized
from coverage_table import Table

import torchkiln
from torchkiln.backends import backend_options, get_backend
from torchkiln.compiler.passes import parse_pipeline
from torchkiln.compiler.trace import trace
from torchkiln.compiler.verify import cosine_similarity
from torchkiln.errors import ArtifactError
from torchkiln.passes.layers import find_layers_and_skips, weight_ops

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'torchkiln[hf]')")

CASES = ("ONNX Runtime", "dynamic axes", "save/load", "save/load (torch)", "dynamic int8", "static int8", "fp16 (torch)")
CI_ARCHITECTURES = ("bert",)  # GPT-2 reaches ONNX Runtime in CI through test_causal_lm (its cached graph)
TABLE = Table("model-coverage", [(a.name, a.family) for a in ARCHITECTURES], CASES, "coverage")
MIN_COSINE = 0.99
#: architectures whose torch artifact is refused at save: a custom operator of another package (running it on
#: load would run that package's code) is never on the allow-list
TORCH_UNSAVED = {"mixtral": "transformers::grouped_mm_fallback"}


def _params(ci: tuple[str, ...] | None) -> list[Any]:
    return [
        pytest.param(arch, id=arch.name, marks=() if ci is None or arch.name in ci else pytest.mark.slow)
        for arch in ARCHITECTURES
    ]


ALL, ORT = _params(None), _params(CI_ARCHITECTURES)


@functools.cache
def _built(name: str) -> tuple[torch.nn.Module, dict[str, Any], dict[str, dict[int, str]], Any]:
    """(model, example inputs, dynamic axes, traced program) once per architecture."""
    arch = next(a for a in ARCHITECTURES if a.name == name)
    model, inputs, axes = arch.build()
    return model, inputs, axes, trace(model, inputs, dynamic_axes=axes)


@functools.cache
def _cleaned(name: str) -> Any:
    """The traced program after ``cleanup``, as the quantize pass sees it in ``cleanup,quantize``:
    constant folding can turn a lookup at constant positions (CLIP) into a constant, or a weight
    computed in the graph (Wav2Vec2's weight-normed conv) into a stored one."""
    program = copy.deepcopy(_built(name)[3])
    parse_pipeline("cleanup")[0](program)
    return program


def _expected(program: Any, kinds: tuple[str, ...], experts: bool) -> tuple[int, int]:
    """(layers of these kinds with a stored weight, plus a mixture of experts' grouped matmuls when
    ``experts``; weight ops in all), counted on a copy."""
    gm = copy.deepcopy(program.graph_module)
    layers, _ = find_layers_and_skips(gm)
    wanted = {layer.node for layer in layers if layer.kind in kinds and layer.weight is not None}
    census = weight_ops(gm)
    return sum(1 for op in census if op.node in wanted or (experts and op.kind == "experts")), len(census)


def _floats(output: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _record(arch: Arch, case: str, cell: str) -> None:
    TABLE.record(arch.name, case, cell)


def _quantize_stats(compiled: Any) -> dict[str, Any]:
    (result,) = [p for p in compiled.report.passes if p.name == "quantize"]
    return result.stats


# ---------------------------------------------------------------------------- graph level, all models


@pytest.mark.parametrize("arch", ALL)
def test_dynamic_int8_quantizes_every_linear_layer(arch):
    program = copy.deepcopy(_built(arch.name)[3])  # a pass rewrites the program it is given
    quantizable, weight_layers = _expected(program, ("linear",), experts=True)
    assert quantizable > 0
    result = parse_pipeline("quantize:mode=dynamic")[0](program)
    assert result.stats["quantized"] == quantizable, result.notes
    assert result.stats["unrecognised"] == 0, result.notes
    assert result.stats["float"] == weight_layers - quantizable
    assert sum(": left in float, " in n for n in result.notes) == weight_layers - quantizable
    (check,) = program.checks[:1]
    for got, want in zip(program.run(check.inputs), check.outputs):
        if want.is_floating_point():
            assert cosine_similarity(got, want) > MIN_COSINE


@pytest.mark.parametrize("arch", ALL)
def test_fp16_on_the_torch_backend(arch):
    """cleanup + fp16 lowered by the torch backend, checked against eager at the example and the
    widened sizes (compile's own checks, without tracing the model a second time)."""
    program = copy.deepcopy(_built(arch.name)[3])
    for pass_ in parse_pipeline("cleanup,quantize:mode=fp16"):
        result = pass_(program)
    assert result.stats["fp16_ops"] > 0
    artifact = get_backend("torch").lower(program, backend_options("torch", None))
    assert len(program.checks) == 2
    for check in program.checks:
        outputs = artifact.run(check.inputs)
        assert len(outputs) == len(check.outputs)
        for got, want in zip(outputs, check.outputs):
            if want.is_floating_point():
                assert torch.isfinite(got).all() and cosine_similarity(got, want) > 0.999
    _record(arch, "fp16 (torch)", "✓")


# ------------------------------------------------------------------- ONNX Runtime, CI_ARCHITECTURES


@pytest.mark.parametrize("arch", ORT)
def test_lossless_onnxruntime_dynamic_axes_and_save_load(arch, tmp_path):
    model, inputs, axes, _ = _built(arch.name)
    compiled = compile_quietly(model, inputs, dynamic_axes=axes, passes="cleanup", backend="onnxruntime")
    assert compiled.report.artifact.max_abs_error < 1e-3
    _record(arch, "ONNX Runtime", "✓")
    other = resized(inputs, axes)  # every dynamic axis at a size neither the example nor the checks used
    with torch.no_grad():
        want = _floats(model(**other))
    got = _floats(compiled(**other))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)
    names = sorted({name for spec in axes.values() for name in spec.values()})
    _record(arch, "dynamic axes", "✓ " + ", ".join(names))
    loaded = torchkiln.load(compiled.save(tmp_path / arch.name))
    for g, w in zip(_floats(loaded(**other)), got):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    _record(arch, "save/load", "✓")


@pytest.mark.parametrize("arch", ORT)
def test_the_torch_backend_saves_and_loads_exactly_at_a_new_size(arch, tmp_path):
    """What compiles deploys: the torch artifact's saved form (torch.export of the rewritten graph,
    re-checked against it) loads back and gives the compiled model's outputs bit for bit at sizes
    neither the example nor the checks used."""
    model, inputs, axes, _ = _built(arch.name)
    compiled = compile_quietly(model, inputs, dynamic_axes=axes, passes="cleanup", backend="torch")
    other = resized(inputs, axes)
    got = _floats(compiled(**other))
    if arch.name in TORCH_UNSAVED:  # refused by name, before anything is written
        with pytest.raises(ArtifactError, match=TORCH_UNSAVED[arch.name]):
            compiled.save(tmp_path / arch.name)
        assert not (tmp_path / arch.name).exists()
        _record(arch, "save/load (torch)", f"✗ {TORCH_UNSAVED[arch.name]} (ONNX saves it)")
        return
    loaded = torchkiln.load(compiled.save(tmp_path / arch.name))
    for g, w in zip(_floats(loaded(**other)), got, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    _record(arch, "save/load (torch)", "✓")


@pytest.mark.parametrize("arch", ORT)
@pytest.mark.parametrize("mode", ["dynamic", "int8"])
def test_int8_onnxruntime_quantizes_every_layer(arch, mode):
    model, inputs, axes, _ = _built(arch.name)
    kinds = ("linear",) if mode == "dynamic" else ("linear", "conv")
    quantizable, weight_layers = _expected(_cleaned(arch.name), kinds, experts=mode == "dynamic")
    calibration = calibration_batches(inputs, axes, 8) if mode == "int8" else None
    compiled = compile_quietly(
        model, inputs, dynamic_axes=axes, passes=f"cleanup,quantize:mode={mode}", backend="onnxruntime",
        calibration_data=calibration,
    )  # fmt: skip
    stats = _quantize_stats(compiled)
    assert stats["quantized"] == quantizable and quantizable > 0, stats
    assert stats["float"] == weight_layers - quantizable and stats["unrecognised"] == 0, stats
    artifact = compiled.report.artifact
    assert artifact.cosine is not None and artifact.cosine > MIN_COSINE
    _record(arch, "dynamic int8" if mode == "dynamic" else "static int8", f"✓ {quantizable}/{weight_layers}")


# ----------------------------------------------------------------------------------- README's table


@pytest.fixture(scope="module", autouse=True)
def readme_table():
    """After the module: README's table must say what this run measured, or be rewritten."""
    yield
    TABLE.finish()
