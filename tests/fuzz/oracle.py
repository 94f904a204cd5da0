"""The differential oracle: a spec's model through the lossless passes to every backend must match
eager PyTorch at the fp32 tolerance, at the traced batch and (when dynamic) at another one."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

import torchkiln
from fuzz.spec import FuzzModel, ModelSpec
from fuzz.strategies import value_shapes
from torchkiln.compiler.verify import compare

BACKENDS = ("torch", "onnxruntime")
PASSES = "cleanup,fold_batchnorm"


def build(spec: ModelSpec, seed: int = 0) -> FuzzModel:
    torch.manual_seed(seed)
    return FuzzModel(spec, value_shapes(spec)).eval()


def check(spec: ModelSpec) -> None:
    """Raise AssertionError (or the compiler's error) on any mismatch."""
    model = build(spec)
    inputs = spec.example_inputs()
    fresh = spec.example_inputs(batch=spec.batch + 2 if spec.dynamic_batch else None, seed=1)
    with torch.no_grad():
        expected = pytree.tree_leaves(model(*fresh))
    for backend in BACKENDS:
        compiled = torchkiln.compile(
            model, inputs, passes=PASSES, backend=backend, dynamic_axes="batch" if spec.dynamic_batch else None,
            latency_runs=0,
        )  # fmt: skip
        actual = pytree.tree_leaves(compiled(*fresh))
        stats = compare(actual, expected)
        assert stats.within(), (
            f"{backend}: output {stats.worst_output} off by {stats.max_abs:.3e} (allowed {stats.allowed:.3e})"
        )
