"""Building a TensorRT engine from an ONNX file (TensorRT 10 Python API). Needs a GPU.

``build_engine`` = parse (errors name the ONNX node and its module) → builder config (precision
flags, sparse weights, workspace, optimization level, profiles, timing cache loaded and saved back)
→ ``build_serialized_network`` → the engine inspector's per-layer precision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchkiln.backends.onnx_intermediates import scope_names, scopes
from torchkiln.compiler.files import write_atomic
from torchkiln.errors import BackendError, ExportError

_FLAGS = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}


def build_engine(
    trt: Any, onnx_path: Path, options: Any, profiles: dict[str, Any], cache_path: Path
) -> tuple[bytes, list[dict[str, Any]]]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise parse_error(parser, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    config.builder_optimization_level = options.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer precision in the inspector
    for precision in options.precision:
        if precision in _FLAGS:
            config.set_flag(getattr(trt.BuilderFlag, _FLAGS[precision]))
    if options.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profiles.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(
            "TensorRT could not build an engine", hint="see TensorRT's log above; try precision=fp32"
        )
    _save_timing_cache(config.get_timing_cache(), cache_path)
    engine_bytes = bytes(serialized)
    return engine_bytes, layer_precisions(trt, logger, engine_bytes)


def parse_error(parser: Any, onnx_path: Path) -> ExportError:
    """The first parser error, with the ONNX node and the module it came from."""
    import onnx

    error = parser.get_error(0)
    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    index = error.node()
    where = None
    if 0 <= index < len(nodes):
        node = nodes[index]
        names = scope_names(node)
        module = next(reversed(scopes(node)), "(root)")
        where = f"ONNX node '{node.name}' ({node.op_type}) from module '{module}', FX node '{names[-1] if names else '?'}'"
    more = f" (+{parser.num_errors - 1} more)" if parser.num_errors > 1 else ""
    return ExportError(
        f"TensorRT's ONNX parser failed: {error.desc()}{more}",
        where=where,
        hint="rewrite the op, or use backend onnxruntime (TensorRT provider) which falls back per node",
    )


def layer_precisions(trt: Any, logger: Any, engine_bytes: bytes) -> list[dict[str, Any]]:
    """Name, type and output precision TensorRT chose for each layer."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # without DETAILED verbosity the list holds names only
            layers.append({"name": layer})
            continue
        outputs = layer.get("Outputs") or [{}]
        layers.append({
            "name": layer.get("Name"), "type": layer.get("LayerType"),
            "precision": str(outputs[0].get("Format/Datatype", "?")).split()[-1].lower(),
        })  # fmt: skip
    return layers


def _save_timing_cache(cache: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, bytes(cache.serialize()))
