"""Small helpers over torch.fx graphs shared by the tracer, the passes and the instruments."""

from __future__ import annotations

import collections
import operator
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import CodeGen
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree


def flat_graph_module(gm: fx.GraphModule, training: bool) -> fx.GraphModule:
    """Rebuild a GraphModule from ``torch.export(...).module()`` with the flat calling convention.

    Drops the input-guard call and the pytree codegen (and with it the forward pre-hook that checks
    the original argument structure); torchkiln checks inputs itself against the Program's specs.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = CodeGen()
    flat = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    flat.training = training
    return flat


def flatten_output(gm: fx.GraphModule, expected: int) -> None:
    """Make the graph return a flat tuple of its ``expected`` output leaves.

    Usually the output node's argument shows the structure (a tuple/dict of nodes). When a node
    builds it instead (fx records ``NamedTuple(a, b)`` as a call), flatten the value in the graph.
    """
    output = output_node(gm.graph)
    leaves, _ = pytree.tree_flatten(output.args[0])
    if len(leaves) != expected or not all(isinstance(leaf, fx.Node) for leaf in leaves):
        with gm.graph.inserting_before(output):
            flat = gm.graph.call_function(tree_leaves, (output.args[0],))
            leaves = [gm.graph.call_function(operator.getitem, (flat, i)) for i in range(expected)]
    output.args = (tuple(leaves),)
    gm.recompile()


def tree_leaves(value: Any) -> tuple[Any, ...]:
    """The leaves of a pytree as a tuple (a graph-callable helper for :func:`flatten_output`)."""
    return tuple(pytree.tree_leaves(value))


def output_node(graph: fx.Graph) -> fx.Node:
    for node in reversed(graph.nodes):
        if node.op == "output":
            return node
    raise ValueError("graph has no output node")


def module_path(node: fx.Node) -> str:
    """The module a node came from (``layer1.0.conv1``), or the node's name at the root."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else node.name


def op_key(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """A readable op name for histograms: module class for call_module, target name otherwise."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            namespace, _, name = target._schema.name.partition("::")
            return f"{namespace}.{name}"
        return getattr(target, "__name__", str(target))
    return None


def op_histogram(gm: fx.GraphModule) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for node in gm.graph.nodes:
        key = op_key(node, gm)
        if key is not None:
            counts[key] += 1
    return dict(sorted(counts.items()))


def parameter_stats(gm: nn.Module) -> tuple[int, int]:
    """(number of parameter elements, bytes of parameters and buffers)."""
    params = sum(p.numel() for p in gm.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in gm.parameters())
    nbytes += sum(b.numel() * b.element_size() for b in gm.buffers())
    return params, nbytes


def annotate(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Shape propagation: store ``tensor_meta`` (shape, dtype) on every node that yields a tensor.
    Runs on copies: a graph that writes into its inputs must not change the stored checks."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*(t.clone() for t in inputs))


def shape_of(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def dtype_of(node: Any) -> torch.dtype | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta.dtype if meta is not None and hasattr(meta, "dtype") else None


def add_attribute(gm: fx.GraphModule, base: str, value: torch.Tensor, parameter: bool) -> str:
    """Register ``value`` on the root module under a fresh name derived from ``base``; return it."""
    stem = "".join(c if c.isalnum() else "_" for c in base).strip("_") or "const"
    name, i = stem, 0
    while hasattr(gm, name):
        i += 1
        name = f"{stem}_{i}"
    if parameter:
        gm.register_parameter(name, torch.nn.Parameter(value.detach(), requires_grad=False))
    else:
        gm.register_buffer(name, value.detach())
    return name


def get_attr_value(gm: fx.GraphModule, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    return getattr(module, leaf)


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete submodules, parameters and buffers that no node references any more."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(recurse=True, remove_duplicate=False)) + list(
        gm.named_buffers(recurse=True, remove_duplicate=False)
    ):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            if not _used_by_called_module(gm, owner):
                delattr(module, leaf)
    gm.delete_all_unused_submodules()


def _used_by_called_module(gm: fx.GraphModule, owner: str) -> bool:
    if not owner:
        return False
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    return any(owner == c or owner.startswith(c + ".") for c in called)


def call_module_count(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def embedding_ranges(gm: fx.GraphModule, names: Sequence[str]) -> dict[str, tuple[tuple[int, int], str]]:
    """Integer inputs used as the indices of an embedding table, directly or through ops that keep
    every value (GPT-2 views its ids first): ``[0, rows)``, and the table's name. fx graphs call the
    module (``nn.Embedding``) or ``F.embedding``; export graphs call ``aten.embedding(weight, indices)``."""
    found: dict[str, tuple[tuple[int, int], str]] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.target not in names:
            continue
        for ids in _same_values(node):
            for user in ids.users:
                table = _embedding_table(gm, user, ids)
                if table is None:
                    continue
                rows, label = table
                known = found.get(node.target)
                if known is None or rows < known[0][1]:
                    found[node.target] = ((0, rows), label)
    return found


#: ops whose output holds every value of their first argument, rearranged (not a slice: ids it drops
#: never index the table, so they may lie outside it)
_KEEP_VALUES_METHODS = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "expand", "contiguous", "clone",
                        "transpose", "permute", "view_as", "expand_as", "reshape_as"}  # fmt: skip
_KEEP_VALUES_ATEN = {"view", "_unsafe_view", "reshape", "flatten", "unsqueeze", "squeeze", "expand", "clone",
                     "contiguous", "transpose", "permute", "alias", "lift_fresh_copy"}  # fmt: skip


def _same_values(start: fx.Node) -> list[fx.Node]:
    """``start`` and every node reached from it through :data:`_KEEP_VALUES_METHODS` / ``_ATEN`` ops."""
    reached, frontier = [start], [start]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user not in reached and user.args and user.args[0] is node and _keeps_values(user):
                reached.append(user)
                frontier.append(user)
    return reached


def _keeps_values(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _KEEP_VALUES_METHODS
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.namespace == "aten" and node.target._schema.name.split("::")[-1] in _KEEP_VALUES_ATEN
    return getattr(node.target, "__name__", None) in _KEEP_VALUES_METHODS and getattr(node.target, "__module__", "") in (
        "torch", "torch.functional", None)  # torch.reshape, torch.flatten, ...


def _embedding_table(gm: fx.GraphModule, user: fx.Node, ids: fx.Node) -> tuple[int, str] | None:
    if user.op == "call_module":
        module = gm.get_submodule(str(user.target))
        if isinstance(module, nn.Embedding) and user.args and user.args[0] is ids:
            return module.num_embeddings, f"embedding '{user.target}' ({module.num_embeddings} rows)"
        return None
    if user.op != "call_function":
        return None
    if user.target is torch.ops.aten.embedding.default and len(user.args) > 1 and user.args[1] is ids:
        weight = user.args[0]
    elif user.target is nn.functional.embedding and user.args and user.args[0] is ids:
        weight = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
    else:
        return None
    meta = getattr(weight, "meta", {}).get("tensor_meta")
    if meta is None:
        return None
    label = getattr(weight, "target", getattr(weight, "name", "weight"))
    return int(meta.shape[0]), f"embedding '{label}' ({int(meta.shape[0])} rows)"


_EXECUTING = re.compile(r"While executing %(\w+) : .*?\[target=(?:torch\.ops\.)?([^\]]+)\]")


def failed_node(text: str) -> tuple[str, str] | None:
    """(node name, target) from the report fx's interpreter appends to an exception raised while
    running a graph (``While executing %view_4 : ... [target=torch.ops.aten.view.default]``)."""
    found = _EXECUTING.search(text)
    return (found.group(1), found.group(2)) if found else None
