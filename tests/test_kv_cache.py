"""The int8 KV cache (``kv_cache="int8"`` / ``"int8-calibrated"``): int8 cache tensors with per-head
scales cross the graph's boundary, generation matches transformers' own loop over the same int8
cache, its distance from the float cache is measured and promised, and every surface (API, CLI,
recipe) refuses what it cannot do by name."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compile_quietly, tiny_llama

import torchkiln
from torchkiln.cli import main
from torchkiln.compiler import causal_lm, kv_cache
from torchkiln.driver.generate import empty_past, step_inputs
from torchkiln.errors import ConfigError, VerificationError
from torchkiln.workflows.recipe import KV_CACHES, load_recipe

pytestmark = pytest.mark.xdist_group("kv_cache")

HEADS, DIM, LAYERS = 2, 8, 2  # tiny_llama: 2 KV heads of 8, 2 layers


def _example(length: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _prompts(count: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(3, 128, (1, 12), generator=generator)} for _ in range(count)]


def _empty_int8_cache(batch: int, fixed=None):
    def empty(*shape, dtype=torch.float32):
        return torch.zeros(batch, HEADS, 0, *shape, dtype=dtype)

    stored = [
        (empty(DIM, dtype=torch.int8), None if fixed else empty(1), empty(DIM, dtype=torch.int8), None if fixed else empty(1))
        for _ in range(LAYERS)
    ]
    return kv_cache.cache(stored, fixed)


def test_quantize_per_step_and_per_head_round_trip_within_half_a_step():
    x = torch.randn(2, 3, 5, 16) * torch.tensor([1.0, 10.0, 0.01]).view(1, 3, 1, 1)
    codes, scale = kv_cache.quantize(x, None)
    assert codes.dtype == torch.int8 and scale.shape == (2, 3, 5, 1)
    assert int(codes.abs().amax(-1).min()) == kv_cache.QMAX  # each position's largest value uses the full range
    assert bool(((kv_cache.dequantize(codes, scale) - x).abs() <= scale / 2 + 1e-7).all())
    fixed = x.abs().amax(dim=(0, 2, 3)) / 2 / kv_cache.QMAX  # half the range: the larger half clamps
    codes, scale = kv_cache.quantize(x, fixed)
    assert scale.shape == (1, 3, 1, 1) and int(codes.abs().max()) == kv_cache.QMAX
    inside = x.abs() <= fixed.view(1, 3, 1, 1) * kv_cache.QMAX
    error = (kv_cache.dequantize(codes, scale) - x).abs()
    assert bool((error[inside] <= scale.expand_as(x)[inside] / 2 + 1e-7).all())
    assert bool((error[~inside] > 0).all())  # clamped, not wrapped


def test_int8_cache_generates_as_transformers_does_over_the_same_cache():
    """The artifact's loop (one prompt, batch 2, a left-padded row) against transformers' generate
    over an int8 cache of the same layers: equal tokens. The cache crosses the artifact as int8."""
    lm = tiny_llama()
    compiled = compile_quietly(lm, _example(), kv_cache="int8")
    specs = {s.name: s for s in compiled.inputs}
    assert specs["past_key_0"].dtype == "int8" and specs["past_key_scale_0"].dtype == "float32"
    assert specs["past_key_scale_0"].shape[1::2] == (HEADS, 1)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for batch, attention in ((ids[:1], mask[:1]), (ids, mask)):
        expected = lm.generate(batch, attention_mask=attention, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                               **{causal_lm.cache_keyword(lm): _empty_int8_cache(len(batch))})  # fmt: skip
        assert torch.equal(compiled.generate(batch, attention, max_new_tokens=6, min_new_tokens=6), expected)
    step = compiled(**step_inputs(compiled, ids[:1], mask[:1], empty_past(compiled, 1)))
    assert step["present_key_0"].dtype == torch.int8 and step["present_key_0"].shape == (1, HEADS, 7, DIM)
    record = compiled.report.kv_cache
    assert record["mode"] == "int8" and record["bytes_per_position"] == LAYERS * 2 * HEADS * (DIM + 4)
    assert record["float_bytes_per_position"] == LAYERS * 2 * HEADS * DIM * 4
    assert kv_cache.PROMISE <= record["min_cosine"] < 1.0 and record["max_abs_error"] > 0  # measured, not assumed
    assert "kv cache: int8" in compiled.report.table()


def test_calibrated_scales_are_constants_set_on_the_prompts_not_held_back(tmp_path):
    lm = tiny_llama()
    prompts = _prompts()
    compiled = compile_quietly(lm, _example(), kv_cache="int8-calibrated", calibration_data=prompts)
    names = [s.name for s in compiled.inputs]
    assert "past_key_0" in names and not any("_scale_" in n for n in names)
    assert {s.dtype for s in compiled.inputs if s.name.startswith("past_")} == {"int8"}
    record = compiled.report.kv_cache
    assert record["bytes_per_position"] * 4 == record["float_bytes_per_position"]
    assert "1 calibration prompt held back" in record["checked_on"]
    # the scales: the per-head peaks of the float caches of the 7 prompts calibrated on (the 8th is held back)
    wrapped, example, _ = causal_lm.with_cache(lm, _example(), "float")
    steps = causal_lm.calibration_steps(wrapped, example, prompts[:7])
    expected = kv_cache.calibrated_scales(steps, LAYERS)
    wrapped8, _, _ = causal_lm.with_cache(lm, _example(), "int8-calibrated", prompts)
    assert torch.allclose(wrapped8.key_scale_1, expected[1][0]) and torch.allclose(wrapped8.value_scale_0, expected[0][1])
    expected_tokens = lm.generate(prompts[7]["input_ids"], max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                  **{causal_lm.cache_keyword(lm): _empty_int8_cache(1, expected)})  # fmt: skip
    compiled.save(tmp_path / "lm")
    loaded = torchkiln.load(tmp_path / "lm")
    assert torch.equal(loaded.generate(prompts[7]["input_ids"], max_new_tokens=5, min_new_tokens=5), expected_tokens)


def test_the_prompt_step_is_checked_and_inductor_generates_as_the_others_do():
    """Every pass and backend of a cached LM is also checked on a generation's first step (a past of 0
    positions), which the traced example (past 2) and its widened check never run: Inductor wrote
    wrong int8 codes concatenating onto an empty int8 past there (logits right, the cache wrong), so
    its generations went astray from the second new token on."""
    lm = tiny_llama()
    wrapped, example, _ = causal_lm.with_cache(lm, _example(), "int8")
    step = causal_lm.prompt_step(wrapped, example)
    assert step["past_key_0"].shape == (1, HEADS, 0, DIM) and step["past_key_0"].dtype == torch.int8
    assert step["past_key_scale_0"].shape == (1, HEADS, 0, 1) and step["attention_mask"].shape == (1, 4)
    assert causal_lm.prompt_step(torch.nn.Linear(2, 2), {"x": torch.zeros(1)}) is None
    ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    expected = lm.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                           **{causal_lm.cache_keyword(lm): _empty_int8_cache(1)})  # fmt: skip
    compiled = compile_quietly(lm, _example(), kv_cache="int8", backend="inductor")
    assert torch.equal(compiled.generate(ids, max_new_tokens=5, min_new_tokens=5), expected)


def test_the_promise_is_checked_and_a_miss_fails_by_name(monkeypatch):
    lm = tiny_llama()
    monkeypatch.setattr(kv_cache, "PROMISE", 1.0)  # no int8 cache is exact: the check must fire
    with pytest.raises(VerificationError, match="kv_cache=int8 moves the logits") as caught:
        compile_quietly(lm, _example(), kv_cache="int8", backend="torch")
    assert "kv_cache" in str(caught.value)
    record = compile_quietly(lm, _example(), kv_cache="int8", backend="torch", verify=False).report.kv_cache
    assert record["min_cosine"] < 1.0  # reported as measured


def test_kv_deviation_measures_a_real_difference():
    lm = tiny_llama()
    wrapped, example, _ = causal_lm.with_cache(lm, _example(), "int8")
    measured = causal_lm.kv_deviation(wrapped, example, _prompts(2))
    assert measured["prompts"] == 2 and measured["steps"] == 2 * (causal_lm.DECODE_STEPS + 1)
    assert 0.999 < measured["min_cosine"] < 1.0 and measured["max_abs_error"] > 0
    flat, flat_example, _ = causal_lm.with_cache(lm, _example(), "float")
    with pytest.raises(AssertionError):
        causal_lm.kv_deviation(torch.nn.Identity(), flat_example, _prompts(1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kv_cache": "int4"}, "unknown kv_cache 'int4'"),
        ({"kv_cache": "int8-calibrated"}, "needs|none were given"),
    ],
)
def test_bad_kv_cache_settings_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match) as caught:
        compile_quietly(tiny_llama(), _example(), **kwargs)
    assert caught.value.where in ("kv_cache", "calibration_data")


def test_kv_cache_on_a_model_without_one_is_refused():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="applies to a causal LM") as caught:
        compile_quietly(model, torch.randn(1, 4), kv_cache="int8")
    assert caught.value.where == "kv_cache"
    with pytest.raises(ConfigError, match="applies to a causal LM"):  # the cache switched off by the inputs
        compile_quietly(tiny_llama(), {**_example(), "use_cache": False}, kv_cache="int8")
    from coverage_models import GENERATORS
    from test_seq2seq import _t5

    mamba = next(g for g in GENERATORS if g.name == "mamba").build()  # states, not a KV cache
    for model in (mamba, _t5().eval()):  # and an encoder-decoder's pair
        with pytest.raises(ConfigError, match="applies to a causal LM"):
            compile_quietly(model, {"input_ids": torch.tensor([[5, 6, 7]])}, kv_cache="int8")


def test_recipe_kv_cache_is_validated(tmp_path):
    assert KV_CACHES == kv_cache.MODES
    path = tmp_path / "kiln.toml"
    path.write_text('[model]\nsource = "mlp"\nkv_cache = "fp8"\n')
    with pytest.raises(ConfigError, match="kv_cache.*must be one of float, int8, int8-calibrated"):
        load_recipe(path)
    path.write_text('[model]\nsource = "mlp"\nkv_cache = "int8"\n\n[partition]\nstages = 2\n')
    with pytest.raises(ConfigError, match="not supported with \\[partition\\]"):
        load_recipe(path)
    path.write_text('[model]\nsource = "mlp"\nkv_cache = "int8"\n')
    assert load_recipe(path).kv_cache == "int8"


@pytest.mark.slow  # ~12 s; CI builds README's LM recipe (kv_cache int8) and generates from it with kiln generate
def test_cli_export_with_an_int8_cache_then_generate(tmp_path, capsys):
    lm = tiny_llama()
    lm.save_pretrained(tmp_path / "hf")
    out = tmp_path / "artifact"
    assert main(["export", str(tmp_path / "hf"), "--kv-cache", "int8", "--json", "-o", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kv_cache"]["mode"] == "int8" and report["kv_cache"]["min_cosine"] >= kv_cache.PROMISE
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"past_value_1": "int8", "past_value_scale_1": "float32"}.items() <= {
        i["name"]: i["dtype"] for i in manifest["inputs"]
    }.items()
    with pytest.raises(SystemExit):  # argparse: an invalid choice, before any work
        main(["export", str(tmp_path / "hf"), "--kv-cache", "int3", "-o", str(tmp_path / "x")])
    assert "--kv-cache" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["generate", str(out), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--min-new-tokens", "4"]) == 0
    expected = lm.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           **{causal_lm.cache_keyword(lm): _empty_int8_cache(1)})  # fmt: skip
    printed = capsys.readouterr().out
    assert " ".join(str(t) for t in expected[0, 3:].tolist()) in printed or all(str(t) in printed for t in expected[0, 3:].tolist())


@pytest.mark.parametrize("kwargs", [{"kv_cache": "int8-calibrated"},
                                    {"passes": "quantize:mode=weight_only,bits=4,method=gptq"}])  # fmt: skip
def test_calibration_prompts_outside_the_vocabulary_are_named_not_a_raw_index_error(kwargs):
    from torchkiln.errors import InputError

    prompt = torch.randint(3, 128, (1, 6))
    prompts = [torch.randint(3, 128, (1, 6)) for _ in range(3)] + [torch.tensor([[5, 300, 7, 8, 9, 10]])]
    with pytest.raises(InputError, match=r"calibration batch 3: input_ids has values in \[5, 300\], outside the "
                                         r"model's vocabulary \[0, 128\)"):  # fmt: skip
        compile_quietly(tiny_llama(), {"input_ids": prompt}, backend="torch", calibration_data=prompts, **kwargs)
