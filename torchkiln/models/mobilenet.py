"""MobileNetV2: inverted residuals with depthwise 3x3 convs and ReLU6, for 32x32 inputs."""

from __future__ import annotations

from torch import Tensor, nn


def _make_divisible(value: float, divisor: int = 8) -> int:
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_relu6(cin, hidden, 1)]
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.residual else self.block(x)


# (expansion, channels, repeats, first stride) as in the MobileNetV2 paper, strides adapted to 32x32
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    def __init__(self, width_mult: float = 0.35, num_classes: int = 10, in_channels: int = 3, stem_stride: int = 1):
        """``stem_stride=1`` for 32x32 inputs (the zoo's); torchvision's ImageNet network is
        ``MobileNetV2(1.0, 1000, stem_stride=2)`` at 224x224."""
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        layers: list[nn.Module] = [_conv_bn_relu6(in_channels, cin, 3, stem_stride)]
        for expand, channels, repeats, stride in _SETTINGS:
            cout = _make_divisible(channels * width_mult)
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers.append(_conv_bn_relu6(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.classifier(x.mean((2, 3)))
