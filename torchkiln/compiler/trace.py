"""Capture a model as a :class:`Program`.

Two frontends produce the two graph flavours the passes understand:

* ``fx``: ``torch.fx`` symbolic tracing. Module calls stay ``call_module`` nodes (``Conv2d``,
  ``BatchNorm2d``), which keeps module names and is cheap.
* ``export``: ``torch.export`` then ``.module()``. ATen-level ``call_function`` nodes
  (``aten.conv2d``, ``aten.batch_norm``) with weights as ``get_attr`` nodes. It handles what symbolic
  tracing cannot (data-dependent shapes, Hugging Face models) at the cost of a slower capture.

``auto`` tries fx and falls back to export; it also prefers export when fx would keep an
``nn.MultiheadAttention`` or ``nn.Transformer*`` module as one opaque call (their projections are
layers that quantize, prune and low-rank rewrite). The user's module is never mutated: both trace a copy.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from torchkiln.compiler import arguments
from torchkiln.compiler import graph as G
from torchkiln.compiler.export import export_graph, widen
from torchkiln.compiler.program import (
    CONSTANT_TYPES,
    Check,
    Constant,
    Program,
    TensorSpec,
    deterministic,
    fresh,
)
from torchkiln.compiler.verify import compare
from torchkiln.errors import ConfigError, InputError, TraceError

FRONTENDS = ("auto", "fx", "export")
DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]] | str | None
_TORCH_DIR = os.path.dirname(torch.__file__)


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    frontend: str = "auto",
    dynamic_axes: DynamicAxes = None,
    leaf_modules: Sequence[str] = (),
    name: str | None = None,
) -> Program:
    """Trace a copy of ``model`` on ``example_inputs`` (a tensor, a tuple of tensors, or a dict of
    keyword tensors) into a Program annotated with shapes and dtypes."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    arguments.strings("leaf_modules", leaf_modules)
    arguments.text("name", name, optional=True)
    if not isinstance(frontend, str) or frontend not in FRONTENDS:
        raise ConfigError(
            f"unknown frontend '{frontend}'", where="frontend", hint=f"choose one of {FRONTENDS}"
        )
    args, kwargs = _split_inputs(example_inputs)
    names, flat, constants = _bind(model, args, kwargs)
    axes = normalize_dynamic_axes(dynamic_axes, names, flat)
    work = private_copy(model)

    checks, out_spec = _checks(work, names, tuple(flat), axes, constants)
    out_flat = checks[0].outputs
    gm, flavour = _capture(work, names, flat, axes, frontend, leaf_modules, constants)
    G.flatten_output(gm, len(out_flat))

    _verify_capture(gm, checks, axes)
    G.annotate(gm, checks[0].inputs)
    ranges = G.embedding_ranges(gm, names)
    inputs = [TensorSpec.of(n, t, axes.get(n), *ranges.get(n, (None, None))) for n, t in zip(names, flat)]
    outputs = [
        TensorSpec.of(f"output_{i}" if len(out_flat) > 1 else "output", t) for i, t in enumerate(out_flat)
    ]
    outputs = _mark_dynamic_outputs(outputs, checks)
    notes = [
        f"output {i} has NaN/Inf on the example inputs; verification only covers its finite elements"
        for i, t in enumerate(out_flat)
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if constants:
        notes.append("constants baked into the graph: " + ", ".join(f"{k}={v!r}" for k, v in constants.items()))
    program = Program(gm, inputs, outputs, out_spec, flavour, checks, name or type(model).__name__, notes)
    program.constants = constants
    return program


def private_copy(model: nn.Module, share_parameters: bool = False) -> nn.Module:
    """A deep copy to trace or run: nothing torchkiln does may change the user's module (a forward
    that counts its calls, a buffer it updates). ``share_parameters`` keeps the parameter tensors
    (a reference to run eagerly costs no second copy of the weights; forwards do not write them)."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    memo: dict[int, Any] = {id(p): p for p in model.parameters()} if share_parameters else {}
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # deepcopy of arbitrary user objects can fail in many ways
        raise TraceError(
            f"cannot copy the model: {type(exc).__name__}: {exc}", hint="make the module deep-copyable"
        ) from exc


#: layers whose output depends on the training flag (others of torch.nn do not read it)
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def eval_copy(model: nn.Module) -> str:
    """Put ``model`` (a private copy) in eval mode, as ``torch.onnx.export`` exports by default: an
    artifact is for inference. Returns what changed, for the report ("" when it already was):
    the mode-dependent layers by name, and how many modules of the user's own classes (whose
    forward may read the flag) were in training mode."""
    training = [(name, m) for name, m in model.named_modules() if m.training]
    model.eval()
    layers = [f"{name or '(root)'} ({type(m).__name__})" for name, m in training if _reads_mode(m)]
    own = sum(1 for _, m in training if not type(m).__module__.startswith("torch.nn."))
    if not layers and not own:  # torch.nn layers that never read the flag (Linear, Conv, ReLU, ...)
        return ""
    shown = ", ".join(layers[:6]) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
    return ("the model was in training mode; compiled its eval() copy (the model itself is unchanged): "
            + "; ".join(x for x in (f"{len(layers)} mode-dependent layer(s): {shown}" if layers else "",
                                    f"{own} module(s) of its own classes" if own else "") if x))  # fmt: skip


def _reads_mode(module: nn.Module) -> bool:
    """A torch.nn layer whose output depends on its training flag."""
    if isinstance(module, _MODE_DEPENDENT):
        return True
    return isinstance(module, (nn.RNNBase, nn.MultiheadAttention)) and float(getattr(module, "dropout", 0) or 0) > 0


def _checks(
    model: nn.Module,
    names: Sequence[str],
    flat: tuple[torch.Tensor, ...],
    axes: Mapping[str, Mapping[int, str]],
    constants: Mapping[str, Constant],
) -> tuple[list[Check], pytree.TreeSpec]:
    """Eager outputs at the example inputs and, with dynamic axes, at inputs one larger along them."""
    first, out_spec = _reference(model, names, flat, constants)
    checks = [first]
    if axes:
        try:
            checks.append(_reference(model, names, widen(flat, names, axes), constants)[0])
        except InputError as exc:
            raise ConfigError(
                f"the model does not run when its dynamic axes {axes} change size: {exc.message}",
                where="dynamic_axes",
                hint="make only the axes the model really accepts at any size dynamic",
            ) from exc
    return checks, out_spec


def _capture(
    model: nn.Module,
    names: Sequence[str],
    flat: Sequence[torch.Tensor],
    axes: Mapping[str, Mapping[int, str]],
    frontend: str,
    leaf_modules: Sequence[str],
    constants: Mapping[str, Constant],
) -> tuple[fx.GraphModule, str]:
    if frontend == "fx":
        return _fx_capture(model, names, leaf_modules, constants), "fx"
    if frontend == "export":
        return _export_capture(model, names, flat, axes, constants), "export"
    try:
        gm = _fx_capture(model, names, leaf_modules, constants)
    except TraceError as fx_error:
        try:
            return _export_capture(model, names, flat, axes, constants), "export"
        except TraceError as export_error:
            raise TraceError(
                f"{fx_error.message}; torch.export also failed: {export_error.message}",
                where=fx_error.where,
                hint=(fx_error.hint or "").replace(
                    ", or use frontend='export'", "; for torch.export rewrite the branch with torch.cond"
                ),
            ) from export_error
    opaque = _opaque_modules(gm, leaf_modules)
    if opaque:  # their projections would be invisible to passes: torch.export shows them
        try:
            return _export_capture(model, names, flat, axes, constants), "export"
        except TraceError:
            pass  # the fx graph still computes the model; quantize names the opaque calls
    return gm, "fx"


#: torch.nn modules fx keeps as one call although they hold Linear projections passes rewrite
_COMPOSITE = (
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
    nn.TransformerDecoder, nn.Transformer,
)  # fmt: skip


def _opaque_modules(gm: fx.GraphModule, leaf_modules: Sequence[str]) -> list[str]:
    """Module calls fx left opaque that hold weight layers (not the ones the user asked for)."""
    return [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module"
        and str(n.target) not in leaf_modules
        and isinstance(gm.get_submodule(str(n.target)), _COMPOSITE)
    ]


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(example_inputs).__name__}"
    )


def _bind(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[str], list[torch.Tensor], dict[str, Constant]]:
    """Example inputs by forward() parameter: the tensors (graph inputs) and the non-tensor values
    (constants baked into the graph)."""
    signature = inspect.signature(model.forward)
    _check_names(model, signature, kwargs)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InputError(
            f"example inputs do not fit {type(model).__name__}.forward{signature}: {exc}",
            hint="pass one value per forward() parameter, by position or by name",
        ) from None
    names, flat, constants = [], [], {}
    for key, value in bound.arguments.items():
        kind = signature.parameters[key].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise InputError(
                f"forward(*{key}) / forward(**{key}) parameters are not supported as inputs", where=key,
                hint="give the model a forward() with named parameters (wrap it in a small nn.Module)",
            )  # fmt: skip
        if isinstance(value, torch.Tensor):
            names.append(key)
            flat.append(_checked_example(key, value))
        else:
            constants[key] = _checked_constant(key, value)
    if not names:
        raise InputError("the model takes no tensor inputs", hint="pass at least one example tensor")
    return names, flat, constants


def _check_names(model: nn.Module, signature: inspect.Signature, kwargs: Mapping[str, Any]) -> None:
    """An example input named after no parameter: say so, instead of binding it to ``**kwargs``."""
    parameters = signature.parameters
    named = [n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in kwargs:
        if key not in parameters:
            raise InputError(
                f"example input '{key}' is not a parameter of {type(model).__name__}.forward",
                where=key,
                hint=f"forward's parameters: {', '.join(named) or '(none by name)'}",
            )


def _checked_example(key: str, value: torch.Tensor) -> torch.Tensor:
    if value.layout != torch.strided or value.is_meta:
        raise InputError(
            f"example input '{key}' is a {'meta' if value.is_meta else str(value.layout).removeprefix('torch.')} "
            "tensor; tracing and verification need dense tensors with data",
            where=key,
            hint="pass real example data (.to_dense() for a sparse tensor)",
        )
    if value.numel() == 0:
        raise InputError(
            f"example input '{key}' has no elements (shape {list(value.shape)}): verification would "
            "compare nothing",
            where=key,
            hint="give at least one element along every axis; make an axis dynamic to accept size 0 at run time",
        )
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise InputError(
            f"example input '{key}' contains NaN or Inf",
            where=key,
            hint="verification compares outputs on the example inputs: give finite values",
        )
    return value.detach().clone()  # the checks keep these: the caller may change theirs


def _checked_constant(key: str, value: Any) -> Constant:
    """bool / int / float / str / None become constants of the graph; nothing else can be one."""
    if not isinstance(value, CONSTANT_TYPES) or (isinstance(value, float) and not math.isfinite(value)):
        raise InputError(
            f"example input '{key}' is {value!r} ({type(value).__name__}): an input is a tensor or a "
            "constant (bool, int, finite float, str or None)",
            where=key,
            hint="pass tensors as graph inputs; other values must be one of those constant types",
        )
    return value


def normalize_dynamic_axes(
    spec: DynamicAxes, names: Sequence[str], flat: Sequence[torch.Tensor]
) -> dict[str, dict[int, str]]:
    """Accept ``"batch"`` (axis 0 of every input), ``{name: [axes]}`` or ``{name: {axis: dim_name}}``."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        if spec != "batch":
            raise ConfigError(
                f"dynamic_axes='{spec}' is not understood", hint='use "batch" or {input: {axis: name}}'
            )
        spec = {n: {0: "batch"} for n in names}
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"dynamic_axes must be \"batch\" or a mapping of input names to axes, got {type(spec).__name__}",
            where="dynamic_axes",
            hint='e.g. dynamic_axes="batch" or {"input_ids": {0: "batch", 1: "sequence"}}',
        )
    rank = dict(zip(names, (t.dim() for t in flat)))
    result: dict[str, dict[int, str]] = {}
    for input_name, axes in spec.items():
        if input_name not in rank:
            raise ConfigError(
                f"dynamic_axes names unknown input '{input_name}'",
                where="dynamic_axes",
                hint=f"inputs: {list(names)}",
            )
        if isinstance(axes, (str, bytes)) or not isinstance(axes, (Mapping, Sequence, set)):
            raise ConfigError(
                f"dynamic_axes['{input_name}'] must be a list of axes or {{axis: name}}, got {axes!r}",
                where=f"dynamic_axes.{input_name}",
            )
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
            raise ConfigError(
                f"dynamic_axes['{input_name}'] has a non-integer axis: {list(axes)!r}",
                where=f"dynamic_axes.{input_name}",
                hint="axes are dimension indices, e.g. [0, 1]; name them with {0: 'batch'}",
            )
        if not isinstance(axes, Mapping):
            axes = {int(a): f"{input_name}_dim{int(a)}" for a in axes}
        for axis in axes:
            if not -rank[input_name] <= int(axis) < rank[input_name]:
                raise ConfigError(
                    f"dynamic axis {axis} is out of range for input '{input_name}' of rank {rank[input_name]}",
                    where=f"dynamic_axes.{input_name}",
                )
        result[input_name] = {int(a) % rank[input_name]: str(d) for a, d in axes.items()}
    return result


def _reference(
    model: nn.Module, names: Sequence[str], flat: tuple[torch.Tensor, ...], constants: Mapping[str, Constant]
) -> tuple[Check, pytree.TreeSpec]:
    try:
        with deterministic():
            result = model(**dict(zip(names, fresh(flat))), **constants)
    except Exception as exc:
        shapes = ", ".join(f"{n}: {list(t.shape)} {t.dtype}" for n, t in zip(names, flat))
        raise InputError(
            f"the model fails on the example inputs ({shapes}): {type(exc).__name__}: {exc}",
            hint="check the example input shapes and dtypes against what the model expects",
        ) from exc
    leaves, _ = pytree.tree_flatten_with_path(result)
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TraceError(
                f"model output{pytree.keystr(path)} is a {type(leaf).__name__}, not a tensor",
                hint=_CACHE_HINT.format(model=type(model).__name__)
                if _is_hf_cache(leaf)
                else "return only tensors (in a tensor, tuple, list or dict)",
            )
    return Check(flat, tuple(leaf for _, leaf in leaves)), pytree.tree_structure(result)


_CACHE_HINT = (
    "{model} returns its KV cache, an object: for a graph without it pass use_cache=False in the example "
    "inputs; to generate, compile the model class with the LM head ('...ForCausalLM'), whose cache "
    "torchkiln compiles as tensor inputs and outputs"
)


def _is_hf_cache(value: Any) -> bool:
    """A transformers ``Cache`` (DynamicCache, EncoderDecoderCache, ...), found by its class names."""
    return any(
        cls.__module__.startswith("transformers") and cls.__name__.endswith("Cache") for cls in type(value).__mro__
    )


def _verify_capture(gm: fx.GraphModule, checks: list[Check], axes: Mapping[str, Mapping[int, str]]) -> None:
    """The captured graph must reproduce the eager model on every check (the traced shapes and,
    with dynamic axes, the widened ones) before any pass touches it."""
    for check in checks:
        shapes = ", ".join(str(list(t.shape)) for t in check.inputs)
        try:
            with deterministic():
                stats = compare(tuple(gm(*fresh(check.inputs))), check.outputs)
            cause = None if stats.within() else f"output {stats.worst_output} differs by {stats.max_abs:.3e}"
        except Exception as exc:
            cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if cause is None:
            continue
        if axes:
            raise ConfigError(
                f"the captured graph does not reproduce the model at input shapes {shapes}: {cause}",
                where="dynamic_axes",
                hint="the model fixes a dynamic axis to its traced size (e.g. through a Python int); "
                "drop that axis from dynamic_axes",
            )
        raise TraceError(f"the captured graph does not reproduce the model at input shapes {shapes}: {cause}")


def _mark_dynamic_outputs(outputs: list[TensorSpec], checks: list[Check]) -> list[TensorSpec]:
    """An output axis whose size differs between the checks is dynamic."""
    if len(checks) < 2:
        return outputs
    marked = []
    for spec, other in zip(outputs, checks[1].outputs):
        shape = tuple(
            f"{spec.name}_dim{i}" if isinstance(d, int) and i < other.dim() and other.shape[i] != d else d
            for i, d in enumerate(spec.shape)
        )
        marked.append(TensorSpec(spec.name, shape, spec.dtype))
    return marked


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Sequence[str]):
        super().__init__()
        self.leaf_paths = set(leaf_modules)
        self.path_stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_paths or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.path_stack.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.path_stack.pop()  # left in place on failure: it names the failing module
        return result


def _fx_capture(
    model: nn.Module, names: Sequence[str], leaf_modules: Sequence[str], constants: Mapping[str, Constant]
) -> fx.GraphModule:
    signature = inspect.signature(model.forward)
    concrete = {
        k: constants.get(k, p.default)
        for k, p in signature.parameters.items()
        if k not in names and (k in constants or p.default is not inspect.Parameter.empty)
    }
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:
        raise _explain_trace_failure(exc, tracer, type(model).__name__) from exc
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target not in names:
            _erase_with_users(graph, node)  # with fx's guards that the default was not overridden
    graph._codegen = fx.graph.CodeGen()
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.training = model.training
    return gm


def _erase_with_users(graph: fx.Graph, node: fx.Node) -> None:
    doomed, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in doomed:
                doomed.add(user)
                stack.append(user)
    for victim in reversed([n for n in graph.nodes if n in doomed]):
        graph.erase_node(victim)


def _explain_trace_failure(exc: Exception, tracer: _Tracer, model_name: str) -> TraceError:
    module = tracer.path_stack[-1] if tracer.path_stack else None
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    where = f"module '{module}'" if module else f"{model_name}.forward"
    if frames:
        frame = frames[-1]
        where += f", {frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    if "control flow" in text or "iterated" in text or "bool" in text:
        cause = f"data-dependent control flow ({text})"
    else:
        cause = f"unsupported call ({type(exc).__name__}: {text})"
    # only what compile() accepts: a leaf module keeps a submodule opaque; the root cannot be one
    hint = f"keep the module opaque with leaf_modules=['{module}']" if module else "rewrite that line"
    return TraceError(f"symbolic tracing failed: {cause}", where=where, hint=hint + ", or use frontend='export'")


def _export_capture(
    model: nn.Module,
    names: Sequence[str],
    flat: Sequence[torch.Tensor],
    axes: Mapping[str, Mapping[int, str]],
    constants: Mapping[str, Constant],
) -> fx.GraphModule:
    try:
        program = export_graph(model, names, flat, axes, constants)
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise TraceError(
            f"torch.export failed: {type(exc).__name__}: {lines[0] if lines else ''}",
            hint="see torch.export's documentation on dynamic shapes and unsupported Python; "
            "or make the model symbolically traceable",
        ) from exc
    gm = G.flat_graph_module(program.module(), training=model.training)
    for node in list(gm.graph.nodes):  # export keeps a placeholder per constant, unused once guards go
        if node.op == "placeholder" and node.target in constants and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm
