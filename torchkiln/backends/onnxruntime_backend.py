"""``onnxruntime`` backend: the ONNX model in an ONNX Runtime InferenceSession.

Providers: ``auto`` picks TensorRT, then CUDA, when the installed onnxruntime offers them (the
``onnxruntime-gpu`` package) and always ends with the CPU provider; an explicit list is checked
against what is installed. Session options are exposed as backend options; with
``save_optimized=true`` ONNX Runtime's optimized graph is saved next to the model as
``model.optimized.onnx`` (useful to see which integer/fused kernels it chose).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from torchkiln.backends.base import CacheSession, Memo
from torchkiln.backends.onnx_backend import OnnxArtifact, OnnxBackend, OnnxOptions, quiet_session_options
from torchkiln.backends.ort_cache import SharedCacheSession, shared_cache_model
from torchkiln.compiler.machine import cpu_model, int8_saturates
from torchkiln.compiler.options import option
from torchkiln.errors import BackendError

OPTIMIZED_FILE = "model.optimized.onnx"
_AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


@dataclasses.dataclass(frozen=True)
class OrtOptions(OnnxOptions):
    providers: tuple[str, ...] = option(
        ("auto",),
        "execution providers in priority order ('|'-separated); auto = TensorRT/CUDA when installed, then CPU",
    )
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = option(
        "all", "ONNX Runtime graph optimization level"
    )
    intra_op_threads: int = option(0, "threads used inside one op (0 = ONNX Runtime's default)")
    inter_op_threads: int = option(0, "threads used across ops (0 = ONNX Runtime's default)")
    save_optimized: bool = option(False, f"also save ONNX Runtime's optimized graph as {OPTIMIZED_FILE}")
    inplace_cache: bool = option(
        True, "generation writes each step's keys and values into one preallocated buffer per layer "
        "(GroupQueryAttention with IO binding, CPU) instead of concatenating a new cache every step"
    )

    def validate(self) -> None:
        super().validate()
        for key in ("intra_op_threads", "inter_op_threads"):
            if getattr(self, key) < 0:
                self.fail(key, f"must be >= 0, got {getattr(self, key)}")
        if not self.providers:
            self.fail("providers", "must name at least one provider (or auto)")


def resolve_providers(requested: tuple[str, ...]) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == ("auto",):
        return [p for p in _AUTO_ORDER if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        raise BackendError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime",
            where="backend onnxruntime.providers",
            hint=f"available: {', '.join(available)} (GPU providers need `pip install torchkiln[gpu]`)",
        )
    return list(requested)


class OrtArtifact(OnnxArtifact):
    backend = "onnxruntime"
    options_class = OrtOptions

    def __init__(self, directory: Path, options: OnnxOptions, owns_directory: bool = False):
        super().__init__(directory, options, owns_directory)
        #: (past input, present output) pairs -> the session of the graph rewritten for them (or None)
        self._shared: Memo[Any] = Memo()

    def create_session(self, model: bytes | None = None) -> Any:
        """The artifact's session, or one of ``model`` (a graph rewritten in memory) with the same
        options (never writing the optimized copy)."""
        import onnxruntime as ort

        options: OrtOptions = self.options  # type: ignore[assignment]
        session_options = quiet_session_options()
        session_options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _LEVELS[options.graph_optimization_level]
        )
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        if options.save_optimized and not self.loading and model is None:  # a loaded artifact already holds its copy
            session_options.optimized_model_filepath = str(self.directory / OPTIMIZED_FILE)
        return ort.InferenceSession(
            str(self.model_path) if model is None else model, session_options,
            providers=resolve_providers(options.providers),
        )  # fmt: skip

    def cache_session(
        self, pairs: Sequence[tuple[int, int]], initial: Sequence[torch.Tensor], capacity: int
    ) -> CacheSession | None:
        """The cache in place (:mod:`torchkiln.backends.ort_cache`) when the option is on, the provider
        is the CPU's and the graph has the form; else None (the cache passed in and out)."""
        options: OrtOptions = self.options  # type: ignore[assignment]
        if not options.inplace_cache or resolve_providers(options.providers) != ["CPUExecutionProvider"]:
            return None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        named = tuple((inputs[i], outputs[o]) for i, o in pairs)
        session = self._shared.get(named, lambda: self._shared_cache_session(named))  # once per artifact
        return None if session is None else SharedCacheSession(session, named, initial, capacity, str(self.model_path))

    def _shared_cache_session(self, named: tuple[tuple[str, str], ...]) -> Any:
        """A session of the graph rewritten for the cache in place, or None where it has no such form."""
        import onnx

        rewritten = shared_cache_model(onnx.load(str(self.model_path)), named)
        try:
            return None if rewritten is None else self.create_session(rewritten.SerializeToString())
        except Exception as exc:  # ONNX Runtime refused the rewritten graph: keep passing the cache
            warnings.warn(f"ONNX Runtime cannot load {self.model_path} with its cache in place ({exc}); "
                          "generating with the cache passed in and out", RuntimeWarning, stacklevel=3)  # fmt: skip
            return None

    @classmethod
    def load(cls, directory: Path, options: dict[str, Any]) -> OnnxArtifact:
        artifact = super().load(directory, options)
        if int8_saturates() and "CPUExecutionProvider" in resolve_providers(artifact.options.providers)[:1]:  # type: ignore[attr-defined]
            wide = eight_bit_weights(artifact.model_path)
            if wide:
                warnings.warn(
                    f"{artifact.model_path}: {len(wide)} int8 weight(s) use all 8 bits (e.g. '{wide[0]}'), and this "
                    f"CPU ({cpu_model()}) has no VNNI/AMX: ONNX Runtime's int8 kernels here saturate on them and the "
                    "outputs drift from what the artifact was verified to compute; rebuild it with "
                    "quantize:reduce_range=on (7-bit weights) for this CPU, then kiln compare it",
                    RuntimeWarning, stacklevel=2,
                )  # fmt: skip
        return artifact

    def files(self) -> list[str]:
        return super().files() + ([OPTIMIZED_FILE] if (self.directory / OPTIMIZED_FILE).exists() else [])

    def file_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in super().files())

    def notes(self) -> list[str]:
        return [f"providers: {', '.join(self.session.get_providers())}"]


class OrtBackend(OnnxBackend):
    name = "onnxruntime"
    Options = OrtOptions
    artifact_class = OrtArtifact

    def lower(self, program: Any, options: Any) -> OrtArtifact:
        _refuse_bfloat16(program, options)
        artifact = super().lower(program, options)
        try:
            artifact.session  # noqa: B018 - build the session now: provider errors surface at compile time
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(
                f"ONNX Runtime cannot load the exported model: {exc}",
                hint="try backend 'torch', or a different opset (backend option opset=...)",
            ) from exc
        return artifact  # type: ignore[return-value]


def eight_bit_weights(model_path: Path) -> list[str]:
    """The int8 initializers dequantized by a ``DequantizeLinear`` (QDQ weights) that use values
    beyond ±64 (255 × 64 × 2 is the most a 16-bit sum holds) — the ones x86 CPUs without VNNI
    saturate on. Tensors stored outside the file are not read."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input}
    wide = []
    for tensor in model.graph.initializer:
        if (tensor.name in dequantized and tensor.data_type == onnx.TensorProto.INT8
                and tensor.data_location != onnx.TensorProto.EXTERNAL):
            values = numpy_helper.to_array(tensor)
            if values.size and int(np.abs(values.astype(np.int16)).max()) > 64:
                wide.append(tensor.name)
    return wide


def _refuse_bfloat16(program: Any, options: OrtOptions) -> None:
    """ONNX Runtime's CPU provider has no bfloat16 Conv/Gemm/Add kernels: say so up front."""
    if resolve_providers(options.providers) != ["CPUExecutionProvider"]:
        return
    for node in program.graph_module.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if getattr(meta, "dtype", None) is torch.bfloat16:
            raise BackendError(
                f"the graph computes in bfloat16 (first at node '{node.name}'), which ONNX Runtime's CPU "
                "provider cannot run",
                where=node.name,
                hint="use quantize:mode=fp16 for ONNX Runtime, or backend 'torch' (or a GPU provider) for bf16",
            )


BACKEND = OrtBackend()
