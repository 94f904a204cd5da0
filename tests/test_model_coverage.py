"""Architectures nobody here wrote (tests/coverage_models.py): quantization reaches every weight
layer, with no silent miss, and fp16 runs them all.

For each model the expected count is computed here, independently of the pass's stats: every op
that multiplies by a stored weight (``weight_ops``) minus the documented exclusions — embedding
lookups, recurrent layers, conv layers in dynamic mode, weights computed in the graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from coverage_models import ARCHITECTURES

from torchkiln.compiler.passes import parse_pipeline
from torchkiln.compiler.trace import trace
from torchkiln.compiler.verify import cosine_similarity
from torchkiln.passes.layers import find_layers_and_skips, weight_ops

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'torchkiln[hf]')")

IDS = [arch.name for arch in ARCHITECTURES]


def _expected(program) -> tuple[int, int]:
    """(layers dynamic int8 must quantize, weight layers in all) on a copy of the graph."""
    gm = copy.deepcopy(program.graph_module)
    layers, _ = find_layers_and_skips(gm)
    linear = {layer.node for layer in layers if layer.kind == "linear" and layer.weight is not None}
    census = weight_ops(gm)
    return sum(1 for op in census if op.node in linear), len(census)


@pytest.fixture(scope="module", params=ARCHITECTURES, ids=IDS)
def traced(request):
    model, inputs, axes = request.param.build()
    return trace(model, inputs, dynamic_axes=axes)


def test_dynamic_int8_quantizes_every_linear_layer(traced):
    program = copy.deepcopy(traced)  # a pass rewrites the program it is given
    quantizable, weight_layers = _expected(program)
    assert quantizable > 0
    result = parse_pipeline("quantize:mode=dynamic")[0](program)
    assert result.stats["quantized"] == quantizable, result.notes
    assert result.stats["unrecognised"] == 0, result.notes
    assert result.stats["float"] == weight_layers - quantizable
    assert sum(": left in float, " in n for n in result.notes) == weight_layers - quantizable
    (check,) = program.checks[:1]
    outputs = program.run(check.inputs)
    for got, want in zip(outputs, check.outputs):
        if want.is_floating_point():
            assert cosine_similarity(got, want) > 0.99


def test_fp16_runs_every_architecture(traced):
    program = copy.deepcopy(traced)
    result = parse_pipeline("quantize:mode=fp16")[0](program)
    assert result.modified and result.stats["fp16_ops"] > 0
    (check,) = program.checks[:1]
    outputs = program.run(check.inputs)
    for got, want in zip(outputs, check.outputs):
        if want.is_floating_point():
            assert torch.isfinite(got).all()
            assert cosine_similarity(got, want) > 0.999
