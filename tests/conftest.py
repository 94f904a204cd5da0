from __future__ import annotations

import pytest
import torch
from torch import nn

import torchkiln
from torchkiln import models
from torchkiln.compiler.passes import Pass, PassResult


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch) -> None:
    """kiln build caches by default; tests must not read or fill the user's ~/.cache."""
    monkeypatch.setenv("TORCHKILN_CACHE_DIR", str(tmp_path_factory.mktemp("kiln-cache")))


def compile_quietly(model: nn.Module, inputs, **kwargs) -> torchkiln.CompiledModel:
    """compile() without the latency measurement (tests never time anything)."""
    kwargs.setdefault("latency_runs", 0)
    return torchkiln.compile(model, inputs, **kwargs)


class Perturb(Pass):
    """A lossy pass promising nothing: adds 0.05 to every parameter (module calls stay, so BN still
    folds). The manager measures it; the artifact then differs from eager."""

    name = "test_perturb"
    lossless = False

    def run(self, program):
        with torch.no_grad():
            for parameter in program.graph_module.parameters():
                parameter.add_(0.05)
        return PassResult(modified=True)


def op_count(gm, key: str) -> int:
    from torchkiln.compiler.graph import op_histogram

    return op_histogram(gm).get(key, 0)


SMALL_ZOO = models.small_models()
# The secondary per-pass sweeps (cluster, compare, lowrank, prune) to ONNX Runtime: mobilenet_v2, the
# slowest export (12-20 s a case), runs there only under `slow`; backends, quantize and fp16 keep it in CI.
SWEEP_ZOO = [pytest.param(n, marks=pytest.mark.slow) if n == "mobilenet_v2" else n for n in SMALL_ZOO]
