"""Calibrated weight-only quantization (``quantize:mode=weight_only,method=gptq|awq``): on a small
trained model whose inputs have planted outlier channels, each method's output error is lower than
round-to-nearest's on the same grid (int8 / int4 / int3, symmetric or with zero points); AWQ's
scales fold into the op before where one can absorb them; torchrun ranks agree with one process."""

from __future__ import annotations

import pytest
import torch
from conftest import compile_quietly, fit_digits
from torch import nn

from torchkiln.compiler.quant_ops import pack_blocks, pack_codes, unpack_blocks
from torchkiln.errors import ConfigError, InputError
from torchkiln.passes.quantize import gptq

sklearn = pytest.importorskip("sklearn.datasets")


# one worker trains the module's model once (spread over two, each trained it)
pytestmark = pytest.mark.xdist_group("weight_methods")


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
    return fit_digits(model, x, y, 300), x[:1400], x[1400:]


def _error(model, compiled, held_out) -> float:
    with torch.no_grad():
        reference = model(held_out)
        return float(((compiled(held_out) - reference) ** 2).mean() / (reference**2).mean())


#: (grid, method): measured held-out error ratio to round to nearest, Intel Xeon 2026-12-04, in the comment
SLOW = pytest.mark.slow  # CI keeps one case of each method and grid kind
CASES = [
    ("bits=4,block_size=32", "gptq"),  # 0.17
    pytest.param("bits=4,block_size=64", "gptq", marks=SLOW),  # 0.21
    pytest.param("bits=8,block_size=32", "gptq", marks=SLOW),  # 0.23
    ("bits=4,block_size=32", "gptq,act_order=true"),  # 0.09
    ("bits=3,block_size=32,symmetric=false", "gptq"),  # 0.26
    ("bits=4,block_size=32", "awq"),  # 0.03
    pytest.param("bits=4,block_size=32,symmetric=false", "awq", marks=SLOW),  # 0.05
    ("bits=3,block_size=32,symmetric=false", "awq"),  # 0.09
]


@pytest.mark.parametrize(("grid", "method"), CASES)
def test_calibrated_output_error_is_lower_than_round_to_nearest(trained, grid, method):
    model, train, held_out = trained
    calibration = [(batch,) for batch in train.split(200)]
    passes = f"quantize:mode=weight_only,{grid}"
    rtn = compile_quietly(model, held_out[:8], passes=passes, backend="torch", dynamic_axes="batch", verify=False)
    ours = compile_quietly(model, held_out[:8], passes=f"{passes},method={method}", backend="torch",
                           dynamic_axes="batch", calibration_data=calibration, verify=False)  # fmt: skip
    rtn_error, error = _error(model, rtn, held_out), _error(model, ours, held_out)
    assert error < 0.5 * rtn_error, (error, rtn_error)
    notes = " ".join(ours.report.passes[-1].notes)
    if method.startswith("gptq"):
        assert f"GPTQ (damp 0.01{', act order' if 'act_order' in method else ''}) on 3 of 3 layer(s)" in notes
    else:  # no op before fc1 (the model's input) or fc2/fc3 (a GELU) can absorb 1/s: a multiply each
        assert "AWQ (20 strengths) on 3 of 3 layer(s) in 3 input group(s): 3 scaled" in notes
        assert "1/s kept as a multiply before: 0, 2, 4" in notes
    if "symmetric=false" in grid:
        ops = {str(n.target) for n in ours.artifact.module.graph.nodes}
        assert "torchkiln.weight_only_linear_zp.default" in ops and "torchkiln.weight_only_linear.default" not in ops


def test_int3_with_zero_points_runs_the_same_on_onnxruntime(trained):
    """3-bit codes in MatMulNBits' 4-bit layout with its packed zero points: ONNX Runtime computes
    what the IR's kernel does."""
    model, train, held_out = trained
    calibration = [(batch,) for batch in train.split(200)]
    passes = "quantize:mode=weight_only,bits=3,block_size=32,symmetric=false,method=awq"
    ort = compile_quietly(model, held_out[:8], passes=passes, backend="onnxruntime", dynamic_axes="batch",
                          calibration_data=calibration, verify=False)  # fmt: skip
    ir = compile_quietly(model, held_out[:8], passes=passes, backend="torch", dynamic_axes="batch",
                         calibration_data=calibration, verify=False)  # fmt: skip
    torch.testing.assert_close(ort(held_out), ir(held_out), atol=1e-4, rtol=1e-4)


def test_gptq_needs_calibration_data_and_weight_only(trained):
    model, _, held_out = trained
    with pytest.raises(InputError, match="method=gptq needs calibration data") as caught:
        compile_quietly(model, held_out[:8], passes="quantize:mode=weight_only,method=gptq", backend="torch")
    assert "method=rtn" in (caught.value.hint or "")
    with pytest.raises(ConfigError, match="method"):
        compile_quietly(model, held_out[:8], passes="quantize:mode=dynamic,method=gptq", backend="torch")
    with pytest.raises(ConfigError, match="damp"):
        compile_quietly(model, held_out[:8], passes="quantize:mode=weight_only,method=gptq,damp=0", backend="torch")


def test_packed_codes_round_trip_and_round_to_nearest_is_unchanged():
    torch.manual_seed(1)
    weight = torch.randn(6, 80)
    packed, scales, _ = pack_blocks(weight, 4, 32)
    restored = unpack_blocks(packed, scales, 4, 32, 80)
    q = torch.round(restored.view(6, 80) / scales.view(6, 3).repeat_interleave(32, 1)[:, :80]).to(torch.int16)
    again = pack_codes(q + 8, scales.view(6, 3), 4, 32)
    assert torch.equal(again[0], packed) and torch.equal(again[1], scales) and again[2] is None
    with pytest.raises(ValueError, match="outside 4 bits"):
        pack_codes(torch.full((6, 80), 16, dtype=torch.int16), scales.view(6, 3), 4, 32)


def test_an_identity_hessian_is_round_to_nearest():
    """With uncorrelated unit inputs no column's error can be compensated by another's: GPTQ then
    chooses round-to-nearest's integers (damping only scales the diagonal)."""
    torch.manual_seed(2)
    weight = torch.randn(5, 64)
    for symmetric in (True, False):
        for act_order in (False, True):
            packed, scales, zeros = gptq.quantize(weight, torch.eye(64, dtype=torch.float64), 3, 32, 0.01,
                                                  symmetric, act_order)  # fmt: skip
            expected = pack_blocks(weight, 3, 32, symmetric)
            assert torch.equal(packed, expected[0]) and torch.allclose(scales, expected[1])
            assert (zeros is None and expected[2] is None) or torch.equal(zeros, expected[2])


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


class Folds(nn.Module):
    """A LayerNorm before two Linears that share its output, and a ReLU between two Linears: AWQ's
    1/s is absorbed by the norm's weight and by the first Linear's rows, no op is added."""

    def __init__(self):
        super().__init__()
        self.norm, self.a, self.b = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(32, 64)
        self.c, self.d = nn.Linear(64, 48), nn.Linear(48, 8)
        with torch.no_grad():
            self.norm.weight[::8] = 20.0  # outlier channels

    def forward(self, x):
        h = self.norm(x)
        h = self.a(h) + self.b(h)
        return self.d(torch.relu(self.c(torch.relu(h))))


@pytest.mark.parametrize("bits", [3, 8])
def test_awq_folds_its_scales_into_the_ops_before_and_keeps_the_function(bits):
    torch.manual_seed(0)
    model, x = Folds().eval(), torch.randn(256, 32)
    passes = f"cleanup,quantize:mode=weight_only,bits={bits},method=awq"
    compiled = compile_quietly(model, x[:4], passes=passes, backend="torch", dynamic_axes="batch",
                               calibration_data=[(x,)], verify=False)  # fmt: skip
    notes = compiled.report.passes[-1].notes
    assert "AWQ: 1/s folded into a norm's weight: a (+1)" in notes
    assert "AWQ: 1/s folded into the rows of the linear before, through a ReLU: d" in notes
    assert not any("multiply" in note for note in notes)
    graph = compiled.artifact.module.graph
    assert not any(n.op == "call_function" and "mul" in str(n.target) for n in graph.nodes)
    if bits == 8:  # the scaling itself changes nothing: int8's error stays an int8 error
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(compiled(x).flatten(), model(x).flatten(), 0)
        assert cosine > 0.9999


def test_method_options_are_checked_against_the_method(trained):
    model, _, held_out = trained
    for passes, key in (
        ("quantize:mode=weight_only,act_order=true", "act_order"),
        ("quantize:mode=weight_only,method=awq,damp=0.1", "damp"),
        ("quantize:mode=weight_only,method=gptq,awq_grid=10", "awq_grid"),
        ("quantize:mode=weight_only,calibration_batches=2", "calibration_batches"),
        ("quantize:mode=weight_only,method=awq,awq_grid=1", "awq_grid"),
        ("quantize:mode=dynamic,symmetric=false", "symmetric"),
        ("quantize:mode=weight_only,bits=2", "bits"),
    ):
        with pytest.raises(ConfigError, match=key):
            compile_quietly(model, held_out[:8], passes=passes, backend="torch")
    with pytest.raises(InputError, match="method=awq needs calibration data"):
        compile_quietly(model, held_out[:8], passes="quantize:mode=weight_only,method=awq", backend="torch")


@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=SLOW)])
def test_a_causal_lm_with_its_cache_calibrates_on_prompts_and_generates(method):
    """Prompts (batch 1 and 2) run as the cached graph's prefill and greedy decode steps; the
    quantized LM keeps its promise on the held-back prompt and generates like transformers."""
    pytest.importorskip("transformers", reason="transformers is a dev extra")
    from conftest import generates_like, tiny_llama

    lm = tiny_llama()
    ids = torch.randint(3, 128, (1, 8))
    prompts = [{"input_ids": torch.randint(3, 128, (2, 16))} for _ in range(6)] + [torch.randint(3, 128, (1, 5))]
    compiled = compile_quietly(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, backend="onnxruntime",
                               passes=f"cleanup,quantize:mode=weight_only,bits=8,method={method}",
                               calibration_data=prompts)  # fmt: skip
    notes = " ".join(compiled.report.notes + compiled.report.passes[-1].notes)
    assert "each calibration prompt runs as a prefill, then 4 greedy decode steps" in notes
    assert "5 calibration batch(es) held back" in notes  # the last prompt: its prefill and 4 steps
    if method == "gptq":  # 6 prompts x (2 x 16 + 4 x 2) rows = 240 >= 64 inputs (down_proj)
        assert "GPTQ (damp 0.01) on 15 of 15 layer(s)" in notes
    else:
        assert "AWQ (20 strengths) on 15 of 15 layer(s)" in notes and "folded into a norm's weight" in notes
    generates_like(lm, compiled)


def test_a_prompt_that_is_not_one_says_what_a_cached_lm_is_calibrated_on():
    pytest.importorskip("transformers", reason="transformers is a dev extra")
    from conftest import tiny_llama

    ids = torch.randint(3, 128, (1, 8))
    with pytest.raises(InputError, match="calibration batch 1: a causal LM compiled with its cache is calibrated on prompts"):
        compile_quietly(tiny_llama(), {"input_ids": ids}, backend="torch", passes="quantize:mode=weight_only,method=gptq",
                        calibration_data=[ids, {"input_ids": ids, "labels": ids}])  # fmt: skip


@pytest.mark.parametrize("grid", ["mode=weight_only,bits=4,block_size=32",
                                  pytest.param("mode=weight_only,bits=3,block_size=32", marks=SLOW), "mode=dynamic"])  # fmt: skip
def test_quantization_aware_fine_tuning_lowers_the_error_of_round_to_nearest(trained, grid):
    """Fine-tuned toward the float model through the weights' rounding (straight-through), then rounded
    to the same grid: the held-out error falls below plain rounding's."""
    model, train, held_out = trained
    batches = [(batch,) for batch in train.split(100)]
    plain = compile_quietly(model, held_out[:8], passes=f"quantize:{grid}", backend="torch", dynamic_axes="batch",
                            verify=False)  # fmt: skip
    lr = 0.0003 if grid == "mode=dynamic" else 0.001  # dynamic at 1e-3 overshoots (its error rose 2.8x)
    tuned = compile_quietly(model, held_out[:8], passes=f"quantize:{grid},qat_epochs=3,qat_lr={lr}", backend="torch",
                            dynamic_axes="batch", train_data=batches, verify=False)  # fmt: skip
    plain_error, error = _error(model, plain, held_out), _error(model, tuned, held_out)
    # measured (KL at temperature 1): int4 0.20x, int3 0.42x on an Intel Xeon; dynamic 0.91x there and 0.986x
    # on an AVX2 AMD EPYC (the trained float model differs with the CPU's kernels) — dynamic's error is mostly
    # the activations' per-call rounding (planted x40 inputs), which the fine-tune does not simulate, so it
    # is only required not to rise (at lr 1e-3 it rose 2.8x)
    assert error < (1.0 if grid == "mode=dynamic" else 0.5) * plain_error, (error, plain_error)
    assert any(n.startswith("quantization-aware fine-tune of 3 layer(s), 3 epoch(s)") for n in tuned.report.passes[-1].notes)


def test_qat_needs_training_data_and_round_to_nearest(trained):
    model, train, held_out = trained
    with pytest.raises(InputError, match="quantize qat needs training data"):
        compile_quietly(model, held_out[:8], passes="quantize:mode=weight_only,qat_epochs=1", backend="torch")
    for passes in ("quantize:mode=weight_only,method=gptq,qat_epochs=1", "quantize:mode=int8,qat_epochs=1",
                   "quantize:mode=weight_only,qat_lr=0"):  # fmt: skip
        with pytest.raises(ConfigError, match="qat"):
            compile_quietly(model, held_out[:8], passes=passes, backend="torch", train_data=[(train[:100],)])


def test_awq_folds_into_an_eval_batch_norm_through_a_relu():
    """The zoo MLP: Linear → BatchNorm1d → ReLU → Linear; 1/s goes into the batch norm's weight and
    bias (``weight * normalized + bias`` per channel), only the model's input keeps a multiply."""
    from torchkiln import models

    entry = models.get("mlp")
    calibration = [entry.example_inputs(batch=16, seed=s) for s in range(12)]
    compiled = compile_quietly(entry.build(), entry.example_inputs(batch=16), backend="torch", calibration_data=calibration,
                               passes="cleanup,quantize:mode=weight_only,method=awq,symmetric=false")  # fmt: skip
    notes = compiled.report.passes[-1].notes
    assert "AWQ: 1/s folded into a norm's weight, through a ReLU: features.4, classifier" in notes, notes
    assert "AWQ: 1/s kept as a multiply before: features.0" in notes
