"""Decoder LMs compiled with their KV cache (torchkiln.compiler.causal_lm): one artifact serves the
prompt (an empty past) and every next token; greedy decoding with it equals transformers' generate.

Random-init toy configs (no hub access): GPT-2 (learned positions), Llama with grouped-query
attention (2 KV heads for 4 query heads) and rotary positions, Qwen2, Phi-3, and Mistral with a
sliding window shorter than the sequences."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
from conftest import compile_quietly

import torchkiln
from torchkiln.compiler.causal_lm import past_names
from torchkiln.errors import InputError

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'torchkiln[hf]')")

VOCAB = 100


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


_LLAMA_SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA_SIZES))


def _qwen2():
    config = transformers.Qwen2Config(**_LLAMA_SIZES)
    return transformers.Qwen2ForCausalLM(config)


def _mistral_sliding():  # a window of 5: every prompt + new tokens below goes past it
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_LLAMA_SIZES, sliding_window=5))


def _phi3():
    config = transformers.Phi3Config(**_LLAMA_SIZES)
    return transformers.Phi3ForCausalLM(config)


def _compiled(build, backend="onnxruntime", **kwargs):
    torch.manual_seed(0)
    lm = build().eval()
    example = torch.randint(3, VOCAB, (1, 4))
    inputs = {"input_ids": example, "attention_mask": torch.ones_like(example)}
    return lm, compile_quietly(lm, inputs, backend=backend, **kwargs)


@pytest.fixture(scope="module")
def gpt2():
    return _compiled(_gpt2)


@pytest.mark.parametrize(
    ("build", "backend"),
    [
        pytest.param(_gpt2, "onnxruntime", id="gpt2-onnxruntime"),
        pytest.param(_gpt2, "torch", id="gpt2-torch", marks=pytest.mark.slow),
        pytest.param(_llama, "onnxruntime", id="llama-gqa-onnxruntime"),
        pytest.param(_llama, "torch", id="llama-gqa-torch", marks=pytest.mark.slow),
        pytest.param(_qwen2, "onnxruntime", id="qwen2-onnxruntime", marks=pytest.mark.slow),
        pytest.param(_qwen2, "torch", id="qwen2-torch", marks=pytest.mark.slow),
        pytest.param(_mistral_sliding, "onnxruntime", id="mistral-sliding-window-onnxruntime"),
        pytest.param(_phi3, "onnxruntime", id="phi3-onnxruntime", marks=pytest.mark.slow),
        pytest.param(_phi3, "torch", id="phi3-torch", marks=pytest.mark.slow),
    ],
)
def test_greedy_generate_equals_transformers(build, backend):
    """Prefill with an empty past, then one token at a time: token for token what transformers'
    generate(do_sample=False, num_beams=1) gives, for one prompt, a batch of two and a left-padded
    batch of two (whose short row generates what it generates alone)."""
    lm, compiled = _compiled(build, backend)
    layers = lm.config.num_hidden_layers
    names = ["input_ids", "attention_mask", "position_ids", *past_names(layers)]
    assert [spec.name for spec in compiled.inputs] == names
    if build is not _gpt2:  # grouped-query attention: the cache holds the 2 KV heads, not the 4 query heads
        assert {(spec.shape[1], spec.shape[3]) for spec in compiled.inputs[3:]} == {(2, 8)}
    assert compiled.generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_positions": 64}
    (cleanup,) = [p for p in compiled.report.passes if p.name == "cleanup"]
    # transformers repeats the KV heads for the query heads; the attention reads them ungrouped instead
    assert cleanup.stats["repeated_kv_removed"] == (0 if build is _gpt2 else layers)
    if backend == "onnxruntime":  # opset 23: one Attention op per layer, no decomposed softmax(q @ kᵀ)
        ops = collections.Counter(node.op_type for node in onnx.load(str(compiled.artifact.model_path)).graph.node)
        assert ops["Attention"] == layers and ops["Softmax"] == 0
    padded = torch.randint(3, VOCAB, (2, 7))
    padded[1, :3] = 0
    padded_mask = (torch.arange(7) >= torch.tensor([[0], [3]])).long()
    prompts = [  # none of them the example's shape
        (torch.randint(3, VOCAB, (1, 6)), None), (torch.randint(3, VOCAB, (2, 3)), None), (padded, padded_mask)
    ]  # fmt: skip
    for prompt, mask in prompts:
        streamed = []
        # transformers masks the config's EOS until min_new_tokens; ours defaults to the same EOS
        ours = compiled.generate(prompt, mask, max_new_tokens=8, min_new_tokens=8, on_token=streamed.append)
        with torch.no_grad():
            theirs = lm.generate(
                prompt, attention_mask=torch.ones_like(prompt) if mask is None else mask, max_new_tokens=8,
                min_new_tokens=8, do_sample=False, num_beams=1,
            )  # fmt: skip
        assert ours.tolist() == theirs.tolist()
        assert torch.stack(streamed, 1).tolist() == ours[:, prompt.shape[1] :].tolist()
    alone = compiled.generate(padded[1:, 3:], max_new_tokens=8, min_new_tokens=8)
    assert alone[0, 4:].tolist() == ours[1, 7:].tolist()


def test_onnx_runtime_generation_runs_torch_bookkeeping_on_one_thread(gpt2, monkeypatch):
    """torch's spinning OpenMP workers would compete with ONNX Runtime for the cores between steps;
    the torch backend keeps its threads, and the count is restored afterwards (also on an error)."""
    _, compiled = gpt2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    counts = []
    monkeypatch.setattr(torch, "set_num_threads", counts.append)
    compiled.generate(torch.randint(3, VOCAB, (1, 3)), max_new_tokens=2)
    assert counts == [1, 4]

    def fail(token):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        compiled.generate(torch.randint(3, VOCAB, (1, 3)), max_new_tokens=2, on_token=fail)
    assert counts == [1, 4, 1, 4]
    monkeypatch.setattr(compiled.artifact, "backend", "torch")
    compiled.generate(torch.randint(3, VOCAB, (1, 3)), max_new_tokens=2)
    assert counts == [1, 4, 1, 4]


def test_generation_stops_at_eos_samples_reproducibly_and_survives_save_load(gpt2, tmp_path):
    _, compiled = gpt2
    prompt = torch.randint(3, VOCAB, (2, 5))
    greedy = compiled.generate(prompt, max_new_tokens=6, eos_token_id=None)  # the config's EOS off
    eos = int(greedy[0, 5])  # row 0's first new token: row 0 stops at once, then gets padding
    stopped = compiled.generate(prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert stopped[0, 5] == eos and (stopped[0, 6:] == 0).all()
    row, expected = greedy[1, 5:].tolist(), []
    for token in row:  # row 1: greedy up to its own eos (if any), then padding
        expected.append(token)
        if token == eos:
            break
    expected += [0] * (len(row) - len(expected))
    assert stopped[1, 5:].tolist() == expected[: stopped.shape[1] - 5]
    assert compiled.generate(prompt, max_new_tokens=6, eos_token_id=eos, min_new_tokens=6).shape[1] == 11
    sampled = compiled.generate(prompt, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=3)
    again = compiled.generate(prompt, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=3)
    assert sampled.tolist() == again.tolist()
    loaded = torchkiln.load(compiled.save(tmp_path / "lm"))
    assert loaded.generation == compiled.generation  # the defaults travel in the manifest
    assert loaded.generate(prompt, max_new_tokens=6, eos_token_id=None).tolist() == greedy.tolist()
    assert loaded.generate(prompt, max_new_tokens=6).tolist() == compiled.generate(prompt, max_new_tokens=6).tolist()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"attention_mask": torch.tensor([[1, 1]])}, "attention_mask must have input_ids' shape"),
        ({"max_new_tokens": 62}, "a prompt of 3 tokens plus max_new_tokens=62 exceeds the model's 64 positions"),
        # values of the right type but out of range: raw IndexError / RuntimeError / ValueError before
        ({"eos_token_id": VOCAB}, rf"eos_token_id must be \[0, {VOCAB}\) \(the vocabulary\), got {VOCAB}"),
        ({"pad_token_id": -1, "eos_token_id": None}, "pad_token_id must be"),
        ({"do_sample": True, "temperature": float("nan")}, "temperature must be > 0, got nan"),
        ({"do_sample": True, "top_p": float("inf")}, "top_p must be in"),
        ({"do_sample": True, "seed": 2**64}, r"seed must be \[0, 2\*\*64\)"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be >= 1, got 2.5"),
        ({"top_k": True}, "top_k must be >= 0, got True"),
    ],
)
def test_bad_generation_settings_are_input_errors(gpt2, settings, message):
    _, compiled = gpt2
    heard = []
    with pytest.raises(InputError, match=message):
        compiled.generate(torch.randint(3, VOCAB, (1, 3)), on_token=heard.append, **settings)
    assert heard == []  # refused before the first token


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e300])
def test_sampling_at_extreme_temperatures_stays_finite(gpt2, temperature):
    """1e-40 passed the check, then overflowed the scaled logits to inf (NaN probabilities) after
    the prompt was printed. A temperature near 0 samples the greedy tokens; a huge one any token."""
    _, compiled = gpt2
    prompt = torch.randint(3, VOCAB, (2, 4))
    sampled = compiled.generate(prompt, max_new_tokens=5, do_sample=True, temperature=temperature, seed=1,
                                eos_token_id=None)  # fmt: skip
    assert sampled.shape == (2, 9) and int(sampled.min()) >= 0 and int(sampled.max()) < VOCAB
    if temperature < 1e-30:
        assert torch.equal(sampled, compiled.generate(prompt, max_new_tokens=5, eos_token_id=None))


def test_prompt_ids_outside_the_vocabulary_are_refused_through_a_view(gpt2):
    """GPT-2 views its ids before the embedding: the range was not recorded, so ids of -1 or >= the
    vocabulary generated silently on ONNX Runtime and OpenVINO (or failed inside the runtime)."""
    _, compiled = gpt2
    assert compiled.inputs[0].name == "input_ids" and compiled.inputs[0].value_range == (0, VOCAB)
    for bad in (-1, VOCAB):
        with pytest.raises(InputError, match=rf"outside \[0, {VOCAB}\)"):
            compiled.generate(torch.tensor([[5, bad, 7]]), max_new_tokens=2)


def test_max_new_tokens_is_priced_against_the_memory_budget_before_allocating(gpt2, monkeypatch):
    """A model without a position limit allocated its whole in-place cache up front: a raw MemoryError."""
    _, compiled = gpt2
    monkeypatch.setitem(compiled.generation, "max_positions", None)
    with pytest.raises(InputError, match=r"max_new_tokens=1000000000 needs .* GiB for a KV cache .* over the memory budget"):
        compiled.generate(torch.randint(3, VOCAB, (1, 3)), max_new_tokens=10**9)
    monkeypatch.setenv("TORCHKILN_MEMORY_BUDGET", "1KiB")
    with pytest.raises(InputError, match=r"over the memory budget of 1.0 KiB \(\$TORCHKILN_MEMORY_BUDGET\)"):
        compiled.generate(torch.randint(3, VOCAB, (1, 3)), max_new_tokens=40)
    monkeypatch.delenv("TORCHKILN_MEMORY_BUDGET")
    assert compiled.generate(torch.randint(3, VOCAB, (1, 3)), max_new_tokens=4).shape == (1, 7)


def test_a_forced_token_outside_the_vocabulary_in_the_manifest_is_refused(gpt2, tmp_path):
    _, compiled = gpt2
    loaded = torchkiln.load(compiled.save(tmp_path / "lm"))
    loaded.generation = {**(loaded.generation or {}), "forced_eos_token_id": VOCAB + 5}
    with pytest.raises(InputError, match="forced_eos_token_id must be"):
        loaded.generate(torch.randint(3, VOCAB, (1, 3)), max_new_tokens=2)


def test_a_prompt_longer_than_the_positions_is_an_input_error(gpt2):
    _, compiled = gpt2
    with pytest.raises(InputError, match="a prompt of 65 tokens plus max_new_tokens=1 exceeds the model's 64") as info:
        compiled.generate(torch.randint(3, VOCAB, (1, 65)), max_new_tokens=1)
    assert info.value.where == "input_ids"


def test_without_a_mask_in_the_example_there_are_no_positions_and_padding_is_refused():
    torch.manual_seed(0)
    lm = _gpt2().eval()
    compiled = compile_quietly(lm, {"input_ids": torch.randint(3, VOCAB, (1, 4))}, backend="torch")
    assert [spec.name for spec in compiled.inputs][:2] == ["input_ids", "past_key_0"]
    prompt = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        theirs = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5)
    assert compiled.generate(prompt, max_new_tokens=5, min_new_tokens=5).tolist() == theirs.tolist()
    with pytest.raises(InputError, match="no attention_mask input: a padded batch would attend to its padding"):
        compiled.generate(prompt, torch.tensor([[0, 1, 1, 1, 1]]), max_new_tokens=2)


def test_use_cache_false_still_compiles_without_the_cache_and_cannot_generate():
    torch.manual_seed(0)
    lm = _gpt2().eval()
    ids = torch.randint(3, VOCAB, (1, 5))
    compiled = compile_quietly(lm, {"input_ids": ids, "use_cache": False}, backend="torch")
    assert [spec.name for spec in compiled.inputs] == ["input_ids"]
    with pytest.raises(InputError, match="compiled without the KV cache: it cannot generate"):
        compiled.generate(ids, max_new_tokens=2)


def test_a_base_decoder_returning_its_cache_object_gets_the_exact_fix():
    """GPT2Model (no LM head: it cannot generate) returns a DynamicCache by default: the error says
    how to compile it (use_cache=False) or what to compile to generate (the ...ForCausalLM class)."""
    from torchkiln.errors import TraceError

    model = transformers.GPT2Model(_gpt2().config).eval()
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(TraceError, match="is a DynamicCache, not a tensor") as info:
        compile_quietly(model, {"input_ids": ids}, backend="torch")
    assert "use_cache=False" in info.value.hint and "ForCausalLM" in info.value.hint
    compiled = compile_quietly(model, {"input_ids": ids, "use_cache": False}, backend="torch")
    torch.testing.assert_close(compiled(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_an_axis_named_as_a_sum_grows_by_its_terms():
    """The widened check grows a cached LM's mask (past+sequence) by two when past and sequence
    each grow by one: Bloom's ALiBi bias, built from the mask, must match the keys' length."""
    from torchkiln.compiler.export import widen

    mask, ids = torch.ones(1, 5), torch.ones(1, 3)
    grown = widen((mask, ids), ["mask", "ids"], {"mask": {1: "past+sequence"}, "ids": {0: "batch", 1: "sequence"}})
    assert [list(t.shape) for t in grown] == [[1, 7], [2, 4]]


def test_other_example_inputs_are_a_clear_error_with_the_cache_on():
    lm = _gpt2().eval()
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(InputError, match="takes input_ids .and attention_mask.; got .'input_ids', 'token_type_ids'."):
        compile_quietly(lm, {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}, backend="torch")


def test_dynamic_int8_reaches_every_projection_of_the_cached_graph():
    torch.manual_seed(0)
    lm = _gpt2().eval()
    ids = torch.randint(3, VOCAB, (1, 4))
    compiled = compile_quietly(
        lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, passes="cleanup,quantize:mode=dynamic",
        backend="torch",
    )
    (record,) = [p for p in compiled.report.passes if p.name == "quantize"]
    # 4 projections per block (c_attn, c_proj, mlp.c_fc, mlp.c_proj) + lm_head; wte/wpe lookups stay float
    assert record.stats == {"quantized": 9, "float": 2, "unrecognised": 0}, record.notes
    assert compiled.report.artifact.cosine is not None and compiled.report.artifact.cosine > 0.99


def test_a_mixture_of_experts_quantizes_its_experts_weight_only_on_onnxruntime():
    """Mixtral with its cache, weight-only int8 in blocks of 16 on ONNX Runtime, the second layer's
    experts left in float by ``ignore``: each first-layer expert's weight becomes a MatMulNBits on
    that expert's rows (4 experts x 2 grouped matmuls), the float experts one MatMul each, beside the
    11 projections; greedy tokens equal transformers' at batch 2 (int8 rounding is far below the
    logits' gaps here)."""
    from coverage_models import GENERATORS

    lm = next(g for g in GENERATORS if g.name == "mixtral").build()
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    compiled = compile_quietly(
        lm, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, backend="onnxruntime",
        passes="cleanup,quantize:mode=weight_only,bits=8,block_size=16,ignore=*.layers.1.mlp.experts",
    )  # fmt: skip
    (quantize,) = [p for p in compiled.report.passes if p.name == "quantize"]
    assert quantize.stats == {"quantized": 13, "float": 3, "unrecognised": 0}
    ops = collections.Counter(node.op_type for node in onnx.load(str(compiled.artifact.model_path)).graph.node)
    assert ops["MatMulNBits"] == 11 + 4 * 2 and ops["MatMul"] >= 4 * 2
    batch = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    ours = compiled.generate(batch, max_new_tokens=8, min_new_tokens=8)
    with torch.no_grad():
        theirs = lm.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=8, min_new_tokens=8)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mamba", "whisper"])
def test_state_space_and_speech_models_generate_on_the_torch_backend(name):
    """The torch backend runs Mamba's one-step graph and Whisper's pair as ONNX Runtime does
    (tests/test_generation_coverage.py, tests/test_cli_generate.py): transformers' greedy tokens."""
    if name == "mamba":
        from coverage_models import GENERATORS

        model = next(g for g in GENERATORS if g.name == "mamba").build()
        prompt = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
        mask = (torch.arange(7) >= torch.tensor([[0], [3], [1]])).long()
        prompt = prompt.masked_fill(mask == 0, 0)
        compiled = compile_quietly(model, {"input_ids": prompt[:1, :5]}, backend="torch")
        ours = compiled.generate(prompt, mask, max_new_tokens=8, min_new_tokens=8)
        with torch.no_grad():
            theirs = model.generate(prompt, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert ours.tolist() == theirs.tolist()
    else:
        from test_cli_generate import _whisper

        model = _whisper()
        features = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(3))
        compiled = compile_quietly(model, {"input_features": features[:1]}, backend="torch")
        ours = compiled.generate(features, max_new_tokens=8, min_new_tokens=8)
        with torch.no_grad():
            theirs = model.generate(input_features=features, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert ours[:, 3:].tolist() == theirs[:, :8].tolist()
