"""A small UNet with an Inception block at the bottom: concat branches, skip concats, and both
learned (ConvTranspose2d + BN) and fixed (nearest interpolation) upsampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class Inception(nn.Module):
    def __init__(self, cin: int, branch: int):
        super().__init__()
        self.b1 = _conv_bn_relu(cin, branch, 1)
        self.b3 = nn.Sequential(_conv_bn_relu(cin, branch, 1), _conv_bn_relu(branch, branch, 3))
        self.b5 = nn.Sequential(
            _conv_bn_relu(cin, branch, 1), _conv_bn_relu(branch, branch, 3), _conv_bn_relu(branch, branch, 3)
        )
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn_relu(cin, branch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1)


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 4, width: int = 16):
        super().__init__()
        w = width
        self.enc1, self.enc2 = _conv_bn_relu(in_channels, w), _conv_bn_relu(w, 2 * w)
        self.bottom = Inception(2 * w, w)  # 4 branches of w channels
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), nn.BatchNorm2d(2 * w), nn.ReLU()
        )
        self.dec1 = _conv_bn_relu(4 * w, 2 * w)
        self.reduce = _conv_bn_relu(2 * w, w, 1)
        self.dec2 = _conv_bn_relu(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d1 = self.dec1(torch.cat([self.up1(b), e2], dim=1))
        up = F.interpolate(self.reduce(d1), scale_factor=2.0, mode="nearest")
        d2 = self.dec2(torch.cat([up, e1], dim=1))
        return self.head(d2)
