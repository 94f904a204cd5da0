from __future__ import annotations

import pytest
import torch
from torch import nn

import torchkiln
from torchkiln import models


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def compile_quietly(model: nn.Module, inputs, **kwargs) -> torchkiln.CompiledModel:
    """compile() without the latency measurement (tests never time anything)."""
    kwargs.setdefault("latency_runs", 0)
    return torchkiln.compile(model, inputs, **kwargs)


def op_count(gm, key: str) -> int:
    from torchkiln.compiler.graph import op_histogram

    return op_histogram(gm).get(key, 0)


SMALL_ZOO = models.small_models()
