"""ResNet with basic or bottleneck blocks, configurable depth and width.

``resnet18`` / ``resnet50`` reproduce the torchvision layer shapes (ImageNet stem, 224x224); the
``tiny`` variants use a CIFAR stem (3x3 conv, no max-pool) for 32x32 inputs and fast CPU tests.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN on the residual path when the block changes shape, else the identity."""
    return nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None


class _Residual(nn.Module):
    downsample: nn.Sequential | None

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)


class BasicBlock(_Residual):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 3, stride)
        self.conv2, self.bn2 = _conv_bn(width, cout, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(_Residual):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
        layers: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
    ):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                *_conv_bn(in_channels, width, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
            )
        else:
            self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, depth in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, planes, stride=2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet_tiny(num_classes: int = 10) -> ResNet:
    return ResNet(BasicBlock, (1, 1, 1, 1), width=16, num_classes=num_classes, stem="cifar")


def resnet_bottleneck_tiny(num_classes: int = 10) -> ResNet:
    return ResNet(Bottleneck, (1, 1, 1, 1), width=8, num_classes=num_classes, stem="cifar")


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), width=64, num_classes=num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width=64, num_classes=num_classes)
