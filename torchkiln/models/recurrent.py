"""A sequence classifier: 2-layer LSTM over feature vectors, classifier on the last step."""

from __future__ import annotations

from torch import Tensor, nn


class LSTMClassifier(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 32, layers: int = 2, num_classes: int = 5):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(self.norm(out[:, -1]))
