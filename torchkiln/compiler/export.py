"""``torch.export`` as torchkiln uses it: inputs as keywords, dynamic axes as ``Dim.AUTO`` on
widened examples, and the exporters' chatter silenced. Shared by the export frontend and the
backends that serialize or lower through ``torch.export``."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def widen(
    flat: tuple[torch.Tensor, ...], names: Sequence[str], axes: Mapping[str, Mapping[int, str]]
) -> tuple[torch.Tensor, ...]:
    """Inputs grown along every dynamic axis, so the graph is exercised off its traced shape and
    torch.export does not specialize size-1 dims. An axis grows by one, and an axis named as a sum
    (``"past+sequence"``: a causal LM's mask spans the cache and the new tokens) by the number of
    its terms, so that related axes stay consistent."""
    out = []
    for name, tensor in zip(names, flat):
        for axis, dim_name in sorted(axes.get(name, {}).items()):
            for _ in range(growth(dim_name)):
                tensor = torch.cat([tensor, tensor.narrow(axis, 0, 1)], dim=axis)
        out.append(tensor)
    return tuple(out)


def growth(dim_name: str) -> int:
    """How much ``widen`` grows an axis named ``dim_name``: 1, or the number of terms of a sum."""
    terms = [t for t in str(dim_name).split("+") if t.strip()]
    return max(1, len(terms))


def export_graph(
    model: nn.Module,
    names: Sequence[str],
    flat: Sequence[torch.Tensor],
    axes: Mapping[str, Mapping[int, str]],
    constants: Mapping[str, Any] | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` with inputs as keywords, on inputs widened along the dynamic axes (size-1
    example dims would otherwise be specialized). Each dynamic axis is ``Dim.AUTO`` so that export
    infers its range (a positional table bounds a sequence axis, say). Export does not fail when
    the model pins an axis; callers verify the result against eager at two sizes, which does.
    ``constants`` (non-tensor keywords) are specialized into the graph."""
    shapes = {n: {a: torch.export.Dim.AUTO for a in axes.get(n, {})} for n in names}
    examples = widen(tuple(flat), names, axes)
    with quiet():
        program = torch.export.export(
            model, (), dict(zip(names, examples)) | dict(constants or {}),
            dynamic_shapes=(shapes | {k: None for k in constants or {}}) if axes else None, strict=False,
        )
    return program


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the prints, warnings and log lines torch's exporters emit while working."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
