"""What the CLI commands share: loading MODEL arguments and parsing --input / --dynamic."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln import models
from torchkiln.compiler.program import dtype_from_name
from torchkiln.compiler.verify import Tolerance
from torchkiln.data import load_batches
from torchkiln.errors import ConfigError, InputError

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


def load_model(spec: str, task: str | None = None) -> tuple[nn.Module, models.ZooEntry | None]:
    """A zoo name, ``file.py:factory``, ``package.module:factory`` or a Hugging Face model
    directory (for ``task``, see :mod:`torchkiln.cli.tasks`) → model in eval mode."""
    from torchkiln.cli import tasks

    if tasks.is_pretrained_directory(spec):
        return tasks.load_pretrained(spec, task), None
    if ":" not in spec:
        entry = models.get(spec)
        return entry.build(), entry
    location, _, factory_name = spec.rpartition(":")
    module = _import(location, spec)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConfigError(
            f"'{factory_name}' is not a callable in {location}", where=spec, hint="MODEL is path.py:factory"
        )
    try:
        model = factory()
    except Exception as exc:
        raise ConfigError(
            f"calling {factory_name}() failed: {type(exc).__name__}: {exc}", where=spec
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{factory_name}() returned a {type(model).__name__}, not a torch.nn.Module", where=spec
        )
    return model.eval(), None


def load_callable(spec: str, what: str = "function") -> Any:
    """``path/to/file.py:name`` or ``package.module:name`` → the callable."""
    location, _, name = spec.rpartition(":")
    if not location or not name:
        raise ConfigError(
            f"bad {what} '{spec}'", where=spec, hint="write path/to/file.py:name or package.module:name"
        )
    found = getattr(_import(location, spec), name, None)
    if not callable(found):
        raise ConfigError(f"'{name}' is not a callable in {location}", where=spec)
    return found


def _import(location: str, spec: str) -> Any:
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist", where=spec)
        # A unique module name: the file's bare stem could shadow a real package (a model file
        # called onnx.py or json.py would replace `onnx` for everything imported after it).
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        module_name = f"torchkiln_user.{_identifier(path.stem)}_{digest}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"importing {path} failed: {type(exc).__name__}: {exc}", where=spec) from exc
        return module
    try:
        return importlib.import_module(location)
    except ImportError as exc:
        raise ConfigError(f"cannot import module '{location}': {exc}", where=spec) from exc


def _identifier(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in text)
    return cleaned if cleaned[:1].isalpha() or cleaned[:1] == "_" else f"m_{cleaned}"


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
_INPUT_DTYPES = {
    getattr(torch, n): n
    for n in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}


def example_inputs(args: argparse.Namespace, entry: models.ZooEntry | None) -> dict[str, torch.Tensor]:
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
        if dtype.is_floating_point:
            tensors[name] = torch.randn(shape, generator=generator).to(dtype)
        elif dtype is torch.bool:
            tensors[name] = torch.randint(0, 2, shape, generator=generator).bool()
        else:
            tensors[name] = torch.randint(0, high, shape, generator=generator, dtype=dtype)
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
        seeds = range(args.seed + 1, args.seed + 1 + int(count))
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
