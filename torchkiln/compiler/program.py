"""The IR: a :class:`Program` is a flat-calling ``torch.fx.GraphModule`` plus what we know about it.

Calling convention. Whatever structure the user's model takes and returns, the graph module of a
Program takes its input tensors as flat positional arguments (in :attr:`Program.inputs` order) and
returns a flat tuple of tensors. :attr:`Program.out_spec` rebuilds the user's output structure
(tensor, tuple, list, dict) and :func:`bind_inputs` maps a user call ``(*args, **kwargs)`` onto the
flat inputs. Every backend uses the same convention, so outputs come back in the same structure
from all of them.

Checks. A Program carries one or more :class:`Check` s: input sets with the eager model's outputs
on them. The first is the user's example inputs; when the program has dynamic axes a second one
runs at another size along those axes, so passes and backends are verified off the traced shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from torchkiln.errors import InputError

Dim = int | str  # an int is a static size; a str names a dynamic axis
Constant = bool | int | float | str | None  # a non-tensor input, fixed at trace time
CONSTANT_TYPES = (bool, int, float, str, type(None))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"unknown dtype '{name}'", hint="use a torch dtype name such as float32, int64")
    return dtype


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape (named dynamic axes as strings) and dtype of one flat input or output."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    #: ``[low, high)`` the values must lie in, for integer inputs that index an embedding table
    #: (eager raises on an out-of-range id; ONNX Gather would wrap a negative one silently)
    value_range: tuple[int, int] | None = None
    #: what the range comes from, for the error message
    range_source: str | None = None

    def check(self, value: Any) -> None:
        """Raise InputError unless ``value`` is a tensor this spec accepts."""
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"input '{self.name}' must be a torch.Tensor, got {type(value).__name__}",
                where=self.name,
                hint=f"pass a tensor of shape {self.pretty_shape()} and dtype {self.dtype}",
            )
        if value.layout != torch.strided or value.is_meta or value.is_quantized:
            kind = "a meta tensor" if value.is_meta else f"a {str(value.layout).removeprefix('torch.')} tensor"
            raise InputError(
                f"input '{self.name}' is {kind}; the artifact computes on dense tensors with data",
                where=self.name,
                hint="pass a dense tensor (.to_dense(), or real data instead of a meta tensor)",
            )
        if dtype_name(value.dtype) != self.dtype:
            raise InputError(
                f"input '{self.name}' has dtype {dtype_name(value.dtype)}, expected {self.dtype}",
                where=self.name,
                hint=f"convert it with .to(torch.{self.dtype})",
            )
        shape = tuple(value.shape)
        fits = len(shape) == len(self.shape) and all(
            isinstance(want, str) or want == got for want, got in zip(self.shape, shape)
        )
        if not fits:
            hint = (
                "compile with dynamic_axes to accept other sizes" if len(shape) == len(self.shape) else None
            )
            raise InputError(
                f"input '{self.name}' has shape {list(shape)}, expected {self.pretty_shape()}",
                where=self.name,
                hint=hint,
            )
        self._check_range(value)

    def _check_range(self, value: torch.Tensor) -> None:
        if self.value_range is None or value.numel() == 0:
            return
        low, high = self.value_range
        smallest, largest = int(value.min()), int(value.max())
        if smallest < low or largest >= high:
            raise InputError(
                f"input '{self.name}' has values in [{smallest}, {largest}], outside [{low}, {high})"
                + (f": they index {self.range_source}" if self.range_source else ""),
                where=self.name,
                hint=f"ids must be in [{low}, {high - 1}]",
            )

    def pretty_shape(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.value_range is not None:
            data["range"], data["range_source"] = list(self.value_range), self.range_source
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        shape = tuple(data["shape"])
        if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"bad shape {list(shape)!r} for input '{data['name']}'")
        bounds = data.get("range")
        if bounds is not None and not (
            isinstance(bounds, list) and len(bounds) == 2 and all(type(b) is int for b in bounds)
        ):
            raise ValueError(f"bad range {bounds!r} for input '{data['name']}'")
        source = data.get("range_source")
        return cls(
            str(data["name"]), shape, str(data["dtype"]),
            tuple(bounds) if bounds is not None else None, str(source) if source is not None else None,
        )  # fmt: skip

    @classmethod
    def of(
        cls,
        name: str,
        tensor: torch.Tensor,
        axes: Mapping[int, str] | None = None,
        value_range: tuple[int, int] | None = None,
        range_source: str | None = None,
    ) -> TensorSpec:
        axes = axes or {}
        shape = tuple(axes.get(i, int(n)) for i, n in enumerate(tensor.shape))
        return cls(name, shape, dtype_name(tensor.dtype), value_range, range_source)


@dataclasses.dataclass
class Check:
    """Inputs and the eager model's outputs on them."""

    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


@dataclasses.dataclass
class Program:
    graph_module: fx.GraphModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    out_spec: pytree.TreeSpec
    flavour: str  # "fx" (module calls) or "export" (ATen calls from torch.export)
    checks: list[Check]
    name: str = "model"
    notes: list[str] = dataclasses.field(default_factory=list)
    #: Calibration batches held back from calibration, with the eager outputs on them: lossy
    #: promises (and the artifact) are also checked on these, which calibration never saw.
    held_back: list[Check] = dataclasses.field(default_factory=list)
    #: Calibration batches for data-driven passes (quantization); set by ``compile``.
    calibration: Any = dataclasses.field(default=None, repr=False)
    #: ``progress(iterable, total, description)`` for long loops inside passes; passes never print.
    progress: Any = dataclasses.field(default=None, repr=False)
    #: Training / validation batches and the eager teacher for passes that train (distill).
    training: Any = dataclasses.field(default=None, repr=False)
    validation: Any = dataclasses.field(default=None, repr=False)
    teacher: Any = dataclasses.field(default=None, repr=False)
    #: Non-tensor example inputs (``use_cache=False``) baked into the graph as constants: a call
    #: may repeat them, never change them (:func:`bind_inputs`).
    constants: dict[str, Constant] = dataclasses.field(default_factory=dict)

    def eager_kwargs(self, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments that call the eager model as traced: the tensors and the constants."""
        return dict(zip((s.name for s in self.inputs), tensors)) | self.constants

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.checks[0].inputs

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            spec.name: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            for spec in self.inputs
            if any(isinstance(d, str) for d in spec.shape)
        }

    def run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with deterministic():
            return tuple(self.graph_module(*fresh(inputs)))


def fresh(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Copies to run a model or graph on: one that writes into its inputs (``x.relu_()``) must
    change neither the caller's tensors nor the stored checks."""
    return tuple(t.clone() for t in tensors)


@contextlib.contextmanager
def deterministic(seed: int = 0) -> Iterator[None]:
    """No grad, and the same random stream for every reference and graph run, so that a model
    with random ops (Dropout in training mode) compares equal to its own graph."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        yield


def bind_inputs(
    specs: Sequence[TensorSpec],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    constants: Mapping[str, Constant] | None = None,
) -> list[torch.Tensor]:
    """Map a call ``(*args, **kwargs)`` onto the flat inputs, checking each against its spec.
    ``constants`` (by keyword only) may be given again, with the value they were compiled with."""
    names = [s.name for s in specs]
    constants = constants or {}
    if len(args) > len(specs):
        raise InputError(
            f"expected at most {len(specs)} positional inputs ({', '.join(names)}), got {len(args)}"
            + (f"; {', '.join(constants)} can only be given by name" if constants else "")
        )
    values: dict[str, Any] = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in constants:
            check_constant(key, constants[key], value)
            continue
        if key not in names:
            known = ", ".join([*names, *constants])
            raise InputError(f"unexpected input '{key}'", where=key, hint=f"inputs are: {known}")
        if key in values:
            raise InputError(f"input '{key}' given both by position and by name", where=key)
        values[key] = value
    missing = [n for n in names if n not in values]
    if missing:
        raise InputError(f"missing input(s): {', '.join(missing)}", hint=f"inputs are: {', '.join(names)}")
    for spec in specs:
        spec.check(values[spec.name])
    check_sums(specs, [values[n] for n in names])
    return [values[n] for n in names]


def check_sums(specs: Sequence[TensorSpec], values: Sequence[torch.Tensor]) -> None:
    """An axis named for a sum of others (a causal LM's mask spans ``past+sequence``) must be that sum
    of the sizes the other inputs give those axes: a mask of another length made ONNX Runtime fail
    deep in a ``GatherND`` ("invalid index") and could read past the cache elsewhere."""
    sizes: dict[str, int] = {}
    for spec, value in zip(specs, values):
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and "+" not in dim:
                sizes.setdefault(dim, int(value.shape[axis]))
    for spec, value in zip(specs, values):
        for axis, dim in enumerate(spec.shape):
            if not isinstance(dim, str) or "+" not in dim:
                continue
            parts = dim.split("+")
            if all(p in sizes for p in parts) and int(value.shape[axis]) != sum(sizes[p] for p in parts):
                given = " + ".join(f"{p} {sizes[p]}" for p in parts)
                raise InputError(
                    f"input '{spec.name}' has {value.shape[axis]} on axis {axis} ({dim}); the other inputs give {given}"
                    f" = {sum(sizes[p] for p in parts)}",
                    where=spec.name,
                    hint=f"make '{spec.name}' cover {dim}: e.g. a causal LM's mask spans the cache and the new tokens",
                )


def check_constant(name: str, compiled: Constant, given: Any) -> None:
    """A constant input may be passed again only with the value it was compiled with."""
    if type(given) is not type(compiled) or given != compiled:
        raise InputError(
            f"input '{name}' was compiled as the constant {compiled!r}; got {given!r}",
            where=name,
            hint=f"omit it or pass {name}={compiled!r}; compile again with {name}={given!r} for that behaviour",
        )


def unflatten_outputs(flat: Sequence[torch.Tensor], out_spec: pytree.TreeSpec) -> Any:
    return pytree.tree_unflatten(list(flat), out_spec)
