"""``kiln export --task text-generation`` of a Hugging Face model directory and ``kiln generate``
with a local tokenizer directory (a byte-level BPE trained here, offline) or prompt ids."""

from __future__ import annotations

import json
import re

import pytest
import torch

import torchkiln
from torchkiln.cli import main

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'torchkiln[hf]')"
)
stdlib_lm = pytest.importorskip("torchkiln.models.stdlib_lm")

VOCAB = 300  # the byte alphabet (256), 3 special tokens and a few merges


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    tokenizer = stdlib_lm.train_tokenizer(stdlib_lm.corpus()[:20000], root / "tokenizer", vocab_size=VOCAB)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    lm = transformers.GPT2LMHeadModel(config).eval()
    lm.save_pretrained(root / "model")
    assert main(["export", str(root / "model"), "-o", str(root / "artifact"), "--quiet"]) == 0
    return lm, tokenizer, root


def test_export_infers_the_task_and_generate_prints_tokens_and_speed(exported, capsys):
    lm, tokenizer, root = exported
    assert (
        main(
            [
                "generate",
                str(root / "artifact"),
                "--prompt-ids",
                "5,6,7",
                "--max-new-tokens",
                "6",
                "--min-new-tokens",
                "6",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    with torch.no_grad():
        prompt = torch.tensor([[5, 6, 7]])
        theirs = lm.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6
        )
    echoed, _, new = out.partition(" | ")  # the prompt's ids first, then each new token
    assert echoed.split() == ["5", "6", "7"] and [int(t) for t in new.split()] == theirs[0, 3:].tolist()
    assert "kiln: 6 tokens in " in err and "tokens/s, prompt 3 tokens)" in err

    assert main(["generate", str(root / "artifact"), "--prompt", "def main(", "--tokenizer", str(root / "tokenizer"),
                 "--max-new-tokens", "5", "--min-new-tokens", "5"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    ids = tokenizer("def main(")["input_ids"]
    with torch.no_grad():
        prompt = torch.tensor([ids])
        theirs = lm.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5
        )
    assert out.rstrip("\n") == tokenizer.decode(
        theirs[0].tolist()
    )  # the prompt, then the new text as it came
    assert "kiln: 5 tokens in " in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "x", "--tokenizer", "{root}/model"], "model is not a tokenizer directory"),
        (["--prompt", "x"], "--prompt needs --tokenizer DIR"),
        (["--prompt-ids", "1,2", "--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
        (["--prompt-ids", "1,2,300"], r"\[300\] outside the vocabulary \[0, 300\)"),
        (["--prompt-ids", "1,x"], "bad --prompt-ids '1,x'"),
        (
            ["--prompt-ids", ",".join(["5"] * 60), "--max-new-tokens", "8"],
            "a prompt of 60 tokens plus max_new_tokens=8 exceeds the model's 64 positions",
        ),
    ],
)
def test_bad_generate_arguments_are_one_line_errors(exported, capsys, argv, message):
    _, _, root = exported
    code = main(["generate", str(root / "artifact"), *(a.format(root=root) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(exported, capsys, tmp_path):
    _, _, root = exported
    stdlib_lm.train_tokenizer(stdlib_lm.corpus()[:20000], tmp_path / "big", vocab_size=400)
    assert (
        main(["generate", str(root / "artifact"), "--prompt", "x", "--tokenizer", str(tmp_path / "big")]) == 2
    )
    assert "has 400 tokens, the model only 300" in capsys.readouterr().err


def test_an_artifact_without_the_cache_cannot_generate_and_task_needs_a_causal_lm(capsys, tmp_path):
    assert main(["export", "mlp", "-o", str(tmp_path / "mlp"), "--quiet"]) == 0
    assert main(["generate", str(tmp_path / "mlp"), "--prompt-ids", "1,2"]) == 2
    assert "compiled without the KV cache: it cannot generate" in capsys.readouterr().err
    assert main(["export", "mlp", "--task", "text-generation", "-o", str(tmp_path / "x"), "--quiet"]) == 2
    assert "MLP is not a causal LM with a KV cache" in capsys.readouterr().err


def test_an_encoder_decoder_directory_exports_as_two_parts_and_generates(capsys, tmp_path):
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, init_std=0.3,
    )  # fmt: skip
    model = transformers.BartForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "bart")
    assert main(["export", str(tmp_path / "bart"), "-o", str(tmp_path / "artifact"), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert reports["encoder"]["model"] == "BartForConditionalGenerationEncoder"
    assert reports["decoder"]["model"] == "BartForConditionalGenerationDecoderWithCache"
    argv = ["generate", str(tmp_path / "artifact"), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "5", "--min-new-tokens", "5"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    with torch.no_grad():
        prompt = torch.tensor([[5, 6, 7, 8]])
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                                do_sample=False)  # fmt: skip
    echoed, _, new = out.partition(" | ")
    assert echoed == "5 6 7 8" and [int(t) for t in new.split()] == theirs[0, 1:].tolist()
    # the steps the loop made: the output (the decoder's sequence, 1 + 5) less the prompt (4) printed 2
    match = re.search(r"kiln: (-?\d+) tokens in [\d.]+ s \((-?[\d.]+) tokens/s", err)
    assert match is not None and int(match.group(1)) == 5 and float(match.group(2)) > 0, err


def _whisper(**extra):
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=20,
        max_target_positions=64, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        suppress_tokens=None, begin_suppress_tokens=None, init_std=1.0, **extra,
    )  # fmt: skip
    model = transformers.WhisperForConditionalGeneration(config).eval()
    # as an English-only checkpoint's generation_config.json has (its own file, not derived from the config)
    # forced_decoder_ids as the original checkpoints carry them (a task-like token at position 1)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=1, bos_token_id=1, eos_token_id=2, pad_token_id=0, no_timestamps_token_id=3,
        forced_decoder_ids=[[1, 4]],
    )
    return model


def test_a_whisper_directory_exports_as_speech_recognition_and_generates_from_features(capsys, tmp_path):
    """`kiln export` infers automatic-speech-recognition (an encoder-decoder config with mel bins):
    the encoder takes input_features [batch, mels, frames] (batch dynamic), the decoder starts from
    [start, forced tokens, no-timestamps] as transformers' Whisper generate does, and greedy tokens
    equal its, for one clip and a batch of three (compiled from one). `kiln generate` refuses a text
    prompt."""
    model = _whisper()
    model.save_pretrained(tmp_path / "whisper")
    assert main(["export", str(tmp_path / "whisper"), "-o", str(tmp_path / "artifact"), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert reports["encoder"]["model"] == "WhisperForConditionalGenerationEncoder"
    import torchkiln

    compiled = torchkiln.load(tmp_path / "artifact")
    assert [spec.name for spec in compiled.encoder.inputs] == ["input_features"]
    assert [compiled.generation[f"decoder_prompt_{i}"] for i in range(3)] == [1, 4, 3]
    for batch in (1, 3):
        features = torch.randn(batch, 16, 40, generator=torch.Generator().manual_seed(batch))
        ours = compiled.generate(features, max_new_tokens=8, min_new_tokens=8)
        with torch.no_grad():
            theirs = model.generate(input_features=features, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert ours[:, :3].tolist() == [[1, 4, 3]] * batch
        assert ours[:, 3:].tolist() == theirs[:, :8].tolist()  # transformers returns the new tokens only
        assert len(set(ours[:, 3:].flatten().tolist())) > 2  # not one token repeated
    assert main(["generate", str(tmp_path / "artifact"), "--prompt-ids", "5,6"]) == 2
    assert "is a speech model" in capsys.readouterr().err
    with pytest.raises(torchkiln.errors.InputError, match="input_features must be a float tensor"):
        compiled.generate(torch.tensor([[5, 6]]), max_new_tokens=2)
    # a hand-edited manifest: a gap in the prompt, or a prompt token outside the vocabulary
    manifest = tmp_path / "artifact" / "manifest.json"
    original = json.loads(manifest.read_text())
    features = torch.randn(1, 16, 40)
    for edit, error, message in (
        ({"decoder_prompt_5": 4}, torchkiln.errors.ArtifactError, "malformed decoder prompt"),
        ({"decoder_prompt_1": 1000}, torchkiln.errors.InputError, "decoder_prompt_1 must be .0, 100. .the vocabulary., got 1000"),
    ):
        manifest.write_text(json.dumps(original | {"generation": original["generation"] | edit}))
        with pytest.raises(error, match=message):
            torchkiln.load(tmp_path / "artifact").generate(features, max_new_tokens=2)


def test_a_whisper_that_picks_language_tokens_at_generate_time_is_refused():
    """A multilingual Whisper's generate detects or takes a language and a task and puts their
    tokens in the decoder prompt: not supported yet, and said so at compile time."""
    import torchkiln

    model = _whisper()
    model.generation_config.lang_to_id = {"<|en|>": 4}
    with pytest.raises(torchkiln.errors.InputError, match="chooses language / task tokens at generate time"):
        torchkiln.compile(model, {"input_features": torch.randn(1, 16, 40)})


def test_a_task_the_directory_cannot_serve_is_a_one_line_error(exported, capsys, tmp_path):
    _, _, root = exported
    assert main(["export", str(root / "model"), "--task", "text2text-generation", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "for text2text-generation" in err and len(err.strip().splitlines()) == 1


def _copy(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


BROKEN_DIRECTORIES = {
    # each ended in `internal error` (exit 3) or a raw exception before
    "config-not-json": lambda d: (d / "config.json").write_text("{ not json"),
    "config-a-list": lambda d: (d / "config.json").write_text("[1, 2]"),
    "weights-truncated": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
    "weights-garbage": lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
    "weights-pickled": lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"\x80\x04")),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN_DIRECTORIES))
def test_a_broken_save_pretrained_directory_is_a_one_line_error(exported, capsys, tmp_path, case):
    _, _, root = exported
    directory = _copy(root / "model", tmp_path / "model")
    BROKEN_DIRECTORIES[case](directory)
    code = main(["export", str(directory), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if case == "weights-pickled":
        assert "pickles" in err and "safe_serialization=True" in err


@pytest.mark.parametrize("content", ['{"model": {"type": "BPE", "vocab": 5}}', "not json at all", "{}"])
def test_a_malformed_tokenizer_is_a_one_line_error(exported, capsys, tmp_path, content):
    _, _, root = exported
    directory = _copy(root / "tokenizer", tmp_path / "tokenizer")
    (directory / "tokenizer.json").write_text(content)
    code = main(["generate", str(root / "artifact"), "--tokenizer", str(directory), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "the tokenizer in" in err, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--temperature", "nan", "--do-sample"], "temperature must be > 0, got nan"),
     (["--top-p", "inf", "--do-sample"], "top_p must be in"),
     (["--seed", str(2**64), "--do-sample"], "seed must be"),
     (["--min-new-tokens", "9", "--max-new-tokens", "2"], "min_new_tokens must be")],
)  # fmt: skip
def test_generation_settings_are_refused_before_any_token_is_printed(exported, capsys, flags, message):
    _, _, root = exported
    code = main(["generate", str(root / "artifact"), "--prompt-ids", "5,6,7", *flags])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err and captured.out == ""


def test_the_cli_makes_as_many_tokens_as_the_api_by_default(exported, capsys):
    from torchkiln.driver.generate import MAX_NEW_TOKENS

    _, _, root = exported
    assert main(["generate", str(root / "artifact"), "--prompt-ids", "5,6,7", "--min-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    out, err = capsys.readouterr()
    assert len(out.partition(" | ")[2].split()) == MAX_NEW_TOKENS == 20 and f"kiln: {MAX_NEW_TOKENS} tokens in " in err


def test_a_bf16_checkpoint_exports_in_float32_and_generates_like_its_model(tmp_path, capsys):
    """Llama 3 and Qwen 2.5 checkpoints store bf16: transformers 5 loaded them as bf16 and the cache
    wrapper's float32 past failed the first call ('query, key, and value to have the same dtype')."""
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config).eval().to(torch.bfloat16)
    lm.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["export", str(tmp_path / "model"), "-o", str(tmp_path / "artifact"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert {s["dtype"] for s in manifest["inputs"] if s["name"].startswith("past_")} == {"float32"}
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = lm.float().generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    got = torchkiln.load(tmp_path / "artifact").generate(ids, max_new_tokens=5, min_new_tokens=5)
    assert got.tolist() == expected.tolist()
