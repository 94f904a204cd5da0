"""GPTQ for weight-only int4/int8 (``quantize:mode=weight_only,method=gptq``): on a small trained
model whose inputs have planted outlier channels, its output error is lower than round-to-nearest's."""

from __future__ import annotations

import pytest
import torch
from conftest import compile_quietly
from torch import nn

from torchkiln.compiler.quant_ops import pack_blocks, pack_integers, unpack_blocks
from torchkiln.errors import ConfigError, PassError
from torchkiln.passes.quantize import gptq

sklearn = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def trained():
    """An MLP trained on sklearn's digits whose 64 inputs include 6 outlier channels (x40): the
    activation outliers that make round-to-nearest's weight error cost the most output error."""
    digits = sklearn.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    x[:, ::11] *= 40.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        optimizer.step()
    model.eval()
    accuracy = (model(x[1400:]).argmax(1) == y[1400:]).float().mean().item()
    assert accuracy > 0.9, accuracy  # trained, not random weights
    return model, x[:1400], x[1400:]


def _error(model, compiled, held_out) -> float:
    with torch.no_grad():
        reference = model(held_out)
        return float(((compiled(held_out) - reference) ** 2).mean() / (reference**2).mean())


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_output_error_is_lower_than_round_to_nearest(trained, bits):
    model, train, held_out = trained
    calibration = [(batch,) for batch in train.split(200)]
    passes = f"quantize:mode=weight_only,bits={bits},block_size=32"
    rtn = compile_quietly(model, held_out[:8], passes=passes, backend="torch", dynamic_axes="batch", verify=False)
    ours = compile_quietly(model, held_out[:8], passes=passes + ",method=gptq", backend="torch", dynamic_axes="batch",
                           calibration_data=calibration, verify=False)  # fmt: skip
    rtn_error, gptq_error = _error(model, rtn, held_out), _error(model, ours, held_out)
    assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)
    notes = " ".join(ours.report.passes[-1].notes)
    assert "GPTQ (damp 0.01) on 3 of 3 layer(s)" in notes


def test_gptq_needs_calibration_data_and_weight_only(trained):
    model, _, held_out = trained
    with pytest.raises(PassError, match="method=gptq needs calibration data") as caught:
        compile_quietly(model, held_out[:8], passes="quantize:mode=weight_only,method=gptq", backend="torch")
    assert "method=rtn" in (caught.value.hint or "")
    with pytest.raises(ConfigError, match="method"):
        compile_quietly(model, held_out[:8], passes="quantize:mode=dynamic,method=gptq", backend="torch")
    with pytest.raises(ConfigError, match="damp"):
        compile_quietly(model, held_out[:8], passes="quantize:mode=weight_only,method=gptq,damp=0", backend="torch")


def test_packed_integers_round_trip_and_round_to_nearest_is_unchanged():
    torch.manual_seed(1)
    weight = torch.randn(6, 80)
    packed, scales = pack_blocks(weight, 4, 32)
    restored = unpack_blocks(packed, scales, 4, 32, 80)
    q = torch.round(restored.view(6, 80) / scales.view(6, 3).repeat_interleave(32, 1)[:, :80]).to(torch.int16)
    again = pack_integers(q, scales.view(6, 3), 4, 32)
    assert torch.equal(again[0], packed) and torch.equal(again[1], scales)
    with pytest.raises(ValueError, match="outside 4 bits"):
        pack_integers(torch.full((6, 80), 9, dtype=torch.int16), scales.view(6, 3), 4, 32)


def test_an_identity_hessian_is_round_to_nearest():
    """With uncorrelated unit inputs no column's error can be compensated by another's: GPTQ then
    chooses round-to-nearest's integers (damping only scales the diagonal)."""
    torch.manual_seed(2)
    weight = torch.randn(5, 64)
    packed, scales = gptq.quantize(weight, torch.eye(64, dtype=torch.float64), 4, 32, 0.01)
    expected = pack_blocks(weight, 4, 32)
    assert torch.equal(packed, expected[0]) and torch.allclose(scales, expected[1])


def test_too_few_calibration_rows_keep_round_to_nearest_and_say_so(trained):
    """8 rows for 64 / 128 inputs: a singular Hessian GPTQ would overfit (the zoo MLP calibrated on
    3 rows read cosine 0.979 against round-to-nearest's 0.997); those layers stay round to nearest, named."""
    model, train, held_out = trained
    passes = "quantize:mode=weight_only,bits=4,block_size=32"
    rtn = compile_quietly(model, held_out[:8], passes=passes, backend="torch", dynamic_axes="batch", verify=False)
    few = compile_quietly(model, held_out[:8], passes=passes + ",method=gptq", backend="torch", dynamic_axes="batch",
                          calibration_data=[(train[:8],)], verify=False)  # fmt: skip
    notes = " ".join(few.report.passes[-1].notes)
    assert "GPTQ (damp 0.01) on 0 of 3 layer(s)" in notes and "(8 < 64)" in notes and "(8 < 128)" in notes
    assert _error(model, few, held_out) == _error(model, rtn, held_out)
