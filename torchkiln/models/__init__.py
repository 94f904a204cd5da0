"""The model zoo: real architectures, small enough for CPU tests, built deterministically.

Every entry has a factory, its inputs (name, shape with the batch first, dtype) and the dynamic
axes it supports. ``build`` seeds the weights and gives BatchNorm layers non-trivial running
statistics, so folding and numerics are exercised as they would be on a trained model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchkiln.errors import ConfigError
from torchkiln.models.digits import DigitsCNN
from torchkiln.models.mlp import MLP
from torchkiln.models.mobilenet import MobileNetV2
from torchkiln.models.recurrent import LSTMClassifier
from torchkiln.models.resnet import resnet18, resnet50, resnet_bottleneck_tiny, resnet_tiny
from torchkiln.models.transformer import TextEncoder, ViT
from torchkiln.models.unet import UNet


@dataclasses.dataclass(frozen=True)
class ZooInput:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int = 0  # for integer inputs: values are drawn from [0, high)
    dynamic: tuple[tuple[int, str], ...] = ((0, "batch"),)


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Callable[[], nn.Module]
    inputs: tuple[ZooInput, ...]
    description: str
    small: bool = True  # part of the every-model test sweep

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = self.factory()
        randomize_batchnorm(model, seed)
        return model.eval()

    def example_inputs(self, batch: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed + 1)
        tensors = {}
        for spec in self.inputs:
            shape = (batch, *spec.shape[1:]) if batch is not None else spec.shape
            if spec.dtype.is_floating_point:
                tensors[spec.name] = torch.randn(shape, generator=generator, dtype=spec.dtype)
            else:
                tensors[spec.name] = torch.randint(0, spec.high, shape, generator=generator, dtype=spec.dtype)
        return tensors

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {spec.name: dict(spec.dynamic) for spec in self.inputs if spec.dynamic}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm running statistics and affine values that are not the identity."""
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            n = module.num_features
            if module.running_mean is not None and module.running_var is not None:
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_((torch.rand(n, generator=generator) - 0.5) * 0.4)


def _image(size: int, channels: int = 3) -> tuple[ZooInput, ...]:
    return (ZooInput("x", (1, channels, size, size)),)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "mlp", MLP, (ZooInput("x", (1, 64)),), "MLP: Linear-BatchNorm1d-ReLU-Dropout x2, classifier"
        ),
        ZooEntry(
            "digits_cnn",
            DigitsCNN,
            _image(8, channels=1),
            "CNN for scikit-learn's 8x8 digits (train it with models.digits.train_digits)",
        ),
        ZooEntry("resnet", resnet_tiny, _image(32), "ResNet, basic blocks (1,1,1,1), width 16, 32x32"),
        ZooEntry(
            "resnet_bottleneck",
            resnet_bottleneck_tiny,
            _image(32),
            "ResNet, bottleneck blocks (1,1,1,1), width 8, 32x32",
        ),
        ZooEntry(
            "mobilenet_v2",
            MobileNetV2,
            _image(32),
            "MobileNetV2 x0.35: depthwise convs, inverted residuals, ReLU6",
        ),
        ZooEntry("vit", ViT, _image(32), "ViT: 4x4 patches, 2 layers, dim 64, 4 heads, LayerNorm, GELU"),
        ZooEntry(
            "text_encoder",
            TextEncoder,
            (
                ZooInput(
                    "input_ids", (1, 16), torch.int64, high=1000, dynamic=((0, "batch"), (1, "sequence"))
                ),
            ),
            "Transformer encoder over token ids: embedding, 2 layers, dim 64, dynamic batch and sequence",
        ),
        ZooEntry(
            "unet",
            UNet,
            _image(32),
            "UNet with an Inception bottom: concat branches, ConvTranspose and interpolate upsampling",
        ),
        ZooEntry(
            "lstm",
            LSTMClassifier,
            (ZooInput("x", (1, 12, 16), dynamic=((0, "batch"), (1, "sequence"))),),
            "2-layer LSTM sequence classifier with LayerNorm, dynamic batch and sequence",
        ),
        ZooEntry("resnet18", resnet18, _image(224), "ResNet-18 (torchvision shapes), 224x224", small=False),
        ZooEntry("resnet50", resnet50, _image(224), "ResNet-50 (torchvision shapes), 224x224", small=False),
    )
}


def get(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ConfigError(f"unknown zoo model '{name}'", where=name, hint=f"zoo models: {', '.join(ZOO)}")
    return ZOO[name]


def small_models() -> list[str]:
    return [name for name, entry in ZOO.items() if entry.small]


def build(name: str, **kwargs: Any) -> nn.Module:
    return get(name).build(**kwargs)
