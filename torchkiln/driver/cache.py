"""The build cache: each stage's output stored under a content hash of everything it depends on.

A build has two stages. *optimize* (trace + passes, including calibration and training) depends on
the model (its weights and the source of its module classes), the example and calibration inputs,
the pipeline and the tolerance, and the versions of torchkiln's code and of torch; *lower* depends
on the optimized program's content (:func:`program_digest`), the backend, its options and the
onnx / onnxruntime versions. A rebuild after
changing only backend options therefore reuses the optimized program and skips tracing and
calibration; an unchanged rebuild reuses the artifact as well.

Entries are directories ``<cache>/<stage>/<key>/`` written atomically; a corrupt or unreadable
entry is a miss (and is rewritten), never an error. The cache holds pickled graph modules and is
as trusted as the directory it lives in: point it only at a directory you own.

A cached program is its nodes (op, name, target, arguments, module paths) plus a module holding
its submodules and tensors, saved with ``torch.save``; loading rebuilds the graph without
re-tracing. The rebuilt module keeps code, weights and module paths but not container classes
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
import importlib
import inspect
import json
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from torchkiln.compiler.files import atomic_directory, default_directory, write_marker  # noqa: F401 - re-exported: where the cache lives
from torchkiln.compiler.program import Check, Program, TensorSpec

PROGRAM_FILE = "program.pt"
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
    ``directory/program.pt``. Raises :class:`NotCacheable` for a graph that calls something
    that cannot be named for reloading (a lambda, a local function)."""
    state = {
        "graph": graph_state(program.graph_module),
        "inputs": [s.to_dict() for s in program.inputs],
        "outputs": [s.to_dict() for s in program.outputs],
        "out_spec": pytree.treespec_dumps(program.out_spec),
        "flavour": program.flavour,
        "checks": [(c.inputs, c.outputs) for c in program.checks],
        "held_back": [(c.inputs, c.outputs) for c in program.held_back],
        "name": program.name,
        "notes": list(program.notes),
        "constants": dict(program.constants),
        "extra": extra,
    }
    torch.save(state, directory / PROGRAM_FILE)


def load_program(directory: Path) -> tuple[Program, dict[str, Any]] | None:
    """The program saved by :func:`save_program`, or None when the entry cannot be read."""
    try:
        state = torch.load(directory / PROGRAM_FILE, weights_only=False, map_location="cpu")
        checks = [Check(tuple(i), tuple(o)) for i, o in state["checks"]]
        program = Program(
            graph_module=graph_from_state(state["graph"], checks[0].inputs),
            inputs=[TensorSpec.from_dict(s) for s in state["inputs"]],
            outputs=[TensorSpec.from_dict(s) for s in state["outputs"]],
            out_spec=pytree.treespec_loads(state["out_spec"]),
            flavour=state["flavour"],
            checks=checks,
            name=state["name"],
            notes=list(state["notes"]),
            held_back=[Check(tuple(i), tuple(o)) for i, o in state.get("held_back", [])],
            constants=dict(state.get("constants", {})),
        )
    except Exception:  # noqa: BLE001 - any unreadable entry is a miss; the build recomputes it
        return None
    return program, dict(state["extra"])


def round_trip(program: Program) -> None:
    """Rebuild the program's graph module the way :func:`load_program` does (see the module
    docstring: a build lowers the same graph whether or not the cache was hit). The rebuilt
    module shares the original's submodules and tensors; nothing is copied."""
    program.graph_module = graph_from_state(graph_state(program.graph_module), program.example_inputs)


class NotCacheable(Exception):
    """The graph calls a function that cannot be named for reloading."""


_KEEP_META = ("nn_module_stack",)
_NAMESPACES = ("torch.nn.functional", "torch", "operator")


def graph_state(gm: fx.GraphModule) -> dict[str, Any]:
    """A picklable description of ``gm``: its nodes (op, name, target, args with node references
    by name, module paths) and a module holding its submodules, parameters, buffers and tensor
    attributes. No re-tracing on load (fx's own pickling re-traces the code, which fails on
    symbolic shapes)."""
    nodes = []
    for node in gm.graph.nodes:
        args = fx.node.map_arg(node.args, _ref)
        kwargs = fx.node.map_arg(node.kwargs, _ref)
        target = _name_target(node.target) if node.op == "call_function" else node.target
        meta = {k: _plain_meta(node.meta[k]) for k in _KEEP_META if k in node.meta}
        nodes.append((node.op, node.name, target, args, kwargs, meta))
    holder = nn.Module()
    holder._modules = dict(gm._modules)
    holder._parameters = dict(gm._parameters)
    holder._buffers = dict(gm._buffers)
    roots = {str(n.target).split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    attributes = {r: getattr(gm, r) for r in roots if r not in holder._modules and r not in holder._parameters
                  and r not in holder._buffers}  # fmt: skip
    return {"nodes": nodes, "root": holder, "attributes": attributes, "class_name": type(gm).__name__,
            "training": gm.training}  # fmt: skip


def graph_from_state(state: dict[str, Any], example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Rebuild the graph module :func:`graph_state` described, with shapes annotated again."""
    import torchkiln.compiler.quant_ops  # noqa: F401 - the graph may call the quantized IR ops
    from torchkiln.compiler import graph as G

    root = state["root"]
    for name, value in state["attributes"].items():
        setattr(root, name, value)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs, meta in state["nodes"]:
        args = _resolve(args, env)
        kwargs = _resolve(kwargs, env)
        real = _find_target(target) if op == "call_function" else target
        node = graph.create_node(op, real, args, kwargs, name=name)
        node.meta.update(meta)
        env[name] = node
    gm = fx.GraphModule(root, graph, class_name=state["class_name"])
    gm.training = state["training"]
    G.annotate(gm, example_inputs)
    return gm


class _Ref:
    def __init__(self, name: str):
        self.name = name


def _ref(node: fx.Node) -> Any:
    return _Ref(node.name)


def _resolve(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, _Ref):
        return env[value.name]
    if isinstance(value, (tuple, list)):
        return type(value)(_resolve(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_resolve(value.start, env), _resolve(value.stop, env), _resolve(value.step, env))
    return value


def _name_target(target: Any) -> tuple[Any, ...]:
    if isinstance(target, torch._ops.OpOverload):
        return ("op", target.namespace, target._schema.name.split("::")[-1], target._overloadname)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return ("packet", target._qualified_op_name.split("::")[0], target._qualified_op_name.split("::")[-1])
    try:  # plain functions pickle by reference (module + qualified name)
        if pickle.loads(pickle.dumps(target)) is target:
            return ("py", target)
    except Exception:  # noqa: BLE001 - lambdas, local functions, unpicklable objects
        pass
    for module in _NAMESPACES:  # F.max_pool2d and friends are closures made by boolean_dispatch
        name = next((k for k, v in vars(importlib.import_module(module)).items() if v is target), None)
        if name is not None:
            return ("attr", module, name)
    raise NotCacheable(f"cannot name {target!r} for reloading")


def _find_target(named: tuple[Any, ...]) -> Any:
    kind = named[0]
    if kind == "op":
        return getattr(getattr(getattr(torch.ops, named[1]), named[2]), named[3] or "default")
    if kind == "packet":
        return getattr(getattr(torch.ops, named[1]), named[2])
    if kind == "attr":
        return getattr(importlib.import_module(named[1]), named[2])
    return named[1]


def _plain_meta(value: Any) -> Any:
    """``nn_module_stack`` maps keys to (path, class); keep the class as its name."""
    if isinstance(value, dict):
        return {k: (v[0], str(v[1])) if isinstance(v, tuple) else v for k, v in value.items()}
    return value
