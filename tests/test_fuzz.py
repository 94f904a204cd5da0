"""Differential fuzzing: random valid models through the lossless passes to every backend.

The default run checks FUZZ_EXAMPLES models (200, a few minutes); set TORCHKILN_FUZZ_EXAMPLES=1000
(and optionally TORCHKILN_FUZZ_SEED) for the long run. A failing case is shrunk by hypothesis and
written to tests/fuzz/regressions/new-failure.json; rename it and it is replayed by
test_regression on every run from then on.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fuzz.oracle import check
from fuzz.spec import ModelSpec
from fuzz.strategies import model_specs
from hypothesis import HealthCheck, given, seed, settings

REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions"
EXAMPLES = int(os.environ.get("TORCHKILN_FUZZ_EXAMPLES", "200"))
SEED = int(os.environ.get("TORCHKILN_FUZZ_SEED", "20261122"))


@seed(SEED)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=model_specs())
def test_random_models_match_eager(spec: ModelSpec) -> None:
    try:
        check(spec)
    except BaseException:
        REGRESSIONS.mkdir(exist_ok=True)
        (REGRESSIONS / "new-failure.json").write_text(spec.to_json() + "\n")  # the last one is the shrunk one
        raise


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.json")), ids=lambda p: p.stem)
def test_regression(path: Path) -> None:
    check(ModelSpec.from_json(path.read_text()))


@settings(max_examples=50, database=None)
@given(spec=model_specs())
def test_spec_round_trips_through_json(spec: ModelSpec) -> None:
    assert ModelSpec.from_json(spec.to_json()) == spec
