"""The digits example for ``kiln build``: a CNN trained on scikit-learn's 8x8 digits, and its data.

``model()`` trains the reference CNN (about 5 s on a laptop CPU, deterministic); ``calibration()``
and ``validation()`` give the batches the recipe's [calibration] and [evaluation] tables name.
"""

from __future__ import annotations

import functools

import torch

from torchkiln.models.digits import DigitsCNN, load_digits_split, train_digits


@functools.cache
def _data():
    return load_digits_split()


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return train_digits(DigitsCNN(), _data())


def calibration() -> list[torch.Tensor]:
    x = _data().x_train
    return [x[i : i + 32] for i in range(0, 256, 32)]


def validation() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = _data()
    return [(data.x_test[i : i + 128], data.y_test[i : i + 128]) for i in range(0, len(data.x_test), 128)]
