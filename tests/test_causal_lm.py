"""Decoder LMs compiled with their KV cache (torchkiln.compiler.causal_lm): one artifact serves the
prompt (an empty past) and every next token; greedy decoding with it equals transformers' generate.

Random-init toy configs (no hub access): GPT-2 (learned positions) and Llama with grouped-query
attention (2 KV heads for 4 query heads) and rotary positions."""

from __future__ import annotations

import pytest
import torch
from conftest import compile_quietly

from torchkiln.compiler.causal_lm import past_names
from torchkiln.errors import InputError

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'torchkiln[hf]')")

VOCAB = 100


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _greedy(compiled, ids: torch.Tensor, new_tokens: int, layers: int, kv_shape: dict[str, tuple[int, int]]):
    """Prefill with an empty past, then one token at a time with the returned present."""
    past = {n: torch.zeros(ids.shape[0], *kv_shape[n][:1], 0, kv_shape[n][1]) for n in past_names(layers)}
    mask, step, tokens = torch.ones_like(ids), ids, []
    for _ in range(new_tokens):
        out = compiled(input_ids=step, attention_mask=mask, **past)
        step = out["logits"][:, -1].argmax(-1, keepdim=True)
        tokens.append(step)
        past = {n: out[n.replace("past_", "present_")] for n in past}
        mask = torch.cat([mask, torch.ones_like(step)], 1)
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama-gqa"])
def test_greedy_decoding_with_the_cache_equals_transformers(build, backend):
    torch.manual_seed(0)
    lm = build().eval()
    example = torch.randint(3, VOCAB, (1, 4))
    compiled = compile_quietly(lm, {"input_ids": example, "attention_mask": torch.ones_like(example)}, backend=backend)
    names = [spec.name for spec in compiled.inputs]
    layers = lm.config.num_hidden_layers
    assert names == ["input_ids", "attention_mask", *past_names(layers)]
    kv_shape = {spec.name: (spec.shape[1], spec.shape[3]) for spec in compiled.inputs[2:]}
    if build is _llama:  # grouped-query attention: the cache holds the 2 KV heads, not the 4 query heads
        assert set(kv_shape.values()) == {(2, 8)}
    prompt = torch.randint(3, VOCAB, (1, 6))  # another length than the example's
    ours = _greedy(compiled, prompt, 8, layers, kv_shape)
    with torch.no_grad():
        theirs = lm.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8, do_sample=False,
            num_beams=1,
        )[:, prompt.shape[1]:]  # fmt: skip
    assert ours.tolist() == theirs.tolist()


def test_use_cache_false_still_compiles_without_the_cache():
    torch.manual_seed(0)
    lm = _gpt2().eval()
    ids = torch.randint(3, VOCAB, (1, 5))
    compiled = compile_quietly(lm, {"input_ids": ids, "use_cache": False}, backend="torch")
    assert [spec.name for spec in compiled.inputs] == ["input_ids"]


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
        lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, passes="cleanup,quantize:mode=dynamic"
    )
    (record,) = [p for p in compiled.report.passes if p.name == "quantize"]
    # 4 projections per block (c_attn, c_proj, mlp.c_fc, mlp.c_proj) + lm_head; wte/wpe lookups stay float
    assert record.stats == {"quantized": 9, "float": 2, "unrecognised": 0}, record.notes
    assert compiled.report.artifact.cosine is not None and compiled.report.artifact.cosine > 0.99
