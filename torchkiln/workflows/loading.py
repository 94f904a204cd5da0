"""Loading what a user names: a model (zoo name, ``file.py:factory``, ``package.module:factory`` or
a Hugging Face ``save_pretrained`` directory), a callable (a data source or a metric) and a weights file.

Shared by every workflow and command: the recipe's ``[model]``, ``kiln export MODEL``, ``kiln compare``.
Every failure is a ConfigError naming what was named (a file, a factory, a weights file), never a
traceback from inside the user's module.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchkiln.compiler.files import names_existing
from torchkiln.errors import ConfigError
from torchkiln.workflows import tasks

if TYPE_CHECKING:
    from torchkiln.models import ZooEntry


def load_model(spec: str, task: str | None = None) -> tuple[nn.Module, ZooEntry | None]:
    """A zoo name, ``file.py:factory``, ``package.module:factory`` or a Hugging Face model
    directory (for ``task``, see :mod:`torchkiln.workflows.tasks`) → model in eval mode."""

    if tasks.is_pretrained_directory(spec):
        return tasks.load_pretrained(spec, task), None
    if ":" not in spec:
        from torchkiln import models  # the zoo only when asked for: `import torchkiln` stays light

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


def files_read(model: str, **data: str | None) -> list[tuple[str, Path]]:
    """``(what, path)`` for the files a run reads, for the destination check (a writer never
    replaces them): the model spec's file or directory (``file.py:factory``, a Hugging Face
    directory; not a zoo or package name) and each named data file that exists."""
    found = []
    location = model.rpartition(":")[0] if ".py:" in model else model
    if names_existing(location):
        found.append(("the model", Path(location)))
    for what, value in data.items():
        if value and names_existing(value):
            found.append((f"the {what}", Path(value)))
    return found


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
        if not names_existing(path, "file"):
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


def load_weights(model: nn.Module, path: str | Path, where: str) -> None:
    """A state dict (``torch.load`` with ``weights_only=True``: loading runs no code) into ``model``."""
    try:
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    except Exception as exc:
        raise ConfigError(f"cannot load weights {path}: {type(exc).__name__}: {exc}", where=where) from None
