"""The torch backend's files: a flat ATen graph as JSON (``program.json``) and its tensors as raw
bytes (``program.bin``). Loading them cannot execute code.

Why not ``torch.export.save``'s ``.pt2``: loading one unpickles (its loader falls back to an
unrestricted ``torch.load`` when the safe one fails, and pickles constants), and its graph JSON
carries symbolic-shape expressions that are parsed with ``sympy.sympify`` — an ``eval``. Here:

- a node is ``placeholder``, ``get_attr``, ``call_function`` or ``output``; a function is an ATen
  or torchkiln IR operator looked up by name in ``torch.ops`` (namespaces :data:`NAMESPACES`) or one
  of the few Python functions symbolic shapes use (:data:`PYTHON_FUNCTIONS`) — nothing is imported;
- arguments are JSON values, node references, dtypes, devices, layouts and memory formats, each
  rebuilt from a fixed table;
- tensors are ``{name, dtype, shape, offset, kind}`` entries over one raw little-endian blob, of the
  dtypes in :data:`DTYPES`, bounds-checked against the blob.

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

from torchkiln.errors import ArtifactError

FORMAT = "torchkiln-torch-graph"
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
        if target.namespace not in NAMESPACES:
            raise UnsupportedGraph(
                f"node '{node.name}' calls {target}, outside the operator namespaces {', '.join(NAMESPACES)}"
            )
        return f"op:{target.namespace}::{target._schema.name.split('::')[-1]}.{target._overloadname}"
    name = _FUNCTION_NAMES.get(id(target))
    if name is None:
        raise UnsupportedGraph(f"node '{node.name}' calls {target!r}, which is not an ATen operator")
    return name


def _store_tensor(gm: fx.GraphModule, target: str, blob: bytearray) -> dict[str, Any]:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    value = getattr(owner, attr)
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized:
        raise UnsupportedGraph(f"attribute '{target}' is a {type(value).__name__}, not a dense tensor")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UnsupportedGraph(f"tensor '{target}' has dtype {dtype}")
    data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    kind = "parameter" if attr in owner._parameters else "buffer"
    entry = {"name": target, "dtype": dtype, "shape": list(value.shape), "offset": len(blob), "kind": kind}
    blob.extend(data if sys.byteorder == "little" else _swap(data, value.element_size()))
    return entry


def _swap(data: bytes, width: int) -> bytes:
    return b"".join(data[i : i + width][::-1] for i in range(0, len(data), width))


def _encode(value: Any, node: fx.Node) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, node) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[str(k), _encode(v, node)] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise UnsupportedGraph(f"node '{node.name}' has an argument of type {type(value).__name__}")


# --- reading -------------------------------------------------------------------------------------


def load(program_json: bytes, blob: bytes, where: str) -> fx.GraphModule:
    """Rebuild the graph module from the two files; :class:`ArtifactError` for anything else."""
    import torchkiln.compiler.quant_ops  # noqa: F401 - register the torchkiln IR operators

    try:
        program = json.loads(program_json)
        if not isinstance(program, dict) or program.get("format") != FORMAT or program.get("version") != VERSION:
            raise _Bad("not a torchkiln torch graph (format/version)")
        tensors = {t["name"]: _load_tensor(t, blob) for t in _list(program, "tensors")}
        return _build(_list(program, "nodes"), tensors)
    except _Bad as exc:
        raise ArtifactError(f"the saved graph is invalid: {exc}", where=where, hint="rebuild the artifact") from None
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise ArtifactError(
            f"the saved graph is invalid: {type(exc).__name__}: {exc}", where=where, hint="rebuild the artifact"
        ) from None


class _Bad(Exception):
    pass


def _list(program: dict[str, Any], key: str) -> list[Any]:
    value = program.get(key)
    if not isinstance(value, list):
        raise _Bad(f"'{key}' must be a list")
    return value


def _load_tensor(entry: dict[str, Any], blob: bytes) -> tuple[torch.Tensor, str]:
    dtype = DTYPES.get(entry["dtype"])
    shape = entry["shape"]
    if dtype is None or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _Bad(f"tensor {entry.get('name')!r}: dtype {entry['dtype']!r} / shape {shape!r}")
    count = math.prod(shape)
    size = count * torch.empty((), dtype=dtype).element_size()
    offset = entry["offset"]
    if not isinstance(offset, int) or offset < 0 or offset + size > len(blob):
        raise _Bad(f"tensor {entry['name']!r} lies outside program.bin")
    if entry["kind"] not in ("parameter", "buffer"):
        raise _Bad(f"tensor {entry['name']!r} has kind {entry['kind']!r}")
    if count == 0:
        return torch.empty(shape, dtype=dtype), entry["kind"]
    data = bytearray(blob[offset : offset + size])
    if sys.byteorder != "little":
        data = bytearray(_swap(bytes(data), size // count))
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape), entry["kind"]


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
        elif op == "get_attr":
            if target not in tensors:
                raise _Bad(f"node {name!r} reads tensor {target!r}, which program.bin does not hold")
            tensor, kind = tensors[target]
            attributes[target] = torch.nn.Parameter(tensor, requires_grad=False) if kind == "parameter" else tensor
        elif op == "placeholder" and not isinstance(target, str):
            raise _Bad(f"placeholder {name!r} has no name")
        env[name] = graph.create_node(op, target if op != "output" else "output", args, kwargs, name=name)
    graph.lint()
    return fx.GraphModule(attributes, graph)


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
    if not isinstance(found, torch._ops.OpOverload):
        raise _Bad(f"{qualified} is not an operator overload")
    return found


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
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
        items = [_decode(v, env) for v in payload]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(payload, list):
        return {str(k): _decode(v, env) for k, v in payload}
    if kind == "float" and payload in ("nan", "inf", "-inf"):
        return float(payload)
    tables: dict[str, dict[str, Any]] = {"dtype": DTYPES, "layout": _LAYOUTS, "memory_format": _MEMORY_FORMATS}
    if kind in tables and payload in tables[kind]:
        return tables[kind][payload]
    if kind == "dtype" and isinstance(getattr(torch, str(payload), None), torch.dtype):
        return getattr(torch, payload)  # dtype arguments beyond the stored-tensor dtypes (complex64, ...)
    if kind == "device" and isinstance(payload, str) and payload.split(":")[0] in ("cpu", "cuda", "meta"):
        return torch.device(payload)
    raise _Bad(f"argument {value!r}")
