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


def _t5_encoder():
    from coverage_models import ARCHITECTURES

    return next(a for a in ARCHITECTURES if a.name == "t5-encoder").build()


def test_t5_exports_to_onnx_with_dynamic_batch_and_sequence():
    """T5's attention output is a transposed tensor made contiguous, then reshaped; with a dynamic
    sequence the exporter's decomposition took it for contiguous and failed to `view` it. The ONNX
    backend hands the exporter `contiguous` as an always-copying clone."""
    model, inputs, axes = _t5_encoder()
    compiled = compile_quietly(model, inputs, dynamic_axes=axes, backend="onnxruntime")
    ids = torch.randint(3, 100, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_an_onnx_export_failure_names_the_real_node_and_cause(monkeypatch):
    """Without that rewrite the exporter fails inside its decomposition (upstream): the error names
    the node it failed at and the cause from the exception chain, not a missing translation."""
    from torchkiln.backends import onnx_backend
    from torchkiln.errors import ExportError

    monkeypatch.setattr(onnx_backend, "_for_export", lambda gm: gm)
    model, inputs, axes = _t5_encoder()
    with pytest.raises(ExportError) as info:
        compile_quietly(model, inputs, dynamic_axes=axes, backend="onnx")
    err = info.value
    assert "no ONNX translation" not in err.message
    assert "ONNX export failed at node 'view_" in err.message and "Cannot view a tensor" in err.message
    assert "SelfAttention" in err.where
