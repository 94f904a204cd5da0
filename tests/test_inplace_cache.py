"""The KV cache in place on ONNX Runtime (``backends/ort_cache.py``): generation rewrites the
artifact's attention, in memory, into GroupQueryAttention over one buffer per cache tensor bound as
both past and present; every other form, and the option off, passes the cache in and out."""

from __future__ import annotations

import dataclasses
import warnings

import onnx
import pytest
import torch
from conftest import compile_quietly, count_runs, generates_like, tiny_llama

import torchkiln
from torchkiln.backends import ort_cache
from torchkiln.driver import generate as generation
from torchkiln.errors import BackendError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama():
    """Grouped heads (4 query, 2 KV), compiled with its cache and a mask from one prompt (batch 1)."""
    lm = tiny_llama()
    prompt = torch.randint(3, 128, (1, 6))
    return lm, compile_quietly(lm, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, backend="onnxruntime")


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """Counts the steps run with the cache in place."""
    return count_runs(monkeypatch, ort_cache.SharedCacheSession)


def test_the_attention_becomes_group_query_attention_over_shared_buffers(llama):
    _, compiled = llama
    model = onnx.load(str(compiled.artifact.model_path))
    session = compiled.artifact.session
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    pairs = list(zip(inputs[3:], outputs[1:]))  # then the cache, in the order of the presents
    rewritten = ort_cache.shared_cache_model(model, pairs)
    kinds = [node.op_type for node in rewritten.graph.node]
    assert kinds.count("GroupQueryAttention") == 2 and "Attention" not in kinds
    # no Concat reads a past input any more, and the number cached is an input
    assert not [n for n in rewritten.graph.node if n.op_type == "Concat" and set(n.input) & set(inputs[3:])]
    assert ort_cache.PAST_LENGTH in [i.name for i in rewritten.graph.input]
    assert [n.op_type for n in model.graph.node].count("Attention") == 2  # the artifact's own graph is untouched
    # one layer's pairs: that layer alone; a key paired with the wrong output, or one of a layer's
    # two: no layer has its form, the graph is left as it is (the caller passes the cache)
    assert [n.op_type for n in ort_cache.shared_cache_model(model, pairs[:2]).graph.node].count("Attention") == 1
    assert ort_cache.shared_cache_model(model, [(pairs[0][0], pairs[1][1]), (pairs[1][0], pairs[0][1])]) is None
    assert ort_cache.shared_cache_model(model, pairs[:1]) is None


def test_generation_with_the_cache_in_place_equals_transformers(llama, steps):
    generates_like(*llama)
    assert len(steps) == 3 * 5  # every step (the prompt and four decode steps, three times) in place


def test_the_option_off_and_opset_18_pass_the_cache(llama, steps, tmp_path):
    lm, compiled = llama
    saved = compiled.save(tmp_path / "lm")
    before = sorted(p.name for p in saved.iterdir())
    loaded = torchkiln.load(saved)
    loaded.artifact.options = dataclasses.replace(loaded.artifact.options, inplace_cache=False)
    generates_like(lm, loaded)
    assert not steps
    prompt = torch.randint(3, 128, (1, 6))
    decomposed = compile_quietly(lm, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)},
                                 backend="onnxruntime", backend_options={"opset": 18})  # fmt: skip
    generates_like(lm, decomposed)  # attention as plain ops: not the rewritten form
    assert not steps
    in_place = torchkiln.load(saved)
    generates_like(lm, in_place)
    assert len(steps) == 15 and sorted(p.name for p in saved.iterdir()) == before  # nothing written


def test_a_runtime_form_that_disagrees_is_not_trusted(llama, monkeypatch, tmp_path):
    """The first step on a fresh artifact is also run the artifact's own way; logits that disagree
    give a warning and the generation goes on with the cache passed, equal to transformers'."""
    lm, compiled = llama
    fresh = torchkiln.load(compiled.save(tmp_path / "lm"))
    artifact = fresh.artifact
    assert artifact not in generation._AGREED
    run = ort_cache.SharedCacheSession.run
    monkeypatch.setattr(ort_cache.SharedCacheSession, "run", lambda self, inputs: [t.flip(-1) for t in run(self, inputs)])
    ids = torch.randint(3, 128, (2, 7))
    expected = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with pytest.warns(RuntimeWarning, match="disagrees with the artifact's own graph"):
        assert torch.equal(fresh.generate(ids, max_new_tokens=4, min_new_tokens=4), expected)
    assert artifact not in generation._AGREED


def test_the_buffer_is_held_to_its_capacity(llama):
    _, compiled = llama
    session = compiled.artifact.session
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    assert len(inputs) == 7 and len(outputs) == 5
    pairs = [(3 + i, 1 + i) for i in range(4)]  # past_key_0 -> output_1, ...
    kept = compiled.artifact.cache_session(pairs, [torch.zeros(1, 2, 0, 8)] * 4, 4)
    assert isinstance(kept, ort_cache.SharedCacheSession)
    ids = torch.randint(3, 128, (1, 3))
    (logits,) = kept.run([ids, torch.ones_like(ids), torch.arange(3).unsqueeze(0)])
    assert logits.shape == (1, 3, 128)
    with pytest.raises(BackendError, match="holds 4 positions; this step would need 5"):
        kept.run([ids[:, :2], torch.ones(1, 5, dtype=torch.long), torch.tensor([[3, 4]])])
    with pytest.raises(BackendError, match="starts as"):
        compiled.artifact.cache_session(pairs, [torch.zeros(1, 2, 9, 8)] * 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled.artifact.cache_session(pairs[:1], [torch.zeros(1, 2, 0, 8)], 4) is None  # one of four: not in place


def test_a_rewritten_graph_onnx_runtime_refuses_falls_back_with_a_warning(llama, monkeypatch, tmp_path, steps):
    lm, compiled = llama
    loaded = torchkiln.load(compiled.save(tmp_path / "lm"))
    create = type(loaded.artifact).create_session

    def refuse(self, model=None):
        if model is not None:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : invalid model")
        return create(self)

    monkeypatch.setattr(type(loaded.artifact), "create_session", refuse)
    ids = torch.randint(3, 128, (2, 7))
    expected = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with pytest.warns(RuntimeWarning, match="cannot load .* with its cache in place"):
        assert torch.equal(loaded.generate(ids, max_new_tokens=4, min_new_tokens=4), expected)
    assert not steps
