"""The torch backend's operator allow-list (torchkiln.backends.torch_operators): every entry is safe
by its schema, and everything torchkiln emits — the zoo under every pass family, coverage models,
in-place modules, operators only their core-ATen decomposition covers — saves inside it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compile_quietly
from coverage_models import ARCHITECTURES
from torch import nn

from torchkiln import Tolerance, models
from torchkiln.backends import torch_format
from torchkiln.backends.torch_operators import ALLOWED, refusal

PASSES = {
    "lossless": ("cleanup,fold_batchnorm", None),
    "int8": ("cleanup,fold_batchnorm,quantize", Tolerance(min_cosine=0.9)),
    "dynamic": ("cleanup,quantize:mode=dynamic", Tolerance(min_cosine=0.9)),
    "weight_only": ("cleanup,quantize:mode=weight_only", Tolerance(min_cosine=0.9)),
    # zero points (weight_only_linear_zp) and AWQ's scales (folded, or a multiply)
    "weight_only_awq": ("cleanup,quantize:mode=weight_only,symmetric=false,method=awq", Tolerance(min_cosine=0.9)),
}


def saved_ops(compiled) -> set[str]:
    program = json.loads(compiled.artifact.saved_form()[0])
    return {n["target"].removeprefix("op:") for n in program["nodes"] if n["op"] == "call_function"}


def test_every_entry_exists_here_and_passes_the_schema_rule():
    import torchkiln.compiler.quant_ops  # noqa: F401 - registers the torchkiln and quantized_decomposed ops

    for name in sorted(ALLOWED):
        namespace, _, rest = name.partition("::")
        op_name, _, overload = rest.rpartition(".")
        op = getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
        assert refusal(op) is None, (name, refusal(op))


@pytest.mark.parametrize("name", ["aten::from_file.default", "aten::_print.default", "aten::add_.Tensor",
                                  "aten::copy_.default", "aten::rand.default", "aten::bernoulli.p"])  # fmt: skip
def test_operators_with_effects_are_refused_by_their_schema_or_the_list(name):
    namespace, _, rest = name.partition("::")
    op_name, _, overload = rest.rpartition(".")
    op = getattr(getattr(torch.ops.aten, op_name), overload)
    assert name not in ALLOWED
    if name != "aten::from_file.default":  # from_file's schema looks pure: only the list keeps it out
        assert refusal(op) is not None


ZOO_CASES = [(name, mode) for name in models.small_models() for mode in ("lossless", "int8")] + [
    (name, mode) for name in ("text_encoder", "lstm") for mode in ("dynamic", "weight_only")
] + [("text_encoder", "weight_only_awq")]
FAST_INT8 = {"resnet", "vit", "text_encoder", "digits_cnn"}  # the other int8 cases (CI time) are slow


@pytest.mark.parametrize(("name", "mode"), [
    pytest.param(n, m, id=f"{n}-{m}", marks=pytest.mark.slow if m == "int8" and n not in FAST_INT8 else ())
    for n, m in ZOO_CASES
])  # fmt: skip
def test_the_zoo_saves_inside_the_allow_list(name, mode):
    entry = models.get(name)
    passes, tolerance = PASSES[mode]
    inputs = entry.example_inputs(batch=2)
    calibration = [entry.example_inputs(batch=2, seed=s) for s in range(4)]
    axes = {i.name: dict(i.dynamic) for i in entry.inputs}
    compiled = compile_quietly(models.build(name), inputs, passes=passes, backend="torch", dynamic_axes=axes,
                               calibration_data=calibration, tolerance=tolerance)  # fmt: skip
    ops = saved_ops(compiled)
    assert ops and {op for op in ops if op.startswith(("aten::", "torchkiln::", "quantized_"))} <= ALLOWED
    if mode == "weight_only_awq":
        assert "torchkiln::weight_only_linear_zp.default" in ops


FAST_ARCHITECTURES = {"bert", "llama", "vit", "lstm-gru"}


@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=() if a.name in FAST_ARCHITECTURES else pytest.mark.slow, id=a.name)
    # mixtral: its expert routing calls transformers::grouped_mm_fallback, a custom operator of another
    # package (not loaded: running it would run that package), so the torch backend refuses to save it (ONNX saves it)
    for a in ARCHITECTURES if a.name != "mixtral"
])  # fmt: skip
def test_coverage_models_save_inside_the_allow_list(arch):
    model, inputs, axes = arch.build()
    compiled = compile_quietly(model, inputs, passes="cleanup", backend="torch", dynamic_axes=axes)
    assert {op for op in saved_ops(compiled) if "::" in op} <= ALLOWED


def test_in_place_modules_are_saved_functional_and_still_match():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Hardtanh(inplace=True), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    compiled = compile_quietly(model, x, passes="cleanup", backend="torch", dynamic_axes="batch")
    ops = saved_ops(compiled)
    assert not any(op.split(".")[0].endswith("_") for op in ops), ops
    reloaded = torch_format.load(*compiled.artifact.saved_form(), where="test")
    torch.testing.assert_close(reloaded(x)[0], model(x), atol=1e-5, rtol=1e-4)


class Unlisted(nn.Module):
    """logit and sinc are not on the list; their core-ATen decompositions are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(torch.sigmoid(x), eps=1e-6) + torch.sinc(x)


def test_an_operator_off_the_list_is_saved_through_its_decomposition():
    x = torch.randn(2, 5)
    compiled = compile_quietly(Unlisted().eval(), x, passes="cleanup", backend="torch")
    ops = saved_ops(compiled)
    assert not {"aten::logit.default", "aten::sinc.default"} & ops and ops <= ALLOWED | {"sym_size"}
    reloaded = torch_format.load(*compiled.artifact.saved_form(), where="test")
    torch.testing.assert_close(reloaded(x)[0], Unlisted()(x), atol=1e-5, rtol=1e-4)
