"""Hugging Face models: symbolic tracing fails on them, so auto capture falls back to torch.export.

A tiny randomly initialised BERT is built from a config: no hub access is needed."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import compile_quietly

import torchkiln
from torchkiln.errors import ArtifactError

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
    if backend == "onnxruntime":  # a fresh process has not imported transformers' output classes
        _loads_in_a_fresh_process(tmp_path / "bert", type(expected).__name__)


def _loads_in_a_fresh_process(directory, output_class):
    script = (
        "import sys, torch, torchkiln\n"
        "assert 'transformers' not in sys.modules\n"
        f"out = torchkiln.load({str(directory)!r})(input_ids=torch.ones(1, 5, dtype=torch.long), "
        "attention_mask=torch.ones(1, 5, dtype=torch.long))\n"
        "print(type(out).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == output_class


@pytest.mark.parametrize("named", ["os.system", "transformers.utils.SomeOutput", "evil.modeling_outputs.X"])
def test_an_output_class_outside_transformers_modeling_modules_is_not_imported(bert, tmp_path, named):
    ids = torch.randint(0, 100, (1, 6))
    saved = compile_quietly(bert, {"input_ids": ids}).save(tmp_path / "bert")
    manifest = json.loads((saved / "manifest.json").read_text())
    known = "transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions"
    assert known in manifest["out_spec"]
    manifest["out_spec"] = manifest["out_spec"].replace(known, named)
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"names {re.escape(named)}, which pytree does not know"):
        torchkiln.load(saved)


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
