"""The digits example for ``kiln build``: a CNN trained on scikit-learn's 8x8 digits, and its data.

``model()`` trains the reference CNN (about 5 s on a laptop CPU, deterministic); ``calibration()``
and ``validation()`` give the batches the recipe's [calibration] and [evaluation] tables name.
``resnet()`` and ``encoder()`` train a ResNet-style CNN and a ViT-style transformer encoder on the
same data (bench/bench_tune.py); their ``*_architecture()`` twins are untrained, for recipes that
load trained weights from a file (``[model] weights``).
"""

from __future__ import annotations

import functools

import torch

from torchkiln.models.digits import DigitsCNN, load_digits_split, train_digits
from torchkiln.models.resnet import BasicBlock, ResNet
from torchkiln.models.transformer import ViT


@functools.cache
def _data():
    return load_digits_split()


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return train_digits(DigitsCNN(), _data())


def resnet_architecture() -> torch.nn.Module:
    """Basic blocks (2, 2, 2), widths 16/32/64, a 3x3 stem for 8x8 inputs: 175k parameters."""
    torch.manual_seed(0)
    return ResNet(BasicBlock, (2, 2, 2), width=16, num_classes=10, in_channels=1, stem="cifar")


def resnet() -> torch.nn.Module:
    return train_digits(resnet_architecture(), _data())


def encoder_architecture() -> torch.nn.Module:
    """2x2 patches (16 tokens and a class token), 2 encoder layers, dim 64, 4 heads: 69k parameters."""
    torch.manual_seed(0)
    return ViT(image=8, patch=2, dim=64, depth=2, heads=4, mlp_dim=128, num_classes=10, in_channels=1)


def encoder() -> torch.nn.Module:
    return train_digits(encoder_architecture(), _data(), epochs=40)


def calibration() -> list[torch.Tensor]:
    x = _data().x_train
    return [x[i : i + 32] for i in range(0, 256, 32)]


def training() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training split in batches of 64 with labels: a recipe's [training] table (distill)."""
    data = _data()
    return [(data.x_train[i : i + 64], data.y_train[i : i + 64]) for i in range(0, len(data.x_train), 64)]


def validation() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = _data()
    return [(data.x_test[i : i + 128], data.y_test[i : i + 128]) for i in range(0, len(data.x_test), 128)]
