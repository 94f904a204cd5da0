"""What the CLI commands share: the MODEL / --input / --dynamic arguments and the stage printer.

Loading what MODEL names is :mod:`torchkiln.workflows.loading` (a Python user calls it too)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch

from torchkiln import models
from torchkiln.compiler import arguments
from torchkiln.compiler.budget import check_allocation
from torchkiln.compiler.program import dtype_from_name
from torchkiln.compiler.verify import Tolerance
from torchkiln.errors import ConfigError, InputError
from torchkiln.workflows.data import load_batches

INTEGER_HIGH = 100


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="zoo name (see `kiln models`), path/to/file.py:factory, package.module:factory, or a Hugging "
        "Face model directory (save_pretrained; loaded from local files, no remote code)",
    )
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SPEC",
        help="example input as [name=]1x3x224x224[:dtype[:high]]; repeat for several inputs. "
        "Zoo models have defaults. Integer inputs are drawn from [0, high), high defaults to 100",
    )
    parser.add_argument(
        "--frontend", choices=("auto", "fx", "export"), default="auto", help="graph capture (default: auto)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random example inputs (default: 0)")


def add_native_code_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-native-code",
        action="store_true",
        help="load an artifact that is native code (an inductor package's shared library runs when loaded); "
        "only for artifacts you trust",
    )


def tolerance_from_flags(atol: float | None, rtol: float | None) -> Tolerance | None:
    """``--atol`` / ``--rtol``, either alone (the other keeps its default); None when neither is
    given (the pipeline's promise applies). Tolerance itself refuses NaN and negative values."""
    if atol is None and rtol is None:
        return None
    default = Tolerance()
    return Tolerance(atol=default.atol if atol is None else atol, rtol=default.rtol if rtol is None else rtol)


def stage_printer(quiet: bool) -> Callable[[str], None] | None:
    """``kiln: <stage>`` lines on stderr (stdout stays for the report), or None with --quiet; under
    torchrun (``WORLD_SIZE`` > 1) ``kiln [rank r]: <stage>``."""
    if quiet:
        return None
    prefix = f"kiln [rank {os.environ.get('RANK', '0')}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "kiln"
    return lambda stage: print(f"{prefix}: {stage}", file=sys.stderr, flush=True)


def parse_input(text: str, default_name: str) -> tuple[str, tuple[int, ...], torch.dtype, int]:
    """``[name=]1x3x224x224[:dtype[:high]]`` → (name, shape, dtype, high)."""
    name, eq, rest = text.partition("=")
    if not eq:
        name, rest = default_name, text
    shape_text, _, type_text = rest.partition(":")
    dtype_text, _, high_text = type_text.partition(":")
    try:
        shape = tuple(int(d) for d in shape_text.lower().split("x"))
        high = int(high_text) if high_text else INTEGER_HIGH
    except ValueError:
        raise InputError(
            f"bad --input '{text}'", where=text, hint="write e.g. 1x3x224x224 or ids=1x128:int64:30522"
        ) from None
    if any(d <= 0 for d in shape):
        raise InputError(f"bad --input '{text}': sizes must be positive", where=text)
    dtype = dtype_from_name(dtype_text or "float32")
    if dtype not in _INPUT_DTYPES:
        raise InputError(
            f"bad --input '{text}': dtype {dtype_text} is not supported for generated inputs",
            where=text,
            hint=f"use one of {', '.join(sorted(_INPUT_DTYPES.values()))}",
        )
    if not dtype.is_floating_point and dtype is not torch.bool:
        top = torch.iinfo(dtype).max + 1
        if not 1 <= high <= top:
            raise InputError(
                f"bad --input '{text}': integers are drawn from [0, high); high must be in [1, {top}] for "
                f"{dtype_text}, got {high}",
                where=text,
            )
    elements = math.prod(shape)
    size = elements * torch.empty((), dtype=dtype).element_size()
    if size > MAX_INPUT_BYTES:
        raise InputError(
            f"bad --input '{text}': {elements:,} elements ({size / 2**30:,.1f} GiB) is more than an example "
            f"input needs (limit {MAX_INPUT_BYTES / 2**30:.0f} GiB)",
            where=text,
            hint="give the shape of one real batch, e.g. 1x3x224x224",
        )
    return name.strip(), shape, dtype, high


MAX_INPUT_BYTES = 4 * 2**30
MAX_SEED = 2**63 - 1
_INPUT_DTYPES = {
    getattr(torch, n): n
    for n in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}


def example_inputs(args: argparse.Namespace, entry: models.ZooEntry | None) -> dict[str, torch.Tensor]:
    arguments.integer("--seed", args.seed, low=0, high=MAX_SEED)  # torch.Generator takes 64 bits
    if not args.input:
        if entry is None:
            raise InputError(
                "--input is required for a model that is not in the zoo", hint="e.g. --input 1x3x224x224"
            )
        return entry.example_inputs(seed=args.seed)
    zoo_names = [i.name for i in entry.inputs] if entry else []
    generator = torch.Generator().manual_seed(args.seed)
    tensors = {}
    for index, text in enumerate(args.input):
        default = zoo_names[index] if index < len(zoo_names) else ("x" if index == 0 else f"input_{index}")
        name, shape, dtype, high = parse_input(text, default)
        cost = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        check_allocation("--input", text, cost, f"input '{name}'", ConfigError)
        try:
            if dtype.is_floating_point:
                tensors[name] = torch.randn(shape, generator=generator).to(dtype)
            elif dtype is torch.bool:
                tensors[name] = torch.randint(0, 2, shape, generator=generator).bool()
            else:
                tensors[name] = torch.randint(0, high, shape, generator=generator, dtype=dtype)
        except (MemoryError, RuntimeError) as exc:  # within the budget, yet the allocator (or a ulimit) said no
            raise InputError(f"cannot allocate input '{name}' ({cost / 2**30:.2f} GiB): {str(exc).splitlines()[0][:120]}",
                             where="--input", hint="give the shape of one real batch, e.g. 1x3x224x224") from exc  # fmt: skip
    return tensors


def calibration_batches(
    args: argparse.Namespace, entry: models.ZooEntry | None, example: dict[str, torch.Tensor]
) -> list[Any] | None:
    """``--calibration FILE.pt|FILE.npz|random:N`` → batches (None without the option)."""
    source = args.calibration
    if not source:
        return None
    if source.startswith("random:"):
        count = source.removeprefix("random:")
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"bad --calibration '{source}'", where=source, hint="write random:N with N >= 1"
            )
        batch = sum(t.numel() * t.element_size() for t in example.values())
        check_allocation("--calibration", source, batch * int(count), f"{count} batches like the example", ConfigError)
        seeds = [(args.seed + k) % (MAX_SEED + 1) for k in range(1, 1 + int(count))]
        return [example_inputs(argparse.Namespace(**{**vars(args), "seed": s}), entry) for s in seeds]
    batch = next(iter(example.values())).shape[0] if example else 1
    return load_batches(source, list(example), max(int(batch), 1))


def parse_dynamic(items: list[str], batch: bool, names: list[str]) -> dict[str, dict[int, str]] | None:
    """``--dynamic-batch`` and ``--dynamic name:axis=dim`` → dynamic_axes."""
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names} if batch else {}
    for item in items:
        target, _, dim = item.partition("=")
        name, _, axis = target.partition(":")
        if not (name and axis.lstrip("-").isdigit()):
            raise ConfigError(
                f"bad --dynamic '{item}'", where=item, hint="write input:axis=name, e.g. input_ids:1=sequence"
            )
        axes.setdefault(name, {})[int(axis)] = dim or f"{name}_dim{axis}"
    return axes or None


def plain(text: str | None) -> str | None:
    """reST inline markup (``code``, :mod:`x`, :class:`~a.b`) as plain text."""
    if text is None:
        return None
    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).count("~") else m.group(1), text)
    return text.replace("``", "")
