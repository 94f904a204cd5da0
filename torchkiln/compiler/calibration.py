"""Calibration data: the user's example batches, checked one at a time against the program inputs.

``compile(..., calibration_data=...)`` accepts any iterable (a list, a generator, a DataLoader) whose
items are what the model is called with: a tensor, a tuple/list of positional tensors, or a dict of
keyword tensors. Batches are validated as they stream past, so a long dataset is never held in
memory; the error for a bad batch names its index and the input at fault.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from torchkiln.compiler.program import Constant, TensorSpec, bind_inputs, fresh
from torchkiln.errors import InputError, KilnError

#: ``progress(iterable, total, description)`` wraps an iterable with a progress display.
ProgressBar = Callable[[Iterable[Any], "int | None", str], Iterable[Any]]


def no_progress(items: Iterable[Any], total: int | None, description: str) -> Iterable[Any]:
    return items


def tqdm_progress(items: Iterable[Any], total: int | None, description: str) -> Iterable[Any]:
    """A tqdm bar on stderr (hidden when stderr is not a terminal); ``[rank r]`` first under torchrun."""
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=rank_prefixed(description), unit="batch", disable=None, leave=False)


def rank_prefixed(line: str) -> str:
    """``[rank r] line`` under torchrun (``WORLD_SIZE`` > 1), else ``line``."""
    return f"[rank {os.environ.get('RANK', '0')}] {line}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else line


MAX_HELD_BACK = 4
#: batches a source without a stated count may yield before it is taken for an endless one
MAX_BATCHES = 100_000


def take(source: Iterable[Any], limit: int | None, what: str, progress: ProgressBar = no_progress) -> list[Any]:
    """The first ``limit`` batches of ``source`` (all of them without a limit), read one at a time:
    an endless generator is never materialised before it is cut; without a limit one that yields
    over :data:`MAX_BATCHES` is an InputError rather than a machine out of memory."""
    if isinstance(source, (torch.Tensor, str, bytes)) or not isinstance(source, Iterable):
        raise InputError(f"{what} must be an iterable of batches, got {type(source).__name__}", where=what)
    if limit is not None and limit < 1:
        raise InputError(f"{what}: the number of batches must be >= 1, got {limit}", where=what)
    cap = limit if limit is not None else MAX_BATCHES + 1
    total = min(cap, len(source)) if isinstance(source, Sequence) else limit
    batches = list(progress(itertools.islice(guarded(source, what), cap), total, f"reading {what}"))
    if limit is None and len(batches) > MAX_BATCHES:
        raise InputError(f"{what} yields more than {MAX_BATCHES} batches (endless?)", where=what,
                         hint="say how many to use (a recipe's batches = N; itertools.islice in Python)")  # fmt: skip
    return batches


def guarded(source: Iterable[Any], what: str) -> Iterator[Any]:
    """``source``'s items; an exception its iterator raises (a data loader's OSError, a bug in the
    user's generator) is an :class:`InputError` naming ``what`` and the batch it was reading."""
    index = 0
    iterator = iter(source)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except KilnError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: any exception is theirs to see, named
            raise InputError(f"{what}: reading batch {index} failed: {type(exc).__name__}: {exc}", where=what,
                             hint=f"the error came from the iterable passed as {what}") from exc  # fmt: skip
        yield item
        index += 1


def held_back_count(source: Any) -> int:
    """How many of a list's batches :func:`hold_back` keeps back: ``max(1, min(4, n // 8))`` of
    ``n >= 2``; none of other iterables."""
    if not isinstance(source, Sequence) or isinstance(source, (str, bytes, torch.Tensor)) or len(source) < 2:
        return 0
    return max(1, min(MAX_HELD_BACK, len(source) // 8))


#: a dynamic axis that may be 0 in a batch: a prompt's empty cache (causal_lm names it)
CACHE_AXIS = "past"


class Expanded(list):  # type: ignore[type-arg]
    """Graph inputs expanded from the user's batches (a prompt → its prefill and decode steps): the
    last ``held_back`` come from the batches held back; ``what`` says how they were expanded."""

    def __init__(self, calibrate: Iterable[Any], held: Iterable[Any], what: str):
        held = list(held)
        super().__init__([*calibrate, *held])
        self.held_back, self.what = len(held), what


def hold_back(source: Any) -> tuple[Any, list[Any]]:
    """Split calibration data into batches to calibrate on and batches held back to check lossy
    promises on data the calibration never saw: the last ``max(1, min(4, n // 8))`` of a list of
    ``n >= 2`` batches. Other iterables (generators, DataLoaders) are streamed whole and hold
    nothing back (the report says so)."""
    count = source.held_back if isinstance(source, Expanded) else held_back_count(source)
    if not count:
        return source, []
    return list(source[: len(source) - count]), list(source[len(source) - count :])


class CalibrationData:
    """Validated flat input tuples from the user's iterable (re-iterable when the source is)."""

    def __init__(self, source: Any, specs: Sequence[TensorSpec], constants: Mapping[str, Constant] | None = None):
        if isinstance(source, (torch.Tensor, str, bytes)) or not isinstance(source, Iterable):
            raise InputError(
                f"calibration data must be an iterable of input batches, got {type(source).__name__}",
                hint="pass a list of example inputs (tensors, tuples or dicts) or a DataLoader",
            )
        self.source = source
        self.specs = list(specs)
        self.constants = dict(constants or {})

    def total(self) -> int | None:
        try:
            return len(self.source)  # type: ignore[arg-type]
        except TypeError:
            return None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        count = 0
        for index, item in enumerate(guarded(self.source, "calibration_data")):
            yield self._bind(index, item)
            count += 1
        if count == 0:
            raise InputError(
                "calibration data is empty",
                hint="pass at least one batch; a few hundred samples from the training set is typical",
            )

    def _bind(self, index: int, item: Any) -> tuple[torch.Tensor, ...]:
        args: tuple[Any, ...]
        if isinstance(item, Mapping):
            args, kwargs = (), dict(item)
        elif isinstance(item, (tuple, list)):
            args, kwargs = tuple(item), {}
        else:
            args, kwargs = (item,), {}
        try:
            flat = bind_inputs(self.specs, args, kwargs, self.constants)
        except KilnError as exc:
            hint = exc.hint
            if isinstance(item, (tuple, list)) and len(item) > len(self.specs):
                hint = "yield model inputs only, e.g. `(x for x, _ in loader)` for (input, label) batches"
            raise InputError(f"calibration batch {index}: {exc.message}", where=exc.where, hint=hint) from None
        for spec, tensor in zip(self.specs, flat):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise InputError(
                    f"calibration batch {index}: input '{spec.name}' contains NaN or Inf",
                    where=spec.name,
                    hint="calibration ranges would be meaningless; clean the data first",
                )
            empty = [axis for axis, size in enumerate(tensor.shape) if size == 0]
            if empty and not all(axis < len(spec.shape) and spec.shape[axis] == CACHE_AXIS for axis in empty):
                raise InputError(
                    f"calibration batch {index}: input '{spec.name}' has no elements (shape {list(tensor.shape)})",
                    where=spec.name,
                    hint="drop empty batches from the calibration data",
                )
        return fresh(flat)  # a graph that writes into its inputs must not change the user's data
