"""The torch backend's files: a flat ATen graph as JSON (``program.json``) and its tensors as raw
bytes (``program.bin``). Loading them cannot execute code.

Why not ``torch.export.save``'s ``.pt2``: loading one unpickles (its loader falls back to an
unrestricted ``torch.load`` when the safe one fails, and pickles constants), and its graph JSON
carries symbolic-shape expressions that are parsed with ``sympy.sympify`` — an ``eval``. Here:

- a node is ``placeholder``, ``get_attr``, ``call_function`` or ``output``; a function is an
  operator on the allow-list of :mod:`torch_operators` (no operator that reads or writes files,
  prints, mutates or draws randomness: checked when writing and when loading) looked up by name in
  ``torch.ops``, or one of the few Python functions symbolic shapes use (:data:`PYTHON_FUNCTIONS`)
  — nothing is imported;
- arguments are JSON values, node references, dtypes, devices, layouts and memory formats, each
  rebuilt from a fixed table;
- tensors are ``{name, dtype, shape, offset, kind}`` entries over one raw little-endian blob, of the
  dtypes in :data:`DTYPES`, bounds-checked against the blob; entries over the same byte range share
  one copy, and ranges that overlap otherwise are refused, so loading never holds more than the
  blob's size in tensors;
- at most :data:`MAX_NODES` nodes, arguments nested at most :data:`MAX_DEPTH` deep;
- :func:`check_signature` holds the graph to its manifest before the first call: its placeholders
  are the declared inputs in order, its outputs as many tensors as declared.

Symbolic sizes are not stored: the graph computes them at run time (``aten.sym_size``).
"""

from __future__ import annotations

import json
import math
import operator
import sys
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from torchkiln.backends.torch_operators import call_refusal, qualified_name, why_not_allowed
from torchkiln.compiler.files import parse_json
from torchkiln.errors import ArtifactError

FORMAT = "torchkiln-torch-graph"
MAX_NODES = 1_000_000
MAX_DEPTH = 8
VERSION = 1
NAMESPACES = ("aten", "prims", "quantized_decomposed", "torchkiln")
PYTHON_FUNCTIONS: dict[str, Any] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le",
        "gt", "ge", "and_", "or_", "not_", "abs")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite") if hasattr(torch, n)},
    **{f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "sqrt", "trunc")},
}  # fmt: skip
_FUNCTION_NAMES = {id(f): name for name, f in PYTHON_FUNCTIONS.items()}
DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool")
}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}


class UnsupportedGraph(Exception):
    """The graph holds something this format cannot store (the message names the node)."""


class NotAllowed(UnsupportedGraph):
    """The graph calls an operator outside the allow-list (its core-ATen decomposition may not)."""


# --- writing -------------------------------------------------------------------------------------


def dump(gm: fx.GraphModule) -> tuple[bytes, bytes]:
    """``(program.json, program.bin)`` for a flat ATen-level graph module."""
    nodes, tensors, blob = [], [], bytearray()
    stored: set[str] = set()
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr", "call_function", "output"):
            raise UnsupportedGraph(f"node '{node.name}' is a {node.op}")
        entry: dict[str, Any] = {"op": node.op, "name": node.name}
        if node.op == "call_function":
            entry["target"] = _function_name(node)
        elif node.op in ("placeholder", "get_attr"):
            entry["target"] = str(node.target)
        if node.op == "get_attr" and node.target not in stored:
            stored.add(str(node.target))
            tensors.append(_store_tensor(gm, str(node.target), blob))
        entry["args"] = _encode(node.args, node)
        entry["kwargs"] = _encode(node.kwargs, node)
        nodes.append(entry)
    program = {"format": FORMAT, "version": VERSION, "nodes": nodes, "tensors": tensors}
    return json.dumps(program, indent=1).encode(), bytes(blob)


def _function_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        reason = why_not_allowed(target) or call_refusal(target, node.args, dict(node.kwargs))
        if reason is not None:
            raise NotAllowed(f"node '{node.name}' calls {target}: {reason}")
        return f"op:{qualified_name(target)}"
    name = _FUNCTION_NAMES.get(id(target))
    if name is None:
        raise UnsupportedGraph(f"node '{node.name}' calls {target!r}, which is not an ATen operator")
    return name


def _store_tensor(gm: fx.GraphModule, target: str, blob: bytearray) -> dict[str, Any]:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return store_tensor(getattr(owner, attr), target, "parameter" if attr in owner._parameters else "buffer", blob)


def store_tensor(value: Any, name: str, kind: str, blob: bytearray) -> dict[str, Any]:
    """Append ``value``'s bytes (little-endian) to ``blob``; its entry for :func:`load_tensors`.
    (Shared with the build cache's program files.)"""
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized:
        raise UnsupportedGraph(f"attribute '{name}' is a {type(value).__name__}, not a dense tensor")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UnsupportedGraph(f"tensor '{name}' has dtype {dtype}")
    data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    entry = {"name": name, "dtype": dtype, "shape": list(value.shape), "offset": len(blob), "kind": kind}
    blob.extend(data if sys.byteorder == "little" else _swap(data, value.element_size()))
    return entry


def _swap(data: bytes, width: int) -> bytes:
    return b"".join(data[i : i + width][::-1] for i in range(0, len(data), width))


def _encode(value: Any, node: fx.Node) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, node) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[str(k), _encode(v, node)] for k, v in value.items()]}
    leaf = encode_leaf(value)
    if leaf is NOT_A_LEAF:
        raise UnsupportedGraph(f"node '{node.name}' has an argument of type {type(value).__name__}")
    return leaf


#: what :func:`encode_leaf` and :func:`decode_leaf` return for a value they do not handle
NOT_A_LEAF: Any = object()


def encode_leaf(value: Any) -> Any:
    """A float (``{"float": "nan"}`` when not finite), dtype, device, layout or memory format as
    JSON; :data:`NOT_A_LEAF` for anything else. (Shared with the build cache's program files.)"""
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    return NOT_A_LEAF


def decode_leaf(kind: str, payload: Any) -> Any:
    """The value :func:`encode_leaf` wrote as ``{kind: payload}``, rebuilt from fixed tables;
    :data:`NOT_A_LEAF` for anything else."""
    if kind == "float" and payload in ("nan", "inf", "-inf"):
        return float(payload)
    tables: dict[str, dict[str, Any]] = {"dtype": DTYPES, "layout": _LAYOUTS, "memory_format": _MEMORY_FORMATS}
    if kind in tables and isinstance(payload, str) and payload in tables[kind]:
        return tables[kind][payload]
    if kind == "dtype" and isinstance(payload, str) and isinstance(getattr(torch, payload, None), torch.dtype):
        return getattr(torch, payload)  # dtype arguments beyond the stored-tensor dtypes (complex64, ...)
    if kind == "device" and isinstance(payload, str) and payload.split(":")[0] in ("cpu", "cuda", "meta"):
        return torch.device(payload)
    return NOT_A_LEAF


# --- reading -------------------------------------------------------------------------------------


def load(program_json: bytes, blob: bytes, where: str) -> fx.GraphModule:
    """Rebuild the graph module from the two files; :class:`ArtifactError` for anything else."""
    import torchkiln.compiler.quant_ops  # noqa: F401 - register the torchkiln IR operators

    try:
        program = parse_json(program_json, where)
        if not isinstance(program, dict) or program.get("format") != FORMAT or program.get("version") != VERSION:
            raise _Bad("not a torchkiln torch graph (format/version)")
        tensors = load_tensors(_list(program, "tensors"), blob)
        nodes = _list(program, "nodes")
        if len(nodes) > MAX_NODES:
            raise _Bad(f"{len(nodes)} nodes (at most {MAX_NODES})")
        return _build(nodes, tensors)
    except _Bad as exc:
        raise ArtifactError(f"the saved graph is invalid: {exc}", where=where, hint="rebuild the artifact") from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as exc:
        raise ArtifactError(
            f"the saved graph is invalid: {type(exc).__name__}: {exc}", where=where, hint="rebuild the artifact"
        ) from None


class Invalid(Exception):
    """A rule of the format is broken (the message says which)."""


_Bad = Invalid


def _list(program: dict[str, Any], key: str) -> list[Any]:
    value = program.get(key)
    if not isinstance(value, list):
        raise _Bad(f"'{key}' must be a list")
    return value


def load_tensors(entries: list[Any], blob: bytes) -> dict[str, tuple[torch.Tensor, str]]:
    """Every entry's tensor; one copy per byte range however many entries share it. Raises
    :class:`Invalid` for an entry out of bounds or of another form."""
    copies: dict[tuple[int, int], bytearray] = {}
    tensors = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _Bad(f"tensor entry {entry!r}")
        tensors[entry["name"]] = _load_tensor(entry, blob, copies)
    ranges = sorted(copies)
    for (start, size), (next_start, _) in zip(ranges, ranges[1:]):
        if start + size > next_start:
            raise _Bad(f"tensors overlap in program.bin at bytes {next_start}..{start + size}")
    return tensors


def _load_tensor(
    entry: dict[str, Any], blob: bytes, copies: dict[tuple[int, int], bytearray]
) -> tuple[torch.Tensor, str]:
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry.get("dtype"), str) else None
    shape = entry["shape"]
    if dtype is None or not isinstance(shape, list) or len(shape) > MAX_DEPTH * 4 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _Bad(f"tensor {entry.get('name')!r}: dtype {entry['dtype']!r} / shape {shape!r}")
    count = math.prod(shape)
    width = torch.empty((), dtype=dtype).element_size()
    size = count * width
    offset = entry["offset"]
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset + size > len(blob):
        raise _Bad(f"tensor {entry['name']!r} lies outside program.bin")
    if entry["kind"] not in ("parameter", "buffer"):
        raise _Bad(f"tensor {entry['name']!r} has kind {entry['kind']!r}")
    if count == 0:
        return torch.empty(shape, dtype=dtype), entry["kind"]
    if (offset, size) not in copies:
        data = blob[offset : offset + size]
        copies[offset, size] = bytearray(data if sys.byteorder == "little" else _swap(data, width))
    return torch.frombuffer(copies[offset, size], dtype=torch.uint8).view(dtype).reshape(shape), entry["kind"]


def _build(nodes: list[dict[str, Any]], tensors: dict[str, tuple[torch.Tensor, str]]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    attributes: dict[str, Any] = {}
    for entry in nodes:
        op, name = entry["op"], entry["name"]
        if op not in ("placeholder", "get_attr", "call_function", "output") or not isinstance(name, str):
            raise _Bad(f"node {name!r} has op {op!r}")
        args, kwargs = _decode(entry["args"], env), _decode(entry["kwargs"], env)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise _Bad(f"node {name!r}: args must be a tuple and kwargs a dict")
        target: Any = entry.get("target")
        if op == "call_function":
            target = _find_function(target)
            reason = call_refusal(target, args, kwargs) if isinstance(target, torch._ops.OpOverload) else None
            if reason is not None:
                raise _Bad(f"node {name!r}: {reason}")
        elif op == "get_attr":
            if target not in tensors:
                raise _Bad(f"node {name!r} reads tensor {target!r}, which program.bin does not hold")
            tensor, kind = tensors[target]
            attributes[target] = torch.nn.Parameter(tensor, requires_grad=False) if kind == "parameter" else tensor
        elif op == "placeholder" and not isinstance(target, str):
            raise _Bad(f"placeholder {name!r} has no name")
        elif op == "output" and (len(args) != 1 or kwargs or any(n.op == "output" for n in env.values())):
            raise _Bad(f"output node {name!r} must be the one output, of one argument")
        env[name] = graph.create_node(op, target if op != "output" else "output", args, kwargs, name=name)
    graph.lint()
    return fx.GraphModule(attributes, graph)


def check_signature(gm: fx.GraphModule, inputs: list[str], outputs: int) -> None:
    """The loaded graph against its manifest: placeholders are ``inputs`` in order, and the output
    is ``outputs`` values, each computed by a node (an operator returning a tensor, or a tensor
    constant or input) — never a Python value standing in for a tensor."""
    placeholders = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    if placeholders != inputs:
        raise ArtifactError(f"the saved graph takes {placeholders}, but the manifest declares inputs {inputs}",
                            hint="rebuild the artifact")  # fmt: skip
    (result,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"] or [None]
    leaves = pytree.tree_leaves(result)
    if len(leaves) != outputs:
        raise ArtifactError(f"the saved graph returns {len(leaves)} values, but the manifest declares {outputs}",
                            hint="rebuild the artifact")  # fmt: skip
    for leaf in leaves:
        if not isinstance(leaf, fx.Node) or not _returns_tensor(leaf):
            raise ArtifactError(f"the saved graph returns {leaf!r}, which is not a tensor", hint="rebuild the artifact")


def _returns_tensor(node: fx.Node) -> bool:
    if node.op in ("placeholder", "get_attr"):
        return True
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and isinstance(source.target, torch._ops.OpOverload) and all(
            isinstance(r.type, torch.TensorType)
            or (isinstance(r.type, torch.ListType) and isinstance(r.type.getElementType(), torch.TensorType))
            for r in source.target._schema.returns
        )
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and [type(r.type) for r in target._schema.returns] == [
        torch.TensorType
    ]


def _find_function(name: Any) -> Any:
    if not isinstance(name, str):
        raise _Bad(f"function {name!r}")
    if name in PYTHON_FUNCTIONS:
        return PYTHON_FUNCTIONS[name]
    qualified = name.removeprefix("op:")
    namespace, _, rest = qualified.partition("::")
    op_name, _, overload = rest.rpartition(".")
    if not name.startswith("op:") or namespace not in NAMESPACES or not op_name.isidentifier():
        raise _Bad(f"function {name!r} is not an operator of {', '.join(NAMESPACES)}")
    if not overload.isidentifier():
        raise _Bad(f"function {name!r} has no overload")
    try:
        found = getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
    except (AttributeError, RuntimeError):
        raise _Bad(f"operator {qualified} does not exist in this torch") from None
    reason = why_not_allowed(found)
    if reason is not None:
        raise _Bad(f"function {name!r}: {reason}")
    return found


def _decode(value: Any, env: dict[str, fx.Node], depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > MAX_DEPTH:
        raise _Bad(f"arguments nested deeper than {MAX_DEPTH}")
    if isinstance(value, list):
        raise _Bad("bare JSON list in arguments")
    if not isinstance(value, dict) or len(value) != 1:
        raise _Bad(f"argument {value!r}")
    (kind, payload), = value.items()
    if kind == "node":
        if payload not in env:
            raise _Bad(f"argument refers to node {payload!r} before it is defined")
        return env[payload]
    if kind in ("list", "tuple") and isinstance(payload, list):
        items = [_decode(v, env, depth + 1) for v in payload]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(payload, list):
        return {str(k): _decode(v, env, depth + 1) for k, v in payload}
    leaf = decode_leaf(kind, payload)
    if leaf is not NOT_A_LEAF:
        return leaf
    raise _Bad(f"argument {value!r}")
