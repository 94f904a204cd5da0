"""``CompiledModel``: a backend artifact callable like the original model, and its directory form.

A saved directory holds the backend's files and ``manifest.json``: input/output specs, the output
structure, backend and options, passes, tool versions, the report, and a SHA-256 of every file so
that a truncated or edited artifact is refused on load instead of giving wrong answers.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from torchkiln.backends import Artifact, BackendOptions, backend_options, get_backend
from torchkiln.compiler import arguments
from torchkiln.compiler.files import (
    MARKERS,
    ChecksumMismatch,
    atomic_directory,
    check_member_name,
    copy_verified,
    open_directory,
    parse_json,
    private_directory,
    read_member,
    remove_private,
    resolve_interrupted,
    same_file,
    sha256,
    write_atomic,
)
from torchkiln.compiler.program import (
    CONSTANT_TYPES,
    Constant,
    TensorSpec,
    bind_inputs,
    dtype_name,
    unflatten_outputs,
)
from torchkiln.compiler.report import Report
from torchkiln.errors import ArtifactError, KilnError

MANIFEST, FORMAT = MARKERS["artifact"]  # the destination policy's marker of an artifact
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
        constants: dict[str, Constant] | None = None,
        generation: dict[str, int | None] | None = None,
    ):
        self.artifact = artifact
        self.inputs = inputs
        self.outputs = outputs
        self.out_spec = out_spec
        self.report = report
        self.options = options
        self.passes = passes
        #: non-tensor inputs compiled in (``use_cache=False``): a call may repeat, not change them
        self.constants = dict(constants or {})
        #: a causal LM's special tokens and positions (:func:`torchkiln.compiler.causal_lm.generation_settings`)
        self.generation = dict(generation) if generation else None
        #: a loaded artifact's outputs are held to its manifest on every call (set by :func:`load`)
        self.declared_outputs = False

    @property
    def backend(self) -> str:
        return self.artifact.backend

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = bind_inputs(self.inputs, args, kwargs, self.constants)
        results = self.artifact.run(flat)
        if self.declared_outputs:
            check_outputs(results, self.outputs)
        return unflatten_outputs(results, self.out_spec)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **settings: Any
    ) -> torch.Tensor:
        """Prompt + generated tokens, for an artifact compiled with its KV cache: greedy, or
        sampled with ``do_sample``; settings as :func:`torchkiln.driver.generate.generate`."""
        from torchkiln.driver.generate import generate

        return generate(self, input_ids, attention_mask, **settings)

    def __repr__(self) -> str:
        inputs = ", ".join(f"{s.name}: {s.dtype}{s.pretty_shape()}" for s in self.inputs)
        return f"<CompiledModel {self.report.model} backend={self.backend} ({inputs})>"

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the artifact and its manifest atomically; return the directory. An existing
        directory is replaced only if it is empty or a torchkiln artifact."""
        with atomic_directory(directory, "artifact") as staging:
            self.write(staging)
        return Path(directory)

    def saved_bytes(self) -> int:
        """The bytes :meth:`save` writes (backend files and manifest), measured by writing them to a
        private directory: an artifact's size on every backend, including those whose report has no
        file size."""
        private = private_directory("torchkiln-size-")
        try:
            self.write(private)
            return sum(path.stat().st_size for path in private.rglob("*") if path.is_file())
        finally:
            remove_private(private)

    def write(self, staging: Path, extra: dict[str, Any] | None = None) -> list[str]:
        """Write the backend files and ``manifest.json`` (plus ``extra`` manifest entries) into an
        existing directory — the staging directory of an atomic save; returns the files' names."""
        files = self.artifact.save(staging)
        if not files:  # load() refuses a manifest without files: never write one
            raise ArtifactError(f"the {self.backend} artifact wrote no files", hint="report this as a bug")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.report.model,
            "backend": self.backend,
            "backend_options": _jsonable(self.options.to_dict()),
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "constants": self.constants,
            **({"generation": self.generation} if self.generation else {}),
            "out_spec": portable_spec(self.out_spec),
            "passes": self.passes,
            "versions": versions(),
            "files": {name: sha256(staging / name) for name in files},
            "report": self.report.to_dict(),
            **(extra or {}),
        }
        write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, default=str))
        return files


ENCODER_DECODER = "encoder-decoder"
PARTS = ("encoder", "decoder")


class CompiledEncoderDecoder(CompiledModel):
    """An encoder-decoder LM compiled with its cache (:mod:`torchkiln.compiler.seq2seq`): ``encoder``
    (prompt → cross-attention cache) and ``decoder`` (one step over the caches). As a
    :class:`CompiledModel` it is the decoder (its inputs, outputs, report, call); ``generate`` runs
    both. Saved as one directory: a manifest naming the two parts, each a complete artifact in its
    own subdirectory whose manifest's SHA-256 the top manifest holds."""

    def __init__(self, encoder: CompiledModel, decoder: CompiledModel, generation: dict[str, int | None] | None):
        super().__init__(
            decoder.artifact, decoder.inputs, decoder.outputs, decoder.out_spec, decoder.report, decoder.options,
            decoder.passes, decoder.constants, generation,
        )  # fmt: skip
        self.encoder, self.decoder = encoder, decoder

    def __repr__(self) -> str:
        return f"<CompiledEncoderDecoder {self.encoder!r} {self.decoder!r}>"

    def write(self, staging: Path, extra: dict[str, Any] | None = None) -> list[str]:
        parts = {}
        for part in PARTS:
            (staging / part).mkdir()
            getattr(self, part).write(staging / part)
            parts[part] = sha256(staging / part / MANIFEST)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": ENCODER_DECODER,
            "model": self.report.model, "parts": parts, "generation": self.generation, **(extra or {}),
        }  # fmt: skip
        write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, default=str))
        return [f"{part}/{MANIFEST}" for part in PARTS]


def check_outputs(results: list[Any], specs: list[TensorSpec]) -> None:
    """What a loaded artifact returned against what its manifest declares: as many tensors, each of
    the declared dtype and rank (a graph edited to return something else is refused, not passed on)."""
    if len(results) != len(specs):
        raise ArtifactError(f"the artifact returned {len(results)} outputs; its manifest declares {len(specs)}",
                            hint="rebuild the artifact")  # fmt: skip
    for value, spec in zip(results, specs):
        if not isinstance(value, torch.Tensor) or dtype_name(value.dtype) != spec.dtype or value.dim() != len(spec.shape):
            got = f"{dtype_name(value.dtype)}{list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ArtifactError(f"output '{spec.name}' is {got}; the manifest declares {spec.dtype}{spec.pretty_shape()}",
                                where=spec.name, hint="rebuild the artifact")  # fmt: skip


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


#: the modules whose output classes a saved spec may name and loading may import to register them:
#: transformers' own model-output modules (an import of the installed library, never of the artifact)
_OUTPUT_MODULE = re.compile(r"transformers\.(?:models\.[a-z0-9_]+\.)?modeling_[a-z0-9_]+")
_UNREGISTERED = re.compile(r"Deserializing (\S+) in pytree is not registered")


def load_spec(text: str, where: str) -> pytree.TreeSpec:
    """The output structure saved by :func:`portable_spec`. An output class of transformers (a
    ``ModelOutput``) registers itself with pytree when its module is imported, which a fresh process
    loading a saved BERT has not done: its module is imported then — only a transformers
    ``modeling_*`` module, and only when transformers is installed. Any other unregistered type is
    an :class:`ArtifactError` naming it."""
    for _ in range(8):  # one import per distinct output class in the structure
        try:
            return pytree.treespec_loads(text)
        except NotImplementedError as exc:
            found = _UNREGISTERED.search(str(exc))
            name = found.group(1) if found else "an unregistered type"
            module = name.rpartition(".")[0]
            if not (_OUTPUT_MODULE.fullmatch(module) and importlib.util.find_spec("transformers")):
                raise ArtifactError(
                    f"{MANIFEST}: the output structure names {name}, which pytree does not know here",
                    where=f"{where}:out_spec",
                    hint="import the package that defines it before loading (transformers outputs are "
                    "imported automatically when transformers is installed)",
                ) from None
            try:
                importlib.import_module(module)
            except Exception as error:
                raise ArtifactError(
                    f"{MANIFEST}: the output structure names {name}, whose module cannot be imported: {error}",
                    where=f"{where}:out_spec",
                    hint="install the transformers version the artifact was built with",
                ) from None
    raise ArtifactError(f"{MANIFEST}: the output structure names too many unregistered types", where=f"{where}:out_spec")


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


def load(directory: str | os.PathLike[str], allow_native_code: bool = False) -> CompiledModel:
    """Load a directory written by :meth:`CompiledModel.save`.

    Nothing in the directory is executed or written — unless ``allow_native_code`` is set and the
    artifact is native code by nature (an ``inductor`` package: its kernels are a shared library
    that loading ``dlopen``s); without it such an artifact is an ``ArtifactError`` saying so. Every file the manifest lists must be a plain
    file of the directory; it is copied into a private directory while its SHA-256 is checked, and
    the backend reads only those copies (an unlisted file is never read). A directory replaced by a
    concurrent save while it is read is read again."""
    path = Path(arguments.path("directory", directory))
    arguments.flag("allow_native_code", allow_native_code)
    for attempt in range(20):
        try:
            return _load_once(path, allow_native_code)
        except _Replaced:
            time.sleep(0.01 * attempt)
        except OSError as exc:  # a path the system cannot look at (a name over 255 bytes, a loop of links)
            raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}", where=str(path)) from None
    raise ArtifactError(
        f"{path} kept changing while it was loaded", where=str(path), hint="load it again once it is written"
    )


class _Replaced(Exception):
    """The directory was swapped for another while it was read."""


def _load_once(path: Path, allow_native_code: bool, nested: bool = False) -> CompiledModel:
    source = resolve_interrupted(path)
    if not source.is_dir():
        raise ArtifactError(
            f"{path} is not a directory", where=str(path), hint="pass the directory given to save()"
        )
    private = private_directory("torchkiln-artifact-")
    try:
        with open_directory(source) as fd:
            try:
                manifest = _read_manifest(fd, source)
                if manifest.get("kind") == ENCODER_DECODER:
                    if nested:  # a part is one graph: an encoder-decoder of encoder-decoders would recurse
                        raise ArtifactError(f"{source.name} is an encoder-decoder inside another artifact",
                                            where=str(source / MANIFEST), hint="rebuild the artifact")  # fmt: skip
                    remove_private(private)
                    return _load_pair(fd, source, manifest, allow_native_code)
                for name, digest in manifest["files"].items():
                    try:
                        copy_verified(fd, name, digest, private / name, str(source / name))
                    except ChecksumMismatch:
                        raise ArtifactError(
                            f"artifact file {name} does not match its manifest checksum (truncated or modified)",
                            where=str(source / name),
                            hint="rebuild the artifact",
                        ) from None
            except ArtifactError:
                if not same_file(fd, source):  # a concurrent save swapped it (and removed the old one)
                    raise _Replaced() from None
                raise
        compiled = _from_manifest(manifest, private, source, allow_native_code)
    except BaseException:
        remove_private(private)
        raise
    weakref.finalize(compiled.artifact, remove_private, private)
    return compiled


def _load_pair(fd: int, source: Path, manifest: dict[str, Any], allow_native_code: bool) -> CompiledEncoderDecoder:
    """Both parts, each checked against the digest of its manifest in ``manifest``."""
    where = str(source / MANIFEST)
    parts = manifest.get("parts")
    if not isinstance(parts, dict) or sorted(parts) != sorted(PARTS):
        raise ArtifactError(f"{MANIFEST}: 'parts' must name {' and '.join(PARTS)}", where=f"{where}:parts")
    loaded = {part: load_bound(fd, source, part, parts[part], allow_native_code) for part in PARTS}
    try:
        generation = _generation(manifest.get("generation"))
    except ValueError as exc:
        raise ArtifactError(f"{MANIFEST} is invalid: {exc}", where=where) from exc
    return CompiledEncoderDecoder(loaded["encoder"], loaded["decoder"], generation)


def load_bound(
    fd: int, source: Path, name: str, digest: Any, allow_native_code: bool = False
) -> CompiledModel:
    """The artifact in subdirectory ``name`` of the directory open as ``fd``, which must be a plain
    directory (not a link) whose manifest has the SHA-256 ``digest`` its parent recorded: a part
    of an encoder-decoder, a stage of a partition. A changed, swapped, linked or missing part is an
    :class:`ArtifactError`."""
    where = str(source / name)
    try:
        part_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
    except OSError:
        raise ArtifactError(
            f"the {name} part is missing or not a plain directory", where=where, hint="rebuild the artifact"
        ) from None
    try:
        found = hashlib.sha256(read_member(part_fd, MANIFEST, f"{where}/{MANIFEST}")).hexdigest()
        if found != digest:
            raise ArtifactError(
                f"{name}/{MANIFEST} does not match its checksum in the parent's {MANIFEST} (modified or replaced)",
                where=f"{where}/{MANIFEST}",
                hint="rebuild the artifact",
            )
        compiled = _load_once(source / name, allow_native_code, nested=True)
        if not same_file(part_fd, source / name):  # swapped between the check and the load
            raise ArtifactError(f"{name} was replaced while it was loaded", where=where, hint="load it again")
        return compiled
    finally:
        os.close(part_fd)


def _from_manifest(manifest: dict[str, Any], private: Path, source: Path, allow_native_code: bool) -> CompiledModel:
    where = str(source / MANIFEST)
    try:
        options = backend_options(manifest["backend"], manifest["backend_options"])
        inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
        outputs = [TensorSpec.from_dict(s) for s in manifest["outputs"]]
        out_spec = load_spec(manifest["out_spec"], where)
        report = Report.from_dict(manifest["report"])
        constants = _constants(manifest.get("constants", {}))
        generation = _generation(manifest.get("generation"))
    except KilnError as exc:
        raise ArtifactError(f"{MANIFEST} is invalid: {exc.message}", where=where) from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{MANIFEST} is invalid: {type(exc).__name__}: {exc}", where=where) from exc
    backend = get_backend(manifest["backend"])
    if backend.runs_native_code and not allow_native_code:
        raise ArtifactError(
            f"{source} is a {backend.name} artifact: loading it runs the native code it contains (compiled "
            "kernels in a shared library), so torchkiln loads it only when asked to",
            where=str(source),
            hint="if you trust where it came from: torchkiln.load(path, allow_native_code=True) "
            "(kiln: --allow-native-code)",
        )
    try:
        artifact = backend.load(private, options)
    except ArtifactError as exc:  # name the user's file, not the private copy
        exc.where = exc.where and exc.where.replace(str(private), str(source))
        raise
    except FileNotFoundError as exc:  # the backend needs a file the manifest does not list
        name = Path(exc.filename or "?").name
        raise ArtifactError(
            f"the {manifest['backend']} backend needs {name}, which {MANIFEST} does not list",
            where=where,
            hint="every file an artifact uses is listed with its checksum; rebuild the artifact",
        ) from None
    artifact.check_signature([s.name for s in inputs], len(outputs))
    if out_spec.num_leaves != len(outputs):
        raise ArtifactError(f"{MANIFEST}: out_spec has {out_spec.num_leaves} leaves for {len(outputs)} outputs", where=where)
    passes = list(manifest["passes"])
    compiled = CompiledModel(artifact, inputs, outputs, out_spec, report, options, passes, constants, generation)
    compiled.declared_outputs = True
    return compiled


def _generation(value: Any) -> dict[str, int | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(v is None or type(v) is int for v in value.values()):
        raise ValueError(f"'generation' must map names to integers or null, got {value!r}")
    return value


def _constants(value: Any) -> dict[str, Constant]:
    if not isinstance(value, dict) or not all(isinstance(v, CONSTANT_TYPES) for v in value.values()):
        raise ValueError(f"'constants' must map names to JSON scalars, got {value!r}")
    return value


#: manifest key -> the JSON type it must have
_SCHEMA: dict[str, type] = {
    "backend": str, "backend_options": dict, "inputs": list, "outputs": list, "out_spec": str,
    "passes": list, "files": dict, "report": dict,
}  # fmt: skip


def _read_manifest(fd: int, path: Path) -> dict[str, Any]:
    where = str(path / MANIFEST)
    try:
        manifest = parse_json(read_member(fd, MANIFEST, where), where)
    except ArtifactError as exc:
        if "is missing" in exc.message:
            raise ArtifactError(
                f"no {MANIFEST} in {path}", where=where, hint="is this a torchkiln artifact directory?"
            ) from None
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(
            f"{MANIFEST} is unreadable or corrupt: {exc}", where=where, hint="rebuild the artifact"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{MANIFEST} is not a torchkiln manifest", where=where)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format version {manifest.get('format_version')} is not supported (this torchkiln reads {FORMAT_VERSION})",
            where=where,
            hint="rebuild the artifact with this torchkiln version",
        )
    if manifest.get("kind") == ENCODER_DECODER:  # two artifacts: checked by _load_pair
        return manifest
    missing = [k for k in _SCHEMA if k not in manifest]
    if missing:
        raise ArtifactError(f"{MANIFEST} lacks {', '.join(missing)}", where=where, hint="rebuild the artifact")
    for key, kind in _SCHEMA.items():
        if not isinstance(manifest[key], kind):
            raise ArtifactError(
                f"{MANIFEST}: '{key}' must be a JSON {_JSON_NAMES[kind]}, got {type(manifest[key]).__name__}",
                where=f"{where}:{key}",
                hint="rebuild the artifact",
            )
    _check_files(manifest["files"], where)
    if not all(isinstance(p, str) for p in manifest["passes"]):
        raise ArtifactError(f"{MANIFEST}: 'passes' must be a list of strings", where=f"{where}:passes")
    return manifest


_JSON_NAMES: dict[type, str] = {str: "string", dict: "object", list: "array"}
_DIGEST = re.compile(r"[0-9a-f]{64}")


def _check_files(files: dict[str, Any], where: str) -> None:
    if not files:
        raise ArtifactError(f"{MANIFEST} lists no files", where=f"{where}:files", hint="rebuild the artifact")
    for name, digest in files.items():
        check_member_name(name, f"{where}:files")
        if name == MANIFEST or not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ArtifactError(
                f"{MANIFEST}: file {name!r} needs a SHA-256 hex digest, got {digest!r}",
                where=f"{where}:files",
                hint="rebuild the artifact",
            )
