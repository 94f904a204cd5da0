"""Encoder-decoder LMs compiled with their KV cache (torchkiln.compiler.seq2seq): an encoder that
gives the cross-attention cache and a decoder over its self- and cross-attention caches; greedy
decoding with them equals transformers' generate. Random-init toy configs (no hub access)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import compile_quietly

import torchkiln
from torchkiln.compiler.seq2seq import cross_names
from torchkiln.driver.compiled import CompiledEncoderDecoder
from torchkiln.errors import ArtifactError, ConfigError, InputError

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'torchkiln[hf]')")

VOCAB = 100


def _bart():  # init_std 0.3: a flat random model would emit one token forever
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, init_std=0.3,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


def _t5():
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, initializer_factor=3.0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def _compiled(build, backend="onnxruntime", **kwargs):
    torch.manual_seed(0)
    model = build().eval()
    example = torch.randint(3, VOCAB, (1, 6))
    return model, compile_quietly(model, {"input_ids": example, "attention_mask": torch.ones_like(example)}, backend=backend, **kwargs)


@pytest.fixture(scope="module")
def bart():
    return _compiled(_bart)


@pytest.mark.parametrize(
    ("build", "backend"),
    [
        pytest.param(_bart, "onnxruntime", id="bart-onnxruntime"),
        pytest.param(_bart, "torch", id="bart-torch", marks=pytest.mark.slow),
        pytest.param(_t5, "onnxruntime", id="t5-onnxruntime", marks=pytest.mark.slow),
    ],
)
def test_greedy_generate_equals_transformers(build, backend, request):
    """The decoder sequence (start token first) of transformers' generate(do_sample=False,
    num_beams=1) with the model's own settings (BART forces EOS last), for one prompt and a
    left-padded batch of two. (BART's encoder positions are absolute: a padded row is not its
    unpadded self, in transformers either.)"""
    model, compiled = request.getfixturevalue("bart") if (build, backend) == (_bart, "onnxruntime") else _compiled(build, backend)
    assert isinstance(compiled, CompiledEncoderDecoder)
    layers = model.config.decoder_layers if hasattr(model.config, "decoder_layers") else model.config.num_decoder_layers
    assert [s.name for s in compiled.encoder.inputs] == ["input_ids", "attention_mask"]
    assert [s.name for s in compiled.encoder.outputs] == [f"output_{i}" for i in range(2 * layers)]
    names = [s.name for s in compiled.decoder.inputs]
    assert names[:2] == ["decoder_input_ids", "encoder_attention_mask"] and names[-2 * layers :] == cross_names(layers)
    pad = model.config.pad_token_id
    prompt = torch.randint(3, VOCAB, (2, 7))
    prompt[1, :3] = pad
    mask = (torch.arange(7) >= torch.tensor([[0], [3]])).long()
    for ids, attention in ((prompt[:1], None), (prompt, mask)):
        ours = compiled.generate(ids, attention, max_new_tokens=8)
        with torch.no_grad():
            theirs = model.generate(
                ids, attention_mask=torch.ones_like(ids) if attention is None else attention, max_new_tokens=8,
                do_sample=False, num_beams=1,
            )  # fmt: skip
        assert ours.tolist() == theirs.tolist()
    assert len({tuple(row) for row in ours[:, 1:].tolist()}) == 2  # the rows differ: the test can fail


def test_save_load_keeps_both_parts_and_the_settings(bart, tmp_path, capsys):
    _, compiled = bart
    prompt = torch.randint(3, VOCAB, (2, 5))
    expected = compiled.generate(prompt, max_new_tokens=6)
    assert compiled.generation["decoder_start_token_id"] == 2 and compiled.generation["forced_eos_token_id"] == 2
    path = compiled.save(tmp_path / "bart")
    assert sorted(os.listdir(path)) == ["decoder", "encoder", "manifest.json"]
    loaded = torchkiln.load(path)
    assert isinstance(loaded, CompiledEncoderDecoder) and loaded.generation == compiled.generation
    assert loaded.generate(prompt, max_new_tokens=6).tolist() == expected.tolist()
    streamed = []
    loaded.generate(prompt, max_new_tokens=6, on_token=streamed.append)
    assert torch.stack(streamed, 1).tolist() == expected[:, 1:].tolist()
    compiled.save(path)  # an artifact of ours is replaced


def test_a_modified_or_linked_part_is_refused_on_load(bart, tmp_path):
    _, compiled = bart
    path = compiled.save(tmp_path / "bart")
    manifest = path / "decoder" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["model"] = "edited"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="decoder/manifest.json does not match its checksum"):
        torchkiln.load(path)
    other = compiled.save(tmp_path / "other")
    (path / "decoder").rename(tmp_path / "moved")
    (path / "decoder").symlink_to(other / "decoder")
    with pytest.raises(ArtifactError, match="the decoder part is missing or not a plain directory"):
        torchkiln.load(path)


def test_bad_settings_and_data_are_clear_errors(bart):
    model, compiled = bart
    with pytest.raises(InputError, match="a prompt of 65 tokens or 1 \\+ max_new_tokens=2 decoder tokens exceeds the model's 64"):
        compiled.generate(torch.randint(3, VOCAB, (1, 65)), max_new_tokens=2)
    with pytest.raises(InputError, match="max_new_tokens must be >= 1"):
        compiled.generate(torch.randint(3, VOCAB, (1, 5)), max_new_tokens=0)
    ids = torch.randint(3, VOCAB, (1, 6))
    with pytest.raises(ConfigError, match="calibration / training data for an encoder-decoder"):
        compile_quietly(model, {"input_ids": ids}, passes="cleanup,quantize", calibration_data=[{"input_ids": ids}])
    with pytest.raises(InputError, match="takes input_ids .batch, source. .and attention_mask., or input_features .batch, mels, frames. for a speech model; got .'input_ids', 'token_type_ids'"):
        compile_quietly(model, {"input_ids": ids, "token_type_ids": ids})


@pytest.mark.slow
def test_dynamic_int8_quantizes_both_parts():
    model, compiled = _compiled(_bart, passes="cleanup,quantize:mode=dynamic")
    (encoder,) = [p for p in compiled.encoder.report.passes if p.name == "quantize"]
    (decoder,) = [p for p in compiled.decoder.report.passes if p.name == "quantize"]
    # encoder: 2 layers x (q, k, v, out, fc1, fc2) + the decoder's 2 cross-attention k/v projections;
    # decoder: 2 layers x (self q, k, v, out; cross q, out; fc1, fc2) + lm_head (cross k/v come from the cache)
    assert encoder.stats["quantized"] == 16 and decoder.stats["quantized"] == 17, (encoder.stats, decoder.stats)
    prompt = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, num_beams=1)
    assert compiled.generate(prompt, max_new_tokens=4).shape == theirs.shape
