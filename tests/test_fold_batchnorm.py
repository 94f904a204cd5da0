"""fold_batchnorm: every layer kind, both graph flavours, and each reason not to fold."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_ZOO
from torch import nn

from torchkiln import models
from torchkiln.compiler.graph import op_histogram
from torchkiln.compiler.manager import PassManager
from torchkiln.compiler.passes import parse_pass
from torchkiln.compiler.trace import trace
from torchkiln.models import randomize_batchnorm

FLAVOURS = ["fx", "export"]


def fold(model, inputs, frontend="fx", **kwargs):
    randomize_batchnorm(model)
    program = trace(model.eval(), inputs, frontend=frontend, **kwargs)
    record = PassManager([parse_pass("fold_batchnorm")]).run(program)[0]  # checks fp32 numerics
    return program, record


def bn_ops(ops: dict[str, int]) -> int:
    return sum(v for k, v in ops.items() if "batch_norm" in k.lower() or "BatchNorm" in k)


LAYERS = [
    (nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (2, 3, 10)),
    (nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)), (2, 3, 8, 8)),
    (nn.Sequential(nn.Conv2d(6, 6, 3, groups=3), nn.BatchNorm2d(6)), (2, 6, 8, 8)),
    (nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5)),
    (nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2), nn.BatchNorm2d(6)), (2, 4, 4, 4)),
    (nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6)), (2, 4, 4, 4)),
    (nn.Sequential(nn.ConvTranspose1d(3, 4, 3), nn.BatchNorm1d(4)), (2, 3, 7)),
    (nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)), (4, 5)),
    (nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7, affine=False)), (4, 5)),
]


@pytest.mark.parametrize("frontend", FLAVOURS)
@pytest.mark.parametrize(
    "model, shape",
    LAYERS,
    ids=lambda v: (
        type(v[0]).__name__ + ("_g" if getattr(v[0], "groups", 1) > 1 else "")
        if isinstance(v, nn.Sequential)
        else ""
    ),
)
def test_each_layer_kind_folds_exactly(model, shape, frontend):
    program, record = fold(model, torch.randn(shape), frontend)
    assert record.modified and record.stats["folded"] == 1 and not record.notes
    assert bn_ops(record.ops_before) == 1 and bn_ops(record.ops_after) == 0
    assert record.max_abs_error <= 1e-5


def test_bn_in_training_mode_is_left_with_a_note():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.eval()
    model[1].train()
    program = trace(model, torch.randn(2, 3, 6, 6), frontend="fx")
    record = PassManager([parse_pass("fold_batchnorm")], instruments=[]).run(program)[0]
    assert not record.modified and record.notes == ["1: not folded, BN is in training mode"]


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Rank3Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(5)

    def forward(self, x):  # x: [N, 5, 4] -> BN normalizes dim 1 (length 5), not the features
        return self.bn(self.fc(x))


class NoStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class InputBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x)


@pytest.mark.parametrize(
    "model, shape, reason, frontends",
    [
        (SharedOutput(), (2, 3, 6, 6), "the output of conv has other users", FLAVOURS),
        (Rank3Linear(), (2, 5, 4), "not 2-D", FLAVOURS),
        (NoStats(), (2, 3, 6, 6), "no running statistics", ["fx"]),
        (SharedConv(), (2, 3, 4, 4), "conv is called at more than one place", ["fx"]),
        (InputBN(), (2, 3, 4, 4), "its input is not a", FLAVOURS),
    ],
)
def test_reasons_not_to_fold(model, shape, reason, frontends):
    for frontend in frontends:
        program, record = fold(model, torch.randn(shape), frontend)
        assert not record.modified, frontend
        assert len(record.notes) == 1 and reason in record.notes[0] and "not folded" in record.notes[0], (
            record.notes
        )
        assert record.notes[0].startswith("bn: ")
        assert record.max_abs_error == 0.0


@pytest.mark.parametrize("frontend", FLAVOURS)
@pytest.mark.parametrize("name", SMALL_ZOO)
def test_every_zoo_model(name, frontend):
    entry = models.get(name)
    program = trace(entry.build(), entry.example_inputs(), frontend=frontend, dynamic_axes=entry.dynamic_axes)
    bns = bn_ops(op_histogram(program.graph_module))
    assert (bns > 0) == (name in {"mlp", "digits_cnn", "resnet", "resnet_bottleneck", "mobilenet_v2", "unet"})
    record = PassManager([parse_pass("fold_batchnorm")]).run(program)[0]
    assert record.stats["folded"] == bns and bn_ops(record.ops_after) == 0, record.notes
    assert record.modified == (bns > 0)
    again = PassManager([parse_pass("fold_batchnorm")]).run(program)[0]
    assert again.modified is False and again.stats["folded"] == 0
