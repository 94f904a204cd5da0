"""A small CNN for scikit-learn's ``load_digits`` (8x8 grey images, 10 classes), and the data.

The digits set ships inside scikit-learn, so tests and benchmarks train a real classifier offline
and measure real accuracy: what quantization, pruning and distillation must preserve.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from torchkiln.errors import ConfigError


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool, conv-BN-ReLU, then a two-layer classifier: 188k parameters."""

    def __init__(self, width: int = 32, hidden: int = 128, num_classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, width), block(width, 2 * width), nn.MaxPool2d(2), block(2 * width, 2 * width)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@dataclasses.dataclass(frozen=True)
class DigitsData:
    x_train: Tensor  # [N, 1, 8, 8] in [0, 1]
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsData:
    """scikit-learn's digits, stratified into train and held-out test tensors."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ConfigError("the digits data needs scikit-learn", hint="pip install scikit-learn") from exc
    images, labels = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )

    def tensor(a):  # type: ignore[no-untyped-def]
        return torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0

    return DigitsData(tensor(x_tr), torch.tensor(y_tr), tensor(x_te), torch.tensor(y_te))


def train_digits(model: nn.Module, data: DigitsData, epochs: int = 15, seed: int = 0, batch: int = 64) -> nn.Module:
    """Adam with a cosine schedule; deterministic for a seed; returns the model in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = epochs * -(-len(data.x_train) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train))
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(predict: object, x: Tensor, y: Tensor, batch: int = 128) -> float:
    """Top-1 accuracy (in %) of ``predict`` (a model or a compiled artifact) over ``x``."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            logits = predict(x[start : start + batch])  # type: ignore[operator]
            correct += int((logits.argmax(-1) == y[start : start + batch]).sum())
    return 100.0 * correct / len(x)
