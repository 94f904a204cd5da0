"""The differential oracles.

Lossless: a spec's model through the lossless passes, and the lossy ones at their identity
settings (prune ratio 0, lowrank at full energy), to every backend must match eager PyTorch at the
fp32 tolerance, at the traced batch and (when dynamic) at another one. The backends share a stage
cache: the first compile stores the optimized program, the second must load it from disk (a cache
hit) — so every generated graph also goes through the cache's save and load.

Quantized: through static int8 ``quantize``, ONNX Runtime's integer kernels must agree with the
quantized IR run by PyTorch (the IR defines the arithmetic; the lowering must keep it), and both
must stay close to eager — cosine similarity floors over all outputs of a fresh input.
"""

from __future__ import annotations

import tempfile

import torch
from torch.utils import _pytree as pytree

import torchkiln
from fuzz.spec import FuzzModel, ModelSpec
from fuzz.strategies import value_shapes
from torchkiln.compiler.verify import compare, cosine_similarity

BACKENDS = ("torch", "onnxruntime")
# the lossless passes, then the lossy ones at their identity settings (which must change nothing)
PASSES = "cleanup,fold_batchnorm,prune:ratio=0,lowrank:energy=1"
QUANT_PASSES = "cleanup,fold_batchnorm,quantize:min_cosine=0.5"  # the oracle judges, below
IR_FLOOR = 0.999  # ONNX Runtime's integer kernels vs the quantized IR in PyTorch
EAGER_FLOOR = 0.98  # int8 vs the float model, on random data with random weights


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
    with tempfile.TemporaryDirectory(prefix="fuzz-cache-") as cache:
        for index, backend in enumerate(BACKENDS):
            compiled = torchkiln.compile(
                model, inputs, passes=PASSES, backend=backend, dynamic_axes="batch" if spec.dynamic_batch else None,
                latency_runs=0, cache=cache,
            )  # fmt: skip
            state = compiled.report.cache["optimize"]
            assert state.startswith("hit" if index else "miss"), f"{backend}: optimize stage {state}"
            _check_outputs(backend, pytree.tree_leaves(compiled(*fresh)), expected)


def _check_outputs(backend: str, actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    stats = compare(actual, expected)
    assert stats.within(), (
        f"{backend}: output {stats.worst_output} off by {stats.max_abs:.3e} (allowed {stats.allowed:.3e})"
    )


def _flat(outputs: object) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in pytree.tree_leaves(outputs)])


def check_quantized(spec: ModelSpec) -> None:
    model = build(spec)
    inputs = spec.example_inputs()
    fresh = spec.example_inputs(batch=spec.batch + 2 if spec.dynamic_batch else None, seed=1)
    # The fresh input is part of the calibration set: static int8 clips values outside the calibrated
    # range by design (a handful of random samples rarely covers a fresh one), and the oracle is
    # about rounding and lowering, not about how representative the calibration data is.
    calibration = [fresh] + [spec.example_inputs(seed=s) for s in range(2, 6)]  # the last is held back
    with torch.no_grad():
        expected = _flat(model(*fresh))
    results = {}
    for backend in BACKENDS:
        compiled = torchkiln.compile(
            model, inputs, passes=QUANT_PASSES, backend=backend, calibration_data=calibration, verify=False,
            dynamic_axes="batch" if spec.dynamic_batch else None, latency_runs=0,
        )  # fmt: skip
        results[backend] = _flat(compiled(*fresh))
    lowering = cosine_similarity(results["onnxruntime"], results["torch"])
    assert lowering >= IR_FLOOR, f"ONNX Runtime vs quantized IR: cosine {lowering:.5f} < {IR_FLOOR}"
    accuracy = cosine_similarity(results["torch"], expected)
    assert accuracy >= EAGER_FLOOR, f"int8 vs eager: cosine {accuracy:.5f} < {EAGER_FLOOR}"
