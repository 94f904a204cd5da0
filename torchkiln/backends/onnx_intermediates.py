"""Intermediate values of an ONNX artifact, mapped back to the modules they came from.

The exporter records for every ONNX node the module path it came from (metadata
``pkg.torch.onnx.name_scopes``: ``['layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d']``, the last
entry being the FX node). A module's *outputs* are the float values its nodes produce that a node
outside the module (or the graph's output) consumes; a module called twice (a shared ReLU) has one
exit per call, in graph order. :func:`run_values` exposes any of them as extra graph outputs and
runs ONNX Runtime once.

Exposing a value keeps ONNX Runtime from fusing across it (the producer must materialize it), so
intermediate values come from a slightly less fused session than the artifact's own; the final
outputs of the untouched artifact are compared separately by the caller.
"""

from __future__ import annotations

import ast
import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torchkiln.backends.onnx_backend import quiet_session_options

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_FLOAT_TYPES = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclasses.dataclass(frozen=True)
class ModuleValue:
    module: str  # module path, "layer1.0.conv1"
    call: int  # which call of the module (0 unless it is reused)
    value: str  # ONNX value name
    node: str  # ONNX node producing it
    fx_node: str  # FX node of the exported program that produced it


def scope_names(node: Any) -> list[str]:
    """The exporter's name scopes of an ONNX node: module paths, outermost first, then the FX node."""
    raw = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), None)
    try:
        names = ast.literal_eval(raw) if raw else []
    except (ValueError, SyntaxError):
        return []
    return [str(n) for n in names]


def scopes(node: Any) -> list[str]:
    """The module paths a node sits in, outermost first (the root is not listed)."""
    return [s for s in scope_names(node)[:-1] if s]


def module_values(model_path: Path) -> dict[str, list[ModuleValue]]:
    """For every module path: its output value per call, in graph order."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    float_values = _float_values(model)
    nodes = list(model.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    inside = [set(scopes(node)) for node in nodes]
    exits: dict[str, list[str]] = {}

    def leave(consumer_scopes: set[str], value: str) -> None:
        source = producer.get(value)
        if source is None or value not in float_values:
            return
        for module in inside[source] - consumer_scopes:
            if value not in exits.setdefault(module, []):
                exits[module].append(value)

    for index, node in enumerate(nodes):
        for value in node.input:
            leave(inside[index], value)
    for out in model.graph.output:
        leave(set(), out.name)
    result = {}
    for module, values in exits.items():
        ordered = sorted(values, key=lambda v: producer[v])
        result[module] = [
            ModuleValue(module, call, v, nodes[producer[v]].name, _fx_node(nodes[producer[v]]))
            for call, v in enumerate(ordered)
        ]
    return result


def _fx_node(node: Any) -> str:
    names = scope_names(node)
    return names[-1] if names else ""


def _float_values(model: Any) -> dict[str, int]:
    """Value name -> element type, for float values (shape inference fills intermediates in)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - custom-domain ops can stop inference; use what is recorded
        inferred = model
    infos = [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    return {
        info.name: info.type.tensor_type.elem_type
        for info in infos
        if info.type.tensor_type.elem_type in _FLOAT_TYPES
    }


def run_values(
    model_path: Path, feeds: dict[str, np.ndarray], values: Sequence[str], optimize: bool = True
) -> dict[str, np.ndarray]:
    """Run the model with ``values`` exposed as outputs; returns every output by name."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    types = _float_values(model)
    present = {out.name for out in model.graph.output}
    for name in values:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, 1), None))
    options = quiet_session_options()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="torchkiln-compare-") as work:
        data = model_path.with_name(model_path.name + ".data")
        if data.exists():  # external weights are found relative to the model file
            (Path(work) / data.name).symlink_to(data.resolve())
        exposed = Path(work) / model_path.name
        onnx.save(model, str(exposed))
        session = ort.InferenceSession(str(exposed), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))
