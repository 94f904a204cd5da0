"""The optional accuracy promise of the compression passes (prune, lowrank, cluster).

They change what a model computes on purpose and are usually followed by distillation, so by
default they promise nothing against eager (the error is measured and reported). ``min_cosine``
turns that into a checked promise: outputs' cosine similarity to eager of at least that floor.
"""

from __future__ import annotations

from typing import Any

from torchkiln.compiler.options import Options, option
from torchkiln.compiler.verify import Tolerance


def min_cosine_option() -> Any:
    return option(None, "promise checked against eager (output cosine floor); unset: measured, not enforced")


def check_min_cosine(config: Options) -> None:
    floor = getattr(config, "min_cosine", None)
    if floor is not None and not 0.0 < floor <= 1.0:
        config.fail("min_cosine", f"must be in (0, 1], got {floor}")


def promise(floor: float | None) -> Tolerance | None:
    return None if floor is None else Tolerance(min_cosine=floor)
