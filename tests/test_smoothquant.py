"""SmoothQuant before static int8 (``quantize:smoothquant=0.5|auto``): on a small trained model whose
norms carry planted outlier channels (the function unchanged: the next Linear's columns divided by
as much), static int8's output error falls well below plain static int8's; the scales fold into the
norms, so the ONNX Runtime artifact keeps its integer kernels; and a cached LM calibrated on prompts
keeps its promise on the held-back prompt and generates."""

from __future__ import annotations

import pytest
import torch
from conftest import compile_quietly, fit_digits
from torch import nn

from torchkiln.errors import ConfigError

sklearn = pytest.importorskip("sklearn.datasets")


# one worker trains the module's model once (spread over two, each trained it: ~40 s more in CI)
pytestmark = pytest.mark.xdist_group("smoothquant")


@pytest.fixture(scope="module")
def trained():
    digits = sklearn.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 128), nn.GELU(),
                          nn.LayerNorm(128), nn.Linear(128, 10))  # fmt: skip
    fit_digits(model, x, y, 200)
    with torch.no_grad():  # outlier channels after each norm, the same function
        for norm, following in ((model[2], model[3]), (model[5], model[6])):
            norm.weight[::16] *= 30.0
            norm.bias[::16] *= 30.0
            following.weight[:, ::16] /= 30.0
    accuracy = (model(x[1400:]).argmax(1) == y[1400:]).float().mean().item()
    assert accuracy > 0.9, accuracy
    return model, x[:1400], x[1400:]


def _error(model, compiled, held_out) -> float:
    with torch.no_grad():
        reference = model(held_out)
        return float(((compiled(held_out) - reference) ** 2).mean() / (reference**2).mean())


@pytest.mark.parametrize("alpha", ["0.5", pytest.param("auto", marks=pytest.mark.slow)])
def test_smoothquant_static_int8_error_is_far_below_plain_static_int8(trained, alpha):
    model, train, held_out = trained
    calibration = [(batch,) for batch in train.split(200)]
    common = dict(backend="torch", dynamic_axes="batch", calibration_data=calibration, verify=False)
    plain = compile_quietly(model, held_out[:8], passes="cleanup,quantize", **common)
    smooth = compile_quietly(model, held_out[:8], passes=f"cleanup,quantize:smoothquant={alpha}", **common)
    plain_error, error = _error(model, plain, held_out), _error(model, smooth, held_out)
    assert error < 0.5 * plain_error, (error, plain_error)
    notes = smooth.report.passes[-1].notes
    assert any(n.startswith("SmoothQuant (") and "2 of 3 input group(s) smoothed" in n for n in notes), notes
    assert "SmoothQuant: not smoothed: 0 (no op before it can absorb 1/s)" in notes  # the model's input


def test_smoothquant_keeps_onnxruntime_integer_kernels(trained):
    onnx = pytest.importorskip("onnx")
    model, train, held_out = trained
    calibration = [(batch,) for batch in train.split(200)]
    compiled = compile_quietly(model, held_out[:8], passes="cleanup,quantize:smoothquant=0.5", backend="onnxruntime",
                               dynamic_axes="batch", calibration_data=calibration)  # fmt: skip
    ops = {node.op_type for node in onnx.load(str(compiled.artifact.model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Mul" not in ops


def test_smoothquant_options_are_checked(trained):
    model, _, held_out = trained
    for passes in ("quantize:smoothquant=1.5", "quantize:smoothquant=sometimes", "quantize:mode=dynamic,smoothquant=0.5"):
        with pytest.raises(ConfigError, match="smoothquant"):
            compile_quietly(model, held_out[:8], passes=passes, backend="torch")


def test_a_one_shot_generator_is_refused_with_a_fix(trained):
    from torchkiln.errors import InputError

    model, train, held_out = trained
    with pytest.raises(InputError, match="reads the calibration data twice") as caught:
        compile_quietly(model, held_out[:8], passes="quantize:smoothquant=0.5", backend="torch",
                        calibration_data=((batch,) for batch in train.split(200)))  # fmt: skip
    assert "list" in (caught.value.hint or "")


@pytest.mark.parametrize("passes", [pytest.param("cleanup,quantize", marks=pytest.mark.slow),
                                    "cleanup,quantize:smoothquant=auto"])  # fmt: skip
def test_a_cached_lm_in_static_int8_keeps_its_promise_on_held_back_prompts_and_generates(passes):
    """Prompts (prefill + decode steps) calibrate the cached graph; the promise is checked on the
    example (its past the model's own cache for two tokens) and on the held-back prompt's steps."""
    pytest.importorskip("transformers", reason="transformers is a dev extra")
    from conftest import tiny_llama

    lm = tiny_llama()
    ids = torch.randint(3, 128, (1, 8))
    generator = torch.Generator().manual_seed(0)
    prompts = [{"input_ids": torch.randint(3, 128, (2, 16), generator=generator)} for _ in range(8)]
    compiled = compile_quietly(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, passes=passes,
                               backend="onnxruntime", calibration_data=prompts)  # fmt: skip
    record = compiled.report.passes[-1]
    assert record.held_back_batches == 5 and record.held_back_cosine >= 0.99 and record.cosine >= 0.99
    assert record.stats["quantized"] == 15
    out = compiled.generate(ids, max_new_tokens=6, min_new_tokens=6)
    assert out.shape == (1, 14) and torch.equal(out[:, :8], ids)
