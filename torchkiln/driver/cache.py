"""The build cache: each stage's output stored under a content hash of everything it depends on.

A build has two stages. *optimize* (trace + passes, including calibration and training) depends on
the model (its weights and the source of its module classes), the example and calibration inputs,
the pipeline and the tolerance, and the versions of torchkiln's code and of torch; *lower* depends
on the optimized program's content (:func:`program_digest`), the backend, its options and the
onnx / onnxruntime versions. A rebuild after
changing only backend options therefore reuses the optimized program and skips tracing and
calibration; an unchanged rebuild reuses the artifact as well.

Entries are directories ``<cache>/<stage>/<key>/`` written atomically; a corrupt or unreadable
entry is a miss (and is rewritten), never an error. Nothing in an entry is unpickled: a program is
JSON and raw tensor bytes rebuilt through allow-lists (:mod:`~torchkiln.driver.cache_format`), so a
cache shared between CI branches is as safe to read as an artifact; a program outside that form (a
user's own module class) is built without the cache, and the report says why.

A cached program is its nodes (op, name, target, arguments, module paths), the modules its
``call_module`` nodes call and its tensors; loading rebuilds the graph without re-tracing. The
rebuilt module keeps code, weights and module paths but not container classes
(an ``nn.Sequential`` becomes a plain ``nn.Module``), which changes the scope metadata the ONNX
exporter records; :func:`round_trip` therefore rebuilds every optimized program the same way, hit
or miss, so a build lowers the same graph either way and produces the same bytes.

The model's key covers its weights, modes and the source files of its module classes. A forward
that depends on something else (a helper in another file, a global) can change without the key
changing; the caller therefore re-runs the eager model on the cached checks before trusting a hit
(``compile`` does: a changed output is a miss, reported as stale).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from torchkiln.compiler import graph as G
from torchkiln.compiler.files import (  # noqa: F401 - re-exported: where the cache lives
    atomic_directory,
    default_directory,
    parse_json,
    write_atomic,
    write_marker,
)
from torchkiln.compiler.program import Check, Program, TensorSpec
from torchkiln.driver import cache_format
from torchkiln.driver.cache_format import NotCacheable  # noqa: F401 - re-exported: the compile driver catches it

PROGRAM_FILES = ("program.json", "program.bin")
FORMAT, VERSION = "torchkiln-cached-program", 1
STAGES = ("optimize", "lower")
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


class Hasher:
    """SHA-256 over a sequence of labelled parts: tensors by dtype, shape and bytes; anything
    else by its canonical JSON. Labels keep ``("a", "bc")`` and ``("ab", "c")`` apart."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, label: str, value: Any) -> Hasher:
        self._digest.update(f"\0{label}\0".encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            self._digest.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
            self._digest.update(
                tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            )
        elif isinstance(value, bytes):
            self._digest.update(value)
        else:
            self._digest.update(json.dumps(value, sort_keys=True, default=str).encode())
        return self

    def add_tensors(self, label: str, batches: Iterable[Any]) -> Hasher:
        """Every tensor leaf of ``batches`` (tensors, tuples, lists, dicts) in order."""
        for index, batch in enumerate(batches):
            leaves, spec = pytree.tree_flatten(batch)
            self.add(f"{label}[{index}]", str(spec))
            for position, leaf in enumerate(leaves):
                self.add(
                    f"{label}[{index}].{position}", leaf if isinstance(leaf, torch.Tensor) else repr(leaf)
                )
        return self

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def model_fingerprint(model: nn.Module) -> Hasher:
    """What the model computes: every parameter and buffer, the training flag of each module, and
    the source files of the module classes it uses (a changed ``forward`` is a different model)."""
    hasher = Hasher()
    for name, tensor in list(model.state_dict(keep_vars=False).items()):
        hasher.add(f"state.{name}", tensor)
    for name, module in model.named_modules():
        hasher.add(f"module.{name}", [type(module).__module__, type(module).__qualname__, module.training])
    for source in sorted({_source_file(type(m)) for m in model.modules()}):
        hasher.add(f"source.{source}", Path(source).read_bytes() if Path(source).is_file() else b"")
    return hasher


def _source_file(cls: type) -> str:
    """The file defining ``cls`` (the whole file: helpers beside the class count too)."""
    try:
        return inspect.getsourcefile(cls) or cls.__module__
    except TypeError:  # built in
        return cls.__module__


def program_digest(program: Program) -> str:
    """What a backend lowers: the graph's code, every tensor it holds, and the input/output specs.
    The lower stage is keyed by this, not by the optimize key, so a re-optimized program (a stale
    entry replaced) never meets an artifact lowered from the old one."""
    gm = program.graph_module
    hasher = Hasher().add("code", gm.code)
    for name, tensor in gm.state_dict().items():
        hasher.add(f"state.{name}", tensor)
    for node in gm.graph.nodes:  # constants fx keeps as plain attributes are not in the state dict
        if node.op == "get_attr":
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                hasher.add(f"attr.{node.target}", value)
    hasher.add("specs", [[s.to_dict() for s in program.inputs], [s.to_dict() for s in program.outputs]])
    hasher.add("constants", program.constants)
    return hasher.hexdigest()


def code_version() -> str:
    """A hash of torchkiln's own source, so that a changed pass invalidates what it produced even
    when the version number did not move (a development checkout)."""
    hasher = Hasher()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        hasher.add(str(path.relative_to(_PACKAGE_DIR)), path.read_bytes())
    return hasher.hexdigest()


class Cache:
    """Entries ``<directory>/<stage>/<key>/``: :meth:`get` finds one, :meth:`store` writes one
    atomically (the directory appears complete or not at all)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    def entry(self, stage: str, key: str) -> Path:
        assert stage in STAGES, stage
        return self.directory / stage / key

    def get(self, stage: str, key: str) -> Path | None:
        path = self.entry(stage, key)
        return path if path.is_dir() else None

    @contextlib.contextmanager
    def store(self, stage: str, key: str) -> Iterator[Path]:
        with atomic_directory(self.entry(stage, key), "cache") as staging:
            write_marker(staging, "cache", stage=stage, key=key)
            yield staging


def save_program(program: Program, directory: Path, extra: dict[str, Any]) -> None:
    """Write the program's graph, specs and checks (and ``extra``, e.g. its report) to
    ``directory/program.json`` + ``program.bin`` (:mod:`~torchkiln.driver.cache_format`). Raises
    :class:`NotCacheable` for a program outside the form (a user's own module class, a helper
    function of the model's file)."""
    tensors = cache_format.Tensors()
    state = {
        "format": FORMAT,
        "version": VERSION,
        "graph": cache_format.describe(program.graph_module, tensors),
        "inputs": [s.to_dict() for s in program.inputs],
        "outputs": [s.to_dict() for s in program.outputs],
        "out_spec": pytree.treespec_dumps(program.out_spec),
        "flavour": program.flavour,
        "checks": cache_format.encode([[c.inputs, c.outputs] for c in program.checks], tensors, "checks"),
        "held_back": cache_format.encode([[c.inputs, c.outputs] for c in program.held_back], tensors, "held_back"),
        "name": program.name,
        "notes": list(program.notes),
        "constants": dict(program.constants),
        "extra": extra,
    }
    entries, blob = tensors.pack()
    try:
        text = json.dumps({**state, "tensors": entries}, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise NotCacheable(f"the program's report or constants are not JSON: {exc}") from None
    write_atomic(directory / PROGRAM_FILES[0], text)
    write_atomic(directory / PROGRAM_FILES[1], blob)


def load_program(directory: Path) -> tuple[Program, dict[str, Any]] | None:
    """The program saved by :func:`save_program`, or None when the entry cannot be read or breaks
    the form's rules (an entry of an older torchkiln, or one made by hand: a miss, rebuilt)."""
    try:
        state = parse_json((directory / PROGRAM_FILES[0]).read_bytes(), str(directory / PROGRAM_FILES[0]))
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
            return None
        tensors = cache_format.unpack(state["tensors"], (directory / PROGRAM_FILES[1]).read_bytes())
        checks = [Check(tuple(i), tuple(o)) for i, o in cache_format.decode(state["checks"], {}, tensors)]
        held_back = [Check(tuple(i), tuple(o)) for i, o in cache_format.decode(state["held_back"], {}, tensors)]
        gm = cache_format.rebuild(state["graph"], tensors)
        G.annotate(gm, checks[0].inputs)
        program = Program(
            graph_module=gm,
            inputs=[TensorSpec.from_dict(s) for s in state["inputs"]],
            outputs=[TensorSpec.from_dict(s) for s in state["outputs"]],
            out_spec=pytree.treespec_loads(state["out_spec"]),
            flavour=state["flavour"],
            checks=checks,
            name=state["name"],
            notes=list(state["notes"]),
            held_back=held_back,
            constants=dict(state["constants"]),
        )
        extra = dict(state["extra"])
    except Exception:  # noqa: BLE001 - any unreadable or invalid entry is a miss; the build recomputes it
        return None
    return program, extra


def round_trip(program: Program) -> None:
    """Rebuild the program's graph module the way :func:`load_program` does (see the module
    docstring: a build lowers the same graph whether or not the cache was hit). The rebuilt
    module shares the original's submodules and tensors; nothing is copied. Raises
    :class:`NotCacheable` where :func:`save_program` would."""
    gm = program.graph_module
    tensors = cache_format.Tensors()
    description = cache_format.describe(gm, tensors)
    program.graph_module = cache_format.rebuild(description, tensors.items, gm.get_submodule)
    G.annotate(program.graph_module, program.example_inputs)
