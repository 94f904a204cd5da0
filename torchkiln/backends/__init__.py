"""Backends, looked up by name. Each lives in its own module, imported only when used, so that
``import torchkiln`` never pulls in onnx, onnxruntime or tensorrt."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, cast

from torchkiln.backends.base import Artifact, Backend, BackendOptions
from torchkiln.errors import ConfigError

_MODULES = {
    "torch": "torchkiln.backends.torch_backend",
    "onnx": "torchkiln.backends.onnx_backend",
    "onnxruntime": "torchkiln.backends.onnxruntime_backend",
    "tensorrt": "torchkiln.backends.tensorrt_backend",
    "inductor": "torchkiln.backends.inductor_backend",
    "openvino": "torchkiln.backends.openvino_backend",
}

BACKEND_NAMES = tuple(_MODULES)


def get_backend(name: str) -> Backend:
    if name not in _MODULES:
        raise ConfigError(
            f"unknown backend '{name}'", where="backend", hint=f"choose one of {', '.join(_MODULES)}"
        )
    backend: Backend = importlib.import_module(_MODULES[name]).BACKEND
    return backend


def backend_options(name: str, options: Mapping[str, Any] | BackendOptions | None) -> BackendOptions:
    backend = get_backend(name)
    if isinstance(options, BackendOptions):
        if not isinstance(options, backend.Options):
            raise ConfigError(f"options of type {type(options).__name__} do not belong to backend '{name}'")
        return options
    if options is not None and not isinstance(options, Mapping):
        raise ConfigError(
            f"backend_options must be a mapping of option names to values, got {type(options).__name__}",
            where="backend_options",
            hint='e.g. backend_options={"opset": 19}',
        )
    return cast(BackendOptions, backend.Options.from_mapping(options or {}, owner=f"backend {name}"))


__all__ = ["Artifact", "Backend", "BackendOptions", "BACKEND_NAMES", "backend_options", "get_backend"]
