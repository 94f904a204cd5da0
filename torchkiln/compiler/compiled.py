"""``CompiledModel``: a backend artifact callable like the original model, and its directory form.

A saved directory holds the backend's files and ``manifest.json``: input/output specs, the output
structure, backend and options, passes, tool versions, the report, and a SHA-256 of every file so
that a truncated or edited artifact is refused on load instead of giving wrong answers.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from torch.utils import _pytree as pytree

from torchkiln.backends import Artifact, BackendOptions, backend_options, get_backend
from torchkiln.compiler.files import atomic_directory, sha256, write_text_atomic
from torchkiln.compiler.program import TensorSpec, bind_inputs, unflatten_outputs
from torchkiln.compiler.report import Report
from torchkiln.errors import ArtifactError, KilnError

MANIFEST = "manifest.json"
FORMAT = "torchkiln-artifact"
FORMAT_VERSION = 1


class CompiledModel:
    """Call it like the model: ``compiled(x)`` or ``compiled(input_ids=..., mask=...)``."""

    def __init__(
        self,
        artifact: Artifact,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        out_spec: pytree.TreeSpec,
        report: Report,
        options: BackendOptions,
        passes: list[str],
    ):
        self.artifact = artifact
        self.inputs = inputs
        self.outputs = outputs
        self.out_spec = out_spec
        self.report = report
        self.options = options
        self.passes = passes

    @property
    def backend(self) -> str:
        return self.artifact.backend

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = bind_inputs(self.inputs, args, kwargs)
        return unflatten_outputs(self.artifact.run(flat), self.out_spec)

    def __repr__(self) -> str:
        inputs = ", ".join(f"{s.name}: {s.dtype}{s.pretty_shape()}" for s in self.inputs)
        return f"<CompiledModel {self.report.model} backend={self.backend} ({inputs})>"

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the artifact and its manifest atomically; return the directory."""
        with atomic_directory(directory) as staging:
            self.write(staging)
        return Path(directory)

    def write(self, staging: Path, extra: dict[str, Any] | None = None) -> list[str]:
        """Write the backend files and ``manifest.json`` (plus ``extra`` manifest entries) into an
        existing directory — the staging directory of an atomic save; returns the files' names."""
        files = self.artifact.save(staging)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.report.model,
            "backend": self.backend,
            "backend_options": _jsonable(self.options.to_dict()),
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "out_spec": portable_spec(self.out_spec),
            "passes": self.passes,
            "versions": versions(),
            "files": {name: sha256(staging / name) for name in files},
            "report": self.report.to_dict(),
            **(extra or {}),
        }
        write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, default=str))
        return files


def portable_spec(spec: pytree.TreeSpec) -> str:
    """Serialize the output structure. A NamedTuple class that pytree cannot name is saved as a
    plain tuple (a loaded artifact then returns tuples there); other custom nodes must be
    registered with a serialized name."""
    try:
        return pytree.treespec_dumps(spec)
    except NotImplementedError:
        pass
    plain = _plain_tuples(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))
    try:
        return pytree.treespec_dumps(pytree.tree_structure(plain))
    except NotImplementedError as exc:
        raise ArtifactError(
            f"cannot save the model's output structure: {exc}",
            hint="return tensors in tuples, lists or dicts, or register the type with a serialized name",
        ) from exc


def _plain_tuples(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_plain_tuples(v) for v in value)  # drops the NamedTuple class
    if isinstance(value, list):
        return [_plain_tuples(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain_tuples(v) for k, v in value.items()}
    return value


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torchkiln", "torch", "onnx", "onnxruntime", "onnxscript", "tensorrt"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def load(directory: str | os.PathLike[str]) -> CompiledModel:
    """Load a directory written by :meth:`CompiledModel.save`."""
    path = Path(directory)
    if not path.is_dir():
        raise ArtifactError(
            f"{path} is not a directory", where=str(path), hint="pass the directory given to save()"
        )
    manifest = _read_manifest(path)
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(
                f"artifact file {name} is missing", where=str(file), hint="rebuild the artifact"
            )
        if sha256(file) != digest:
            raise ArtifactError(
                f"artifact file {name} does not match its manifest checksum (truncated or modified)",
                where=str(file),
                hint="rebuild the artifact",
            )
    try:
        options = backend_options(manifest["backend"], manifest["backend_options"])
        inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
        outputs = [TensorSpec.from_dict(s) for s in manifest["outputs"]]
        out_spec = pytree.treespec_loads(manifest["out_spec"])
        report = Report.from_dict(manifest["report"])
    except KilnError as exc:
        raise ArtifactError(f"{MANIFEST} is invalid: {exc.message}", where=str(path / MANIFEST)) from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"{MANIFEST} is invalid: {type(exc).__name__}: {exc}", where=str(path / MANIFEST)
        ) from exc
    artifact = get_backend(manifest["backend"]).load(path, options)
    return CompiledModel(artifact, inputs, outputs, out_spec, report, options, list(manifest["passes"]))


_REQUIRED = ("backend", "backend_options", "inputs", "outputs", "out_spec", "passes", "files", "report")


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"no {MANIFEST} in {path}", where=str(file), hint="is this a torchkiln artifact directory?"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(
            f"{MANIFEST} is unreadable or corrupt: {exc}", where=str(file), hint="rebuild the artifact"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{MANIFEST} is not a torchkiln manifest", where=str(file))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format version {manifest.get('format_version')} is not supported (this torchkiln reads {FORMAT_VERSION})",
            where=str(file),
            hint="rebuild the artifact with this torchkiln version",
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(
            f"{MANIFEST} lacks {', '.join(missing)}", where=str(file), hint="rebuild the artifact"
        )
    return manifest
