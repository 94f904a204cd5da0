"""The build cache's form of an optimized program: JSON (``program.json``) and raw tensor bytes
(``program.bin``), rebuilt only through allow-lists, so that reading a cache entry — one restored
from another branch's CI cache, say — can no more run code than loading an artifact can.

The graph is the one before lowering: fx nodes of every kind (``call_module`` and ``call_method``
too), so it is not the torch backend's flat ATen form; it shares that form's rules:

- a ``call_function`` is an operator :func:`~torchkiln.backends.torch_operators.why_not_cached`
  allows, a function of ``torch`` / ``torch.nn.functional`` that dispatches on tensors (listed by
  ``torch.overrides``) or makes one (:data:`FACTORIES`), a function of ``operator`` or ``math``, or
  ``getattr``; each is looked up by name in those namespaces, nothing is imported;
- a module is of a class defined in ``torch.nn.modules`` (already imported), rebuilt without
  calling its constructor: its attributes are JSON values, its parameters and buffers tensors;
- values are JSON, node references, tensors (by index), slices, ``...``, sizes and the leaves of
  :func:`~torchkiln.backends.torch_format.encode_leaf`, nested at most :data:`MAX_DEPTH` deep;
- tensors are ``{dtype, shape, offset, grad}`` over one little-endian blob, bounds-checked.

:func:`describe` raises :class:`NotCacheable` for a graph outside these rules (a user's own leaf
module, a helper function of the model's file): that build runs without the cache and says so.
"""

from __future__ import annotations

import builtins
import math
import operator
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from torchkiln.backends import torch_format
from torchkiln.backends.torch_operators import why_not_cached

MAX_DEPTH = 16
MAX_MODULE_DEPTH = 32
#: the functions of ``operator`` a graph may call: arithmetic, comparison and indexing
OPERATORS = frozenset({"getitem", "add", "sub", "mul", "matmul", "floordiv", "truediv", "mod", "pow", "neg", "pos",
                       "abs", "invert", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_",
                       "lshift", "rshift", "index", "truth", "contains"})  # fmt: skip
FACTORIES = ("arange", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "scalar_tensor", "linspace",
             "eye", "tril_indices", "triu_indices", "zeros_like", "ones_like", "full_like", "empty_like")  # fmt: skip
_NAMESPACES: dict[str, Any] = {"torch": torch, "torch.nn.functional": torch.nn.functional, "operator": operator,
                               "math": math}  # fmt: skip
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_flat_weights", "_flat_weight_refs"}
_NAME = re.compile(r"[A-Za-z0-9_]+")  # a part of a module or attribute path


class NotCacheable(Exception):
    """The program holds something the cache's form cannot describe (the message says what)."""


class Invalid(Exception):
    """A stored program breaks the form's rules (a miss: the entry is rebuilt)."""


# --- describing ----------------------------------------------------------------------------------


class Tensors:
    """The tensors a description refers to by index, each object once (tied weights stay tied)."""

    def __init__(self) -> None:
        self.items: list[torch.Tensor] = []
        self._index: dict[int, int] = {}

    def add(self, tensor: torch.Tensor, where: str) -> int:
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.layout != torch.strided or tensor.is_quantized or dtype not in torch_format.DTYPES:
            raise NotCacheable(f"{where} is a {dtype} {tensor.layout} tensor")
        if id(tensor) not in self._index:
            self._index[id(tensor)] = len(self.items)
            self.items.append(tensor)
        return self._index[id(tensor)]

    def pack(self) -> tuple[list[dict[str, Any]], bytes]:
        """``(entries, blob)``: each tensor's entry (its index as name) over the raw bytes."""
        blob = bytearray()
        entries = [torch_format.store_tensor(t, str(i), "parameter" if isinstance(t, nn.Parameter) else "buffer", blob)
                   for i, t in enumerate(self.items)]  # fmt: skip
        return entries, bytes(blob)


def unpack(entries: Any, blob: bytes) -> list[torch.Tensor]:
    """The tensors :meth:`Tensors.pack` wrote, in order (parameters as parameters)."""
    loaded = torch_format.load_tensors(_list(entries, "tensors"), blob)
    if sorted(loaded) != sorted(str(i) for i in range(len(loaded))):
        raise Invalid("tensor entries must be named 0..n-1")
    return [_parameter(t) if kind == "parameter" else t for t, kind in (loaded[str(i)] for i in range(len(loaded)))]


def describe(gm: fx.GraphModule, tensors: Tensors) -> dict[str, Any]:
    """The description of ``gm`` (its tensors added to ``tensors``): its nodes, the modules its
    ``call_module`` nodes call and the values its ``get_attr`` nodes read. Raises :class:`NotCacheable`."""
    nodes, modules, attributes = [], {}, {}
    for node in gm.graph.nodes:
        where = f"node '{node.name}'"
        _safe_call(node.op, node.target, node.args, where, NotCacheable)
        target = _function_name(node.target, where) if node.op == "call_function" else str(node.target)
        meta = {"nn_module_stack": _plain_stack(node.meta["nn_module_stack"])} if "nn_module_stack" in node.meta else {}
        nodes.append({"op": node.op, "name": node.name, "target": target, "meta": meta,
                      "args": encode(node.args, tensors, where), "kwargs": encode(node.kwargs, tensors, where)})  # fmt: skip
        if node.op == "call_module" and target not in modules:
            modules[target] = _describe_module(gm.get_submodule(target), tensors, target, 0)
        elif node.op == "get_attr" and target not in attributes:
            value = _fetch(gm, target)
            if not isinstance(value, torch.Tensor):
                raise NotCacheable(f"node '{node.name}' reads {target!r}, a {type(value).__name__}, not a tensor")
            attributes[target] = encode(value, tensors, f"attribute '{target}'")
    return {"nodes": nodes, "modules": modules, "attributes": attributes, "class_name": type(gm).__name__,
            "training": gm.training}  # fmt: skip


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _function_name(target: Any, where: str) -> str:
    if isinstance(target, torch._ops.OpOverload):
        reason = why_not_cached(target)
        if reason is not None:
            raise NotCacheable(f"{where} calls {target}: {reason}")
        return f"op:{target.namespace}::{target._schema.name.split('::')[-1]}.{target._overloadname}"
    if target is builtins.getattr:
        return "builtins.getattr"
    for namespace, module in _NAMESPACES.items():
        name = next((k for k, v in vars(module).items() if v is target and not k.startswith("__")), None)
        if name is not None and _allowed_function(namespace, name, target):
            return f"{namespace}.{name}"
    raise NotCacheable(f"{where} calls {getattr(target, '__qualname__', target)!r}, which the cache cannot name "
                       "(not an operator or a torch, operator or math function)")  # fmt: skip


def _allowed_function(namespace: str, name: str, function: Any) -> bool:
    if namespace == "operator":  # not attrgetter, methodcaller, call: they reach any attribute or method
        return name in OPERATORS
    if namespace == "math":
        return callable(function)
    return (namespace == "torch" and name in FACTORIES) or id(function) in _overridable()


def _safe_call(op: str, target: Any, args: tuple[Any, ...], where: str, error: type[Exception]) -> None:
    """A method call or ``getattr`` reaches only public tensor attributes: ``getattr(x, "__class__")``
    and on to ``__init__.__globals__`` would reach any object in the process, and a method call on
    it anything it can do."""
    if op == "call_method" and (not isinstance(target, str) or target.startswith("_")
                                or not hasattr(torch.Tensor, target)):  # fmt: skip
        raise error(f"{where} calls method {target!r}, not a public tensor method")
    if op == "call_function" and target is builtins.getattr and (
        len(args) != 2 or not isinstance(args[1], str) or args[1].startswith("_")
    ):
        raise error(f"{where} reads attribute {args[1:]!r}: only public attributes named by a constant")


_OVERRIDABLE: set[int] = set()


def _overridable() -> set[int]:
    """The functions that dispatch on tensors (``torch.overrides``): no file, printing or global
    state functions (``torch.save``, ``torch.load``, ``torch.from_file``, ``manual_seed`` ...)."""
    if not _OVERRIDABLE:
        from torch.overrides import get_overridable_functions

        _OVERRIDABLE.update(id(f) for functions in get_overridable_functions().values() for f in functions)
    return _OVERRIDABLE


def _describe_module(module: nn.Module, tensors: Tensors, path: str, depth: int) -> dict[str, Any]:
    cls = type(module)
    if not cls.__module__.startswith("torch.nn.modules.") or depth > MAX_MODULE_DEPTH:
        raise NotCacheable(f"module '{path}' is a {cls.__module__}.{cls.__qualname__}: the cache stores "
                           "torch.nn's modules only")  # fmt: skip
    where = f"module '{path}'"
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "training": module.training,
        "attributes": {k: encode(v, tensors, f"{where} attribute '{k}'") for k, v in vars(module).items()
                       if k not in _MODULE_INTERNALS},  # fmt: skip
        "parameters": {k: None if p is None else tensors.add(p, f"{where}.{k}") for k, p in module._parameters.items()},
        "buffers": {k: None if b is None else tensors.add(b, f"{where}.{k}") for k, b in module._buffers.items()},
        "non_persistent": sorted(module._non_persistent_buffers_set),
        "children": {k: None if m is None else _describe_module(m, tensors, f"{path}.{k}", depth + 1)
                     for k, m in module._modules.items()},  # fmt: skip
    }


def encode(value: Any, tensors: Tensors, where: str, depth: int = 0) -> Any:
    """``value`` (nested tuples, lists, dicts of tensors, numbers, strings, ...) as JSON; its tensors
    added to ``tensors``. Raises :class:`NotCacheable` naming ``where``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if depth > MAX_DEPTH:
        raise NotCacheable(f"{where}: values nested deeper than {MAX_DEPTH}")
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, torch.Tensor):
        return {"tensor": tensors.add(value, where)}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [encode(v, tensors, where, depth + 1) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, tensors, where, depth + 1), encode(v, tensors, where, depth + 1)]
                         for k, v in value.items()]}  # fmt: skip
    if isinstance(value, slice):
        return {"slice": [encode(v, tensors, where, depth + 1) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    leaf = torch_format.encode_leaf(value)
    if leaf is torch_format.NOT_A_LEAF:
        raise NotCacheable(f"{where} holds a {type(value).__name__}")
    return leaf


def _plain_stack(stack: Any) -> Any:
    """``nn_module_stack`` maps keys to (path, class); the class is kept as its name."""
    return {str(k): [str(v[0]), str(v[1])] for k, v in stack.items()} if isinstance(stack, dict) else {}


# --- rebuilding ----------------------------------------------------------------------------------


def rebuild(
    description: dict[str, Any], tensors: list[torch.Tensor], modules: Callable[[str], nn.Module] | None = None
) -> fx.GraphModule:
    """The graph module :func:`describe` described. ``modules`` gives the module at a path (the
    original objects, for the in-memory round trip); without it each is rebuilt from its
    description. Raises :class:`Invalid` for a description that breaks the rules."""
    graph, root = fx.Graph(), nn.Module()
    env: dict[str, fx.Node] = {}
    made = modules or (lambda path: _build_module(_dict(description["modules"], "modules")[path], tensors, 0))
    for path in _dict(description["modules"], "modules"):
        _place(root, path, made(path))
    for path, value in _dict(description["attributes"], "attributes").items():
        if not any(path.startswith(m + ".") for m in description["modules"]):  # else read from the module
            _place(root, path, decode(value, env, tensors))
    for entry in _list(description["nodes"], "nodes"):
        op, name, target = entry["op"], entry["name"], entry["target"]
        if op not in ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output"):
            raise Invalid(f"node {name!r} has op {op!r}")
        if not isinstance(name, str) or not isinstance(target, str):
            raise Invalid(f"node {name!r}: name and target must be strings")
        args, kwargs = decode(entry["args"], env, tensors), decode(entry["kwargs"], env, tensors)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise Invalid(f"node {name!r}: args must be a tuple and kwargs a dict")
        real = _find_function(target) if op == "call_function" else target
        _safe_call(op, real, args, f"node {name!r}", Invalid)
        node = graph.create_node(op, real, args, kwargs, name=name)
        stack = _dict(_dict(entry.get("meta", {}), "meta").get("nn_module_stack", {}), "nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {str(k): (str(v[0]), str(v[1])) for k, v in stack.items()}
        env[name] = node
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name=str(description["class_name"]))
    for node in gm.graph.nodes:  # a value read from the module is data, never a module to call methods on
        if node.op == "get_attr" and not isinstance(_fetch(gm, str(node.target)), torch.Tensor):
            raise Invalid(f"node {node.name!r} reads {node.target!r}, which is not a tensor")
    gm.training = bool(description["training"])
    return gm


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"'{what}' must be an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise Invalid(f"'{what}' must be a list")
    return value


def _place(root: nn.Module, path: str, value: Any) -> None:
    *owners, field = path.split(".")
    if not all(_NAME.fullmatch(part) for part in (*owners, field)):  # layers.0.weight, 0_pruned
        raise Invalid(f"path {path!r}")
    for part in owners:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root._modules[part]  # type: ignore[assignment]
    if isinstance(value, nn.Module):
        root.add_module(field, value)
    elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        root.register_buffer(field, value)
    else:
        setattr(root, field, value)


def _find_function(name: str) -> Any:
    if name == "builtins.getattr":
        return builtins.getattr
    if name.startswith("op:"):
        namespace, _, rest = name.removeprefix("op:").partition("::")
        op_name, _, overload = rest.rpartition(".")
        if namespace not in torch_format.NAMESPACES or not op_name.isidentifier() or not overload.isidentifier():
            raise Invalid(f"function {name!r}")
        found = getattr(getattr(getattr(torch.ops, namespace), op_name, None), overload, None)
        if not isinstance(found, torch._ops.OpOverload) or why_not_cached(found) is not None:
            raise Invalid(f"function {name!r} is not allowed in a cached program")
        return found
    namespace, _, attribute = name.rpartition(".")
    module = _NAMESPACES.get(namespace)
    function = getattr(module, attribute, None) if module is not None and attribute.isidentifier() else None
    if function is None or attribute.startswith("__") or not _allowed_function(namespace, attribute, function):
        raise Invalid(f"function {name!r} is not allowed in a cached program")
    return function


def _build_module(entry: Any, tensors: list[torch.Tensor], depth: int) -> nn.Module:
    """A module of an allowed class with the described state; its constructor is not called."""
    entry = _dict(entry, "module")
    cls = _module_class(entry["class"])
    if depth > MAX_MODULE_DEPTH:
        raise Invalid("modules nested too deep")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in _dict(entry["attributes"], "attributes").items():
        if key in _MODULE_INTERNALS or not key.isidentifier():
            raise Invalid(f"module attribute {key!r}")
        module.__dict__[key] = decode(value, {}, tensors)
    for key, index in _dict(entry["parameters"], "parameters").items():
        module._parameters[key] = None if index is None else _parameter(_tensor(tensors, index))
    for key, index in _dict(entry["buffers"], "buffers").items():
        module._buffers[key] = None if index is None else _tensor(tensors, index)
    module._non_persistent_buffers_set = {str(k) for k in _list(entry["non_persistent"], "non_persistent")}
    for key, child in _dict(entry["children"], "children").items():
        if not _NAME.fullmatch(key):
            raise Invalid(f"child module {key!r}")
        module._modules[key] = None if child is None else _build_module(child, tensors, depth + 1)
    module.training = bool(entry["training"])
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()  # the list of its weights, which refers to the parameters
    return module


def _module_class(name: Any) -> type[nn.Module]:
    module_name, _, qualname = str(name).partition(":")
    found: Any = sys.modules.get(module_name) if module_name.startswith("torch.nn.modules.") else None
    for part in qualname.split("."):
        found = getattr(found, part, None) if part.isidentifier() and not part.startswith("__") else None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise Invalid(f"module class {name!r} is not one of torch.nn's")
    return found


def _tensor(tensors: list[torch.Tensor], index: Any) -> torch.Tensor:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(tensors):
        raise Invalid(f"tensor index {index!r}")
    return tensors[index]


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def decode(value: Any, env: dict[str, fx.Node], tensors: list[torch.Tensor], depth: int = 0) -> Any:
    """The value :func:`encode` wrote (``env``: the nodes made so far). Raises :class:`Invalid`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > MAX_DEPTH or not isinstance(value, dict) or len(value) != 1:
        raise Invalid(f"value {str(value)[:80]!r}")
    (kind, payload), = value.items()
    if kind == "node" and payload in env:
        return env[payload]
    if kind == "tensor":
        return _tensor(tensors, payload)
    if kind in ("list", "tuple", "size", "slice") and isinstance(payload, list):
        items = [decode(v, env, tensors, depth + 1) for v in payload]
        if kind == "size":
            return torch.Size(items)
        return slice(*items) if kind == "slice" and len(items) == 3 else tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(payload, list):
        return {decode(k, env, tensors, depth + 1): decode(v, env, tensors, depth + 1) for k, v in payload}
    if kind == "ellipsis":
        return Ellipsis
    leaf = torch_format.decode_leaf(kind, payload)
    if leaf is torch_format.NOT_A_LEAF:
        raise Invalid(f"value {str(value)[:80]!r}")
    return leaf
