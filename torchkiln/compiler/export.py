"""``torch.export`` as torchkiln uses it: inputs as keywords, dynamic axes as ``Dim.AUTO`` on
widened examples, and the exporters' chatter silenced. Shared by the export frontend and the
backends that serialize or lower through ``torch.export``."""

from __future__ import annotations

import contextlib
import io
import logging
import threading
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
    with quiet(), recurrent_shapes():
        program = torch.export.export(
            model, (), dict(zip(names, examples)) | dict(constants or {}),
            dynamic_shapes=(shapes | {k: None for k in constants or {}}) if axes else None, strict=False,
        )
    return program


#: recurrent ops whose shape torch computes by running their Python kernel (``torch._decomp``'s
#: ``lstm_impl`` and kin), a loop over the sequence that specializes its length: with a dynamic
#: sequence axis, an LSTM feeding a bidirectional GRU exported a ``Reshape`` to the traced length
#: (ONNX Runtime then failed at any other length)
RECURRENT = ("lstm", "gru", "rnn_tanh", "rnn_relu")
_KEYS = (torch._C.DispatchKey.CompositeImplicitAutograd, torch._C.DispatchKey.Autograd)


def _shaped(original: Any) -> Any:
    """A recurrent op's kernel that, on fake tensors, makes outputs of the right shapes from the shapes alone:
    (input, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first) gives an
    output with the input's sequence and batch and directions x the hidden size, and final states
    shaped like the initial ones. Real tensors (another thread running the model meanwhile) go to
    the original kernel."""
    from torch._subclasses.fake_tensor import FakeTensor

    def kernel(*args: Any, **kwargs: Any) -> Any:
        inp, hx = args[0], args[1]
        if not isinstance(inp, FakeTensor):
            return original(*args, **kwargs)
        states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
        directions = 2 if args[7] else 1
        output = inp.new_empty((*inp.shape[:2], directions * states[0].shape[2]))
        return (output, *(state.new_empty(state.shape) for state in states))

    return kernel


_RECURRENT_LOCK = threading.Lock()
_recurrent_users: list[Any] = []  # while exports run: [their count, the kernels and table entries to restore]


@contextlib.contextmanager
def recurrent_shapes() -> Iterator[None]:
    """While exporting, recurrent ops are shaped by :func:`_shaped` (symbolic sizes pass through)
    instead of by their sequence loop; the graph keeps the ops themselves either way. Exports in
    several threads share one installation: the first installs, the last restores (nested saves
    would otherwise restore each other's kernels and leave the shape-only ones behind)."""
    with _RECURRENT_LOCK:
        if not _recurrent_users:
            _recurrent_users[:] = [0, _install_recurrent_shapes()]
        _recurrent_users[0] += 1
    try:
        yield
    finally:
        with _RECURRENT_LOCK:
            _recurrent_users[0] -= 1
            if _recurrent_users[0] == 0:
                _restore_recurrent(*_recurrent_users[1])
                _recurrent_users.clear()


def _install_recurrent_shapes() -> tuple[list[Any], dict[Any, Any]]:
    from torch._decomp import decomposition_table  # what fake tensors run for an op with symbolic sizes

    ops = [getattr(torch.ops.aten, name).input for name in RECURRENT]
    saved = [(op, key, op.py_kernels.get(key)) for op in ops for key in _KEYS]
    tabled = {op: decomposition_table[op] for op in ops if op in decomposition_table}
    for op, key, original in saved:
        if original is not None:
            op.py_kernels[key] = _shaped(original)
        op._dispatch_cache.clear()
    decomposition_table.update({op: _shaped(original) for op, original in tabled.items()})
    return saved, tabled


def _restore_recurrent(saved: list[Any], tabled: dict[Any, Any]) -> None:
    from torch._decomp import decomposition_table

    for op, key, original in saved:
        if original is not None:
            op.py_kernels[key] = original
        op._dispatch_cache.clear()
    decomposition_table.update(tabled)


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
