"""``onnxruntime`` backend: the ONNX model in an ONNX Runtime InferenceSession.

Providers: ``auto`` picks TensorRT, then CUDA, when the installed onnxruntime offers them (the
``onnxruntime-gpu`` package) and always ends with the CPU provider; an explicit list is checked
against what is installed. Session options are exposed as backend options; with
``save_optimized=true`` ONNX Runtime's optimized graph is saved next to the model as
``model.optimized.onnx`` (useful to see which integer/fused kernels it chose).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from torchkiln.backends.onnx_backend import OnnxArtifact, OnnxBackend, OnnxOptions, quiet_session_options
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

    def create_session(self) -> Any:
        import onnxruntime as ort

        options: OrtOptions = self.options  # type: ignore[assignment]
        session_options = quiet_session_options()
        session_options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _LEVELS[options.graph_optimization_level]
        )
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        if options.save_optimized and not self.loading:  # a loaded artifact already holds its copy
            session_options.optimized_model_filepath = str(self.directory / OPTIMIZED_FILE)
        return ort.InferenceSession(
            str(self.model_path), session_options, providers=resolve_providers(options.providers)
        )

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
