"""Hugging Face models: symbolic tracing fails on them, so auto capture falls back to torch.export.

A tiny randomly initialised BERT is built from a config: no hub access is needed."""

from __future__ import annotations

import pytest
import torch
from conftest import compile_quietly

import torchkiln

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'torchkiln[hf]')"
)


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_bert_compiles_with_dynamic_batch_and_sequence(bert, backend, tmp_path):
    ids = torch.randint(0, 100, (1, 12))
    mask = torch.ones(1, 12, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    compiled = compile_quietly(
        bert, {"input_ids": ids, "attention_mask": mask}, backend=backend, dynamic_axes=axes
    )
    assert compiled.report.flavour == "export"
    ids3, mask3 = torch.randint(0, 100, (3, 20)), torch.ones(3, 20, dtype=torch.int64)
    mask3[1, 15:] = 0
    expected = bert(input_ids=ids3, attention_mask=mask3)
    for model in (compiled, torchkiln.load(compiled.save(tmp_path / "bert"))):
        out = model(input_ids=ids3, attention_mask=mask3)
        assert type(out) is type(expected)
        torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.pooler_output, expected.pooler_output, atol=1e-4, rtol=1e-4)


def test_an_onnx_export_failure_names_the_real_node_and_cause():
    """T5's attention output is a transposed tensor that the exporter's decomposition tries to
    `view` (upstream limitation): the error names that node and its cause, not a missing translation."""
    from coverage_models import ARCHITECTURES

    from torchkiln.errors import ExportError

    model, inputs, axes = next(a for a in ARCHITECTURES if a.name == "t5-encoder").build()
    with pytest.raises(ExportError) as info:
        compile_quietly(model, inputs, dynamic_axes=axes, backend="onnx")
    err = info.value
    assert "no ONNX translation" not in err.message
    assert "ONNX export failed at node 'view_" in err.message and "Cannot view a tensor" in err.message
    assert "SelfAttention" in err.where
    assert compile_quietly(model, inputs, dynamic_axes=axes, backend="torch").report.artifact.max_abs_error < 1e-4
