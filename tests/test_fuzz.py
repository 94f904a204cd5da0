"""Differential fuzzing: random valid models through the lossless passes to every backend, and
through static int8 quantization (ONNX Runtime vs the quantized IR vs eager, cosine floors).

The default run checks FUZZ_EXAMPLES models (20, ~40 s) and QUANT_EXAMPLES (10) quantized;
set TORCHKILN_FUZZ_EXAMPLES=1000 / TORCHKILN_FUZZ_QUANT_EXAMPLES (and optionally
TORCHKILN_FUZZ_SEED) for the long run. A failing case is shrunk by hypothesis and
written to tests/fuzz/regressions/new-failure.json (quantized: quant-new-failure.json); rename it
(keeping the quant- prefix) and test_regression replays it on every run from then on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzz.oracle import check, check_quantized
from fuzz.spec import ModelSpec
from fuzz.strategies import model_specs
from hypothesis import HealthCheck, given, seed, settings

REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions"
EXAMPLES = int(os.environ.get("TORCHKILN_FUZZ_EXAMPLES", "20"))
QUANT_EXAMPLES = int(os.environ.get("TORCHKILN_FUZZ_QUANT_EXAMPLES", "10"))
SEED = int(os.environ.get("TORCHKILN_FUZZ_SEED", "20261122"))


def fuzzed(examples: int) -> Callable[[Callable[[ModelSpec], None]], Callable[..., None]]:
    """Run the test on ``examples`` generated specs from the fixed seed."""

    def wrap(test: Callable[[ModelSpec], None]) -> Callable[..., None]:
        configured = settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        return seed(SEED)(configured(given(spec=model_specs())(test)))

    return wrap


def run_saving_failures(oracle: Callable[[ModelSpec], None], spec: ModelSpec, name: str) -> None:
    try:
        oracle(spec)
    except BaseException:
        REGRESSIONS.mkdir(exist_ok=True)
        (REGRESSIONS / name).write_text(spec.to_json() + "\n")  # the last one written is the shrunk one
        raise


@fuzzed(EXAMPLES)
def test_random_models_match_eager(spec: ModelSpec) -> None:
    run_saving_failures(check, spec, "new-failure.json")


@fuzzed(QUANT_EXAMPLES)
def test_random_models_quantize(spec: ModelSpec) -> None:
    run_saving_failures(check_quantized, spec, "quant-new-failure.json")


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.json")), ids=lambda p: p.stem)
def test_regression(path: Path) -> None:
    """Replayed with the oracle that found it: quant-*.json with the quantized one."""
    oracle = check_quantized if path.stem.startswith("quant") else check
    oracle(ModelSpec.from_json(path.read_text()))


@settings(max_examples=50, database=None)
@given(spec=model_specs())
def test_spec_round_trips_through_json(spec: ModelSpec) -> None:
    assert ModelSpec.from_json(spec.to_json()) == spec
