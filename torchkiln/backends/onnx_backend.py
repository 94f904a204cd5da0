"""``onnx`` backend: export the rewritten graph to an ONNX model.

Exporter: ``torch.onnx.export(..., dynamo=True)`` on a ``torch.export`` program of the rewritten
graph. It is the exporter PyTorch maintains (the TorchScript one warns that it will be removed),
it keeps dynamic axes as symbolic dims, and it records for every ONNX node the module path and FX
node it came from (``pkg.torch.onnx.name_scopes``); we rename nodes to ``<module path>/<OpType>``
so profiles and errors read in the user's terms. It costs ~1-3 s per export, which we accept.

Opset 23 by default: the exporter then writes ``scaled_dot_product_attention`` as ONNX's
``Attention`` op (grouped-query heads natively, the mask as given), which ONNX Runtime runs as one
kernel; at opset 18 it is decomposed into transposes, matmuls and a softmax that copy every key
(a decode step of a 125M Llama at batch 8, past 256: 92 ms at opset 18, 35 ms at 23 with cleanup's
grouped attention). TensorRT's backend keeps 18 (its ONNX parser lags).

The model is written to a staging directory as soon as it is built (``model.onnx``, plus
``model.onnx.data`` when weights go to external data: always above 2 GB) and checked with
``onnx.checker``. Running it uses ONNX Runtime on the CPU; the ``onnxruntime`` backend adds
provider and session choices.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import errno
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from torchkiln.backends.base import Artifact, Backend, BackendOptions
from torchkiln.backends.onnx_lowering import translation_table
from torchkiln.compiler import graph as G
from torchkiln.compiler.export import export_graph, quiet, recurrent_shapes
from torchkiln.compiler.files import remove_private
from torchkiln.compiler.options import option
from torchkiln.compiler.program import Program
from torchkiln.errors import ArtifactError, BackendError, ExportError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_TWO_GB = 2**31 - 1
MIN_OPSET = 18


@dataclasses.dataclass(frozen=True)
class OnnxOptions(BackendOptions):
    opset: int = option(
        23, "ONNX opset to emit (18 or newer; 23 and up turn attention into one Attention op)"
    )
    optimize: bool = option(True, "run the exporter's ONNX optimizer (constant folding, fusions)")
    external_data: Literal["auto", "always", "never"] = option(
        "auto", "store weights in model.onnx.data: auto = only when the model is over 2 GB"
    )
    check: bool = option(True, "validate the result with onnx.checker")
    nbits_accuracy_level: Literal[0, 1, 2, 3, 4] = option(
        0,
        "MatMulNBits (weight-only int4/int8) compute: 0 = ONNX Runtime's default (float), 4 = int8 "
        "activations per block (faster where the CPU has VNNI / AMX; measured error in the report)",
    )

    def validate(self) -> None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= self.opset <= newest:
            self.fail("opset", f"must be between {MIN_OPSET} and {newest} (this onnx), got {self.opset}")


def quiet_session_options() -> Any:
    """Session options whose logger stays silent: ONNX Runtime prints its own red ``[E:onnxruntime]``
    line above the error torchkiln raises for the same failure."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only
    return options


def _quiet_run_options() -> Any:
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


class OnnxArtifact(Artifact):
    backend = "onnx"
    options_class: type[OnnxOptions] = OnnxOptions

    def __init__(self, directory: Path, options: OnnxOptions, owns_directory: bool = False):
        self.directory = directory
        self.options = options
        self._session: Any = None
        self._input_names: list[str] | None = None
        self._run_options: Any = None
        self.loading = False  # while loading a saved artifact, which must not be written to
        if owns_directory:
            weakref.finalize(self, remove_private, directory)

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    def files(self) -> list[str]:
        if not self.model_path.is_file():  # its directory was removed under it (a temp cleaner)
            raise ArtifactError(
                f"the artifact's {MODEL_FILE} is gone from {self.directory}",
                where=str(self.model_path),
                hint="compile or load the model again",
            )
        return [f for f in (MODEL_FILE, DATA_FILE) if (self.directory / f).exists()]

    def file_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self.files())

    @property
    def session(self) -> Any:
        if self._session is None:
            self._session = self.create_session()
        return self._session

    def create_session(self) -> Any:
        import onnxruntime as ort

        return ort.InferenceSession(str(self.model_path), quiet_session_options(), providers=["CPUExecutionProvider"])

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        session = self.session
        if self._input_names is None:  # get_inputs() builds its list anew on every call
            self._input_names = [meta.name for meta in session.get_inputs()]
            self._run_options = _quiet_run_options()
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self._input_names, inputs)}
        try:
            outputs = session.run(None, feeds, self._run_options)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed to run {self.model_path}: {exc}") from exc
        return [torch.from_numpy(o) for o in outputs]

    def save(self, directory: Path) -> list[str]:
        names = self.files()
        for name in names:
            shutil.copyfile(self.directory / name, directory / name)
        return names

    @classmethod
    def load(cls, directory: Path, options: dict[str, Any]) -> OnnxArtifact:
        parsed = cls.options_class.from_mapping(options, owner=f"backend {cls.backend}")
        artifact = cls(directory, parsed)  # type: ignore[arg-type]
        check_external_data(artifact.model_path)
        artifact.loading = True
        try:
            artifact.session  # noqa: B018 - load eagerly so a corrupt file fails here
        except Exception as exc:
            raise ArtifactError(f"cannot load {MODEL_FILE}: {exc}", where=str(artifact.model_path)) from exc
        finally:
            artifact.loading = False
        return artifact


def check_external_data(model_path: Path) -> None:
    """Every tensor stored outside ``model.onnx`` must live in a plain file beside it: ONNX Runtime
    would otherwise read whatever path the model names (``../secret``, ``/etc/passwd``)."""
    import onnx

    if not model_path.is_file():
        raise FileNotFoundError(errno.ENOENT, "missing", str(model_path))
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise ArtifactError(f"cannot load {model_path.name}: {exc}", where=str(model_path)) from exc
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not _PLAIN_FILE.fullmatch(location) or not (model_path.parent / location).is_file():
            raise ArtifactError(
                f"{model_path.name}: tensor '{tensor.name}' is stored in {location!r}, which is not a file "
                "of the artifact",
                where=str(model_path),
                hint="external data must be a file listed in the artifact's manifest; rebuild the artifact",
            )


_PLAIN_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _all_tensors(graph: Any) -> Iterator[Any]:
    """Initializers and tensor attributes of ``graph`` and of every subgraph (If/Loop bodies)."""
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _all_tensors(sub)


def export_onnx(program: Program, options: OnnxOptions, directory: Path, compressed_dynamic: bool = False) -> None:
    """Export the program to ``directory/model.onnx`` (and its data file); ``compressed_dynamic``
    as :func:`~torchkiln.backends.onnx_lowering.translation_table`."""
    import onnx

    names = [s.name for s in program.inputs]
    try:
        exported = export_graph(_for_export(program.graph_module), names, program.example_inputs, program.dynamic_axes)
    except Exception as exc:
        raise ExportError(f"torch.export of the rewritten graph failed: {type(exc).__name__}: {exc}") from exc
    try:
        with quiet(), recurrent_shapes():  # the exporter re-runs shapes: keep the sequence symbolic there too
            onnx_program = torch.onnx.export(
                exported,
                (),
                dynamo=True,
                opset_version=options.opset,
                optimize=options.optimize,
                input_names=names,
                output_names=[s.name for s in program.outputs],
                verbose=False,
                custom_translation_table=translation_table(options.nbits_accuracy_level, compressed_dynamic),
            )
    except Exception as exc:
        raise _explain_export_failure(exc, exported, program) from exc
    assert onnx_program is not None  # dynamo=True always returns a program
    _rename_dims(onnx_program.model, program)
    _batch_free_rotary(onnx_program.model)
    _rename_nodes(onnx_program.model)
    external = {"always": True, "never": False, "auto": None}[options.external_data]
    with quiet():
        onnx_program.save(str(directory / MODEL_FILE), external_data=external)
    if options.check:
        try:
            onnx.checker.check_model(str(directory / MODEL_FILE))
        except Exception as exc:
            raise ExportError(f"the exported ONNX model failed onnx.checker: {exc}") from exc


def _for_export(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph as the exporter should see it (the program is not changed; weights are shared):

    * ``x.contiguous()`` becomes ``x.clone(memory_format=contiguous_format)``. With a dynamic axis,
      the exporter's decomposition can take a transposed tensor for contiguous, drop the copy and
      then fail to ``view`` it (T5's attention output: 'Cannot view a tensor with shape ...'); a
      clone always copies. In ONNX both are an Identity.
    * attention whose keys and values have one head broadcast over the query's heads (multi-query
      attention as Falcon writes it) gets ``enable_gqa=True``: the same result (query head i reads
      key/value head i // h = 0), and the exporter's Attention op requires the head counts to
      match or to be grouped."""
    if not any(_is_contiguous(n) or _broadcast_heads(n) for n in gm.graph.nodes):
        return gm
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if _is_contiguous(node):
            node.op, node.target = "call_function", torch.ops.aten.clone.default
            node.args, node.kwargs = node.args[:1], {"memory_format": torch.contiguous_format}
        elif _broadcast_heads(node):
            node.kwargs = {**node.kwargs, "enable_gqa": True}
    return torch.fx.GraphModule(gm, graph)


_ATTENTION = (torch.ops.aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention)


def _broadcast_heads(node: torch.fx.Node) -> bool:
    """Attention with [b, h, t, d] queries and [b, 1, s, d] keys and values, h > 1."""
    if node.op != "call_function" or node.target not in _ATTENTION or len(node.args) < 3:
        return False
    if node.kwargs.get("enable_gqa", False):
        return False
    query, key, value = (G.shape_of(a) for a in node.args[:3])
    if query is None or key is None or value is None or not len(query) == len(key) == len(value) == 4:
        return False
    return query[1] > 1 and key[1] == 1 and value[1] == 1


def _is_contiguous(node: torch.fx.Node) -> bool:
    method = node.op == "call_method" and node.target == "contiguous"
    return method or (node.op == "call_function" and node.target is torch.ops.aten.contiguous.default)


def _rename_dims(model: Any, program: Program) -> None:
    """Give symbolic dims the user's axis names (the exporter calls them s0, s77, ...)."""
    import onnx_ir as ir

    mapping: dict[str, str] = {}
    for value, spec in zip(model.graph.inputs, program.inputs):
        for dim, want in zip(value.shape or (), spec.shape):
            if isinstance(dim, ir.SymbolicDim) and dim.value and isinstance(want, str):
                mapping[dim.value] = want
    if not mapping:
        return
    values = list(model.graph.inputs) + [out for node in model.graph for out in node.outputs]
    for value in values:
        if value.shape is not None and any(
            isinstance(d, ir.SymbolicDim) and d.value in mapping for d in value.shape
        ):
            value.shape = ir.Shape(
                [
                    mapping.get(d.value or "", d.value) if isinstance(d, ir.SymbolicDim) else d
                    for d in value.shape
                ]
            )


def _batch_free_rotary(model: Any) -> int:
    """Expand the cos/sin caches of every ``RotaryEmbedding`` to the batch of its input.

    At opset 23 the exporter fuses transformers' rotary embedding into ONNX ``RotaryEmbedding``,
    whose caches (without ``position_ids``) are [batch, sequence, rotary dim / 2]. Positions computed
    in the graph (``arange`` under a model without a mask, an encoder's default positions) give
    caches with a batch of 1, and ONNX Runtime requires them to match the input's batch, so an
    artifact traced from one prompt failed at every other batch. ``Expand`` to [batch of x, ...]
    broadcasts them (a copy of a few KB per layer); caches already as wide as x are left alone.
    Returns the number of nodes rewritten."""
    import onnx_ir as ir

    rewritten = 0
    for number, node in enumerate(list(model.graph)):
        if node.op_type != "RotaryEmbedding" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
            continue
        x, changed = node.inputs[0], False
        for index in (1, 2):
            cache = node.inputs[index]
            if x is None or cache is None or _same_batch(x, cache):
                continue
            batch = ir.node("Shape", [x], {"start": 0, "end": 1})
            rest = ir.node("Shape", [cache], {"start": 1})
            shape = ir.node("Concat", [batch.outputs[0], rest.outputs[0]], {"axis": 0})
            expand = ir.node("Expand", [cache, shape.outputs[0]])
            for part, new in (("batch", batch), ("rest", rest), ("shape", shape), ("expanded", expand)):
                new.outputs[0].name = f"rotary_{number}_{index}_{part}"
            dtype = cache.dtype or x.dtype  # the spec: the caches have x's type
            if dtype is not None:
                expand.outputs[0].dtype = dtype
            if x.shape is not None and cache.shape is not None:
                expand.outputs[0].shape = ir.Shape([x.shape[0], *list(cache.shape)[1:]])
            model.graph.insert_before(node, [batch, rest, shape, expand])
            node.replace_input_with(index, expand.outputs[0])
            changed = True
        rewritten += changed
    return rewritten


def _same_batch(x: Any, cache: Any) -> bool:
    """Whether ``cache``'s first axis is provably ``x``'s (the same size, or the same named dim)."""
    if x.shape is None or cache.shape is None or len(x.shape) == 0 or len(cache.shape) == 0:
        return False
    a, b = x.shape[0], cache.shape[0]
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return not isinstance(a, int) and not isinstance(b, int) and a.value is not None and a.value == b.value


def _rename_nodes(model: Any) -> None:
    """``<module path>/<OpType>`` (or ``<fx node>/<OpType>`` at the root), made unique."""
    seen: dict[str, int] = {}
    for node in model.graph:
        raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        try:
            scopes = ast.literal_eval(raw) if raw else []
        except (ValueError, SyntaxError):
            scopes = []
        owner = next((s for s in reversed(scopes[:-1]) if s), None) or (scopes[-1] if scopes else "")
        base = f"{owner}/{node.op_type}" if owner else (node.name or node.op_type)
        count = seen.get(base, 0)
        seen[base] = count + 1
        node.name = base if count == 0 else f"{base}_{count}"
        # The exporter's provenance (stack traces, FX node text, class paths) can be half the file of
        # a small model; keep only the scope names, which map a node back to its module.
        for key in [k for k in node.metadata_props if k != "pkg.torch.onnx.name_scopes"]:
            del node.metadata_props[key]


_SUMMARY = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>: (.+)")


def _explain_export_failure(exc: Exception, exported: Any, program: Program) -> ExportError:
    """Name the node the exporter failed at and the cause its exception chain gives; only an
    error that says so is reported as a missing translation."""
    chain = _chain(exc)
    text = "\n".join(f"{e}" for e in chain)
    failed = G.failed_node(text)
    if failed is not None:
        node_name, op_name = failed
        cause = next((f"{type(e).__name__}: {str(e).splitlines()[0]}" for e in reversed(chain) if str(e).strip()), "")
        summary = _SUMMARY.search(text)
        cause = f"{summary.group(1)}: {summary.group(2)}" if summary else cause
        return ExportError(
            f"ONNX export failed at node '{node_name}' ({op_name}): {cause}",
            where=_node_where(exported, node_name=node_name),
            hint="try another opset, fewer dynamic axes, or the torch backend",
        )
    op = re.search(r"target=(?:torch\.ops\.)?([\w.]+)", text) or re.search(r"OpOverload\(op='([\w.]+)'", text)
    name = op.group(1) if op else None
    where = _node_where(exported, op_name=name) if name else None
    if name and _NO_TRANSLATION in text:
        return ExportError(
            f"ONNX export failed: no ONNX translation for {name}",
            where=where,
            hint="replace the op, register a custom ONNX translation (torch.onnx custom_translation_table), "
            "or use the torch backend",
        )
    deepest = next((e for e in reversed(chain) if str(e).strip()), exc)
    cause = f"{type(deepest).__name__}: {str(deepest).strip().splitlines()[0]}"
    return ExportError(
        f"ONNX export failed translating {name}: {cause}" if name else f"ONNX export failed: {cause}",
        where=where,
        hint="the exporter's translation of this op rejected its inputs: try another opset, or the torch backend",
    )


# What torch.onnx's dispatcher says when an op has no translation at all (not a failing one).
_NO_TRANSLATION = "No ONNX function found"


def _node_where(exported: Any, node_name: str | None = None, op_name: str | None = None) -> str | None:
    short = op_name.split(".")[1] if op_name and "." in op_name else op_name
    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        if (node_name is not None and node.name == node_name) or (short is not None and short in str(node.target)):
            stack = node.meta.get("nn_module_stack") or {}
            module = next(reversed(stack.values()))[0] if stack else "(root)"
            return f"FX node '{node.name}' in module '{module}'"
    return f"FX node '{node_name}' (after the exporter's decompositions)" if node_name else None


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and len(out) < 10:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


class OnnxBackend(Backend):
    name = "onnx"
    Options = OnnxOptions

    def lower(self, program: Program, options: BackendOptions) -> OnnxArtifact:
        assert isinstance(options, OnnxOptions)
        directory = Path(tempfile.mkdtemp(prefix="torchkiln-onnx-"))
        try:
            export_onnx(program, options, directory)
        except BaseException:
            remove_private(directory)
            raise
        return self.artifact_class(directory, options, owns_directory=True)

    def load(self, directory: Path, options: BackendOptions) -> OnnxArtifact:
        return self.artifact_class.load(directory, options.to_dict())

    artifact_class: type[OnnxArtifact] = OnnxArtifact


BACKEND = OnnxBackend()
