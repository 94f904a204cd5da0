"""The lowrank pass: SVD factorization of Linear and Conv2d (channel and spatial forms)."""

from __future__ import annotations

import pytest
import torch
from conftest import SWEEP_ZOO, compile_quietly, op_count
from torch import nn

from torchkiln import models
from torchkiln.errors import ConfigError


def low_rank_linear(inp: int, out: int, rank: int) -> nn.Linear:
    layer = nn.Linear(inp, out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, rank) @ torch.randn(rank, inp))
    return layer


def test_exactly_low_rank_linear_is_factored_without_error():
    model = nn.Sequential(low_rank_linear(64, 48, 4), nn.ReLU(), nn.Linear(48, 3)).eval()
    compiled = compile_quietly(model, torch.randn(5, 64), passes="lowrank:energy=0.999999", backend="torch")
    record = compiled.report.passes[0]
    assert record.stats["factored"] == 1 and "0: rank 4 of 48, 3,072 -> 448 weights" in record.notes
    assert op_count(compiled.artifact.module, "aten.linear") == 3  # 0 became two, 2 stays (rank 3 saves nothing)
    assert "2: not factored, rank 3 of 3 saves nothing" in record.notes
    assert record.max_rel_error < 1e-5


@pytest.mark.parametrize("form", ["channel", "spatial"])
def test_exactly_low_rank_conv_is_factored_without_error(form):
    conv = nn.Conv2d(16, 32, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 1))
    with torch.no_grad():
        if form == "channel":  # [out, in*kh*kw] of rank 3
            conv.weight.copy_((torch.randn(32, 3) @ torch.randn(3, 16 * 15)).reshape(32, 16, 3, 5))
        else:  # W[o, i, h, w] = sum_r A[r, i, h] B[o, r, w], rank 3
            a, b = torch.randn(3, 16, 3), torch.randn(32, 3, 5)
            conv.weight.copy_(torch.einsum("rih,orw->oihw", a, b))
    model = nn.Sequential(conv, nn.ReLU()).eval()
    compiled = compile_quietly(
        model, torch.randn(2, 16, 12, 12), passes=f"lowrank:energy=0.999999,conv={form}", backend="onnxruntime"
    )
    record = compiled.report.passes[0]
    assert record.stats["factored"] == 1 and record.max_rel_error < 1e-5
    assert compiled.report.artifact.max_rel_error < 1e-5


def test_full_energy_is_the_identity():
    entry = models.get("resnet")
    compiled = compile_quietly(entry.build(), entry.example_inputs(1), passes="lowrank:energy=1", backend="torch")
    assert compiled.report.passes[0].modified is False and compiled.report.passes[0].max_abs_error == 0.0


def test_rank_ratio_halves_the_rank():
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    compiled = compile_quietly(model, torch.randn(2, 64), passes="lowrank:rank_ratio=0.25", backend="torch")
    assert "0: rank 16 of 64, 4,096 -> 2,048 weights" in compiled.report.passes[0].notes


@pytest.mark.parametrize("name", SWEEP_ZOO)
def test_zoo_factors_and_runs_on_onnxruntime(name):
    entry = models.get(name)
    compiled = compile_quietly(
        entry.build(), entry.example_inputs(2), passes="fold_batchnorm,lowrank:rank_ratio=0.5", dynamic_axes=entry.dynamic_axes
    )
    record = compiled.report.passes[-1]
    if record.modified:
        assert record.stats["weights_after"] < record.stats["weights_before"]
        assert compiled.report.params < record.params_before
    assert "against the rewritten graph" in compiled.report.artifact.tolerance


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lowrank:energy=0", r"must be in \(0, 1\]"),
        ("lowrank:rank_ratio=1.5", r"must be in \(0, 1\]"),
        ("lowrank:energy=0.8,rank_ratio=0.5", "not both"),
        ("lowrank:conv=depth", "is not one of"),
    ],
)
def test_bad_options(spec, message):
    with pytest.raises(ConfigError, match=message):
        compile_quietly(nn.Linear(4, 2), torch.randn(1, 4), passes=spec)
