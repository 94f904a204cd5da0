"""``tensorrt`` backend: a TensorRT engine built from the ONNX artifact, run on torch CUDA tensors.

Lowering exports ONNX (the ``onnx`` backend; int8 graphs carry Q/DQ, which TensorRT reads as
explicit quantization — no calibrator), parses it with TensorRT's ONNX parser, and builds a
serialized engine with the precision flags, 2:4 sparse weights, workspace limit, builder
optimization level and optimization profiles (:mod:`tensorrt_profiles`) the options ask for. A
persistent timing cache makes rebuilds fast. Parser errors name the ONNX node and the module it
came from. The artifact keeps ``model.onnx`` (for ``kiln compare``), ``model.engine`` and
``engine.json`` (TensorRT version, GPU, compute capability, profiles, the precision TensorRT chose
for each layer); loading refuses an engine from another TensorRT version or GPU architecture.

Running: inputs go to the GPU (CUDA tensors are used in place), shapes are checked against the
profile, outputs are allocated as torch tensors and the engine runs asynchronously on the current
CUDA stream; outputs come back on the inputs' device.

Needs ``pip install 'torchkiln[gpu]'`` and a CUDA GPU; without them, lowering is a BackendError
that says so. Everything but the engine build and run is testable without a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchkiln.backends.base import Artifact, Backend, BackendOptions, Pool
from torchkiln.backends.onnx_backend import MODEL_FILE, OnnxOptions, export_onnx
from torchkiln.backends.tensorrt_profiles import (
    check_compatible,
    check_shape,
    device_record,
    parse_ranges,
    profile_shapes,
)
from torchkiln.compiler.files import parse_json, remove_private
from torchkiln.compiler.options import option
from torchkiln.compiler.program import Program
from torchkiln.errors import ArtifactError, BackendError, InputError

ENGINE_FILE = "model.engine"
INFO_FILE = "engine.json"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclasses.dataclass(frozen=True)
class TensorRTOptions(OnnxOptions):
    opset: int = option(18, "ONNX opset of the model TensorRT parses (its ONNX parser lags the newest opsets)")
    precision: tuple[str, ...] = option(
        ("fp16",),
        "allowed precisions ('|'-separated: fp32, fp16, bf16, int8; int8 comes from the graph's Q/DQ)",
    )
    sparse_weights: bool = option(
        False, "let TensorRT use 2:4 sparse kernels where weights have that pattern"
    )
    workspace_mb: int = option(4096, "builder workspace limit in MiB")
    optimization_level: int = option(3, "builder optimization level, 0 (fast build) to 5 (slowest, best)")
    profile: tuple[str, ...] = option(
        (), "dynamic axis ranges, axis=min:opt:max ('|'-separated), default 1:traced:4x"
    )
    timing_cache: str = option(
        "", "timing cache file ('' = tensorrt.timing in the torchkiln cache directory)"
    )
    device: int = option(0, "CUDA device index")

    def validate(self) -> None:
        super().validate()
        unknown = [p for p in self.precision if p not in PRECISIONS]
        if unknown or not self.precision:
            self.fail("precision", f"must be some of {', '.join(PRECISIONS)}, got {'|'.join(self.precision)}")
        if self.workspace_mb < 1:
            self.fail("workspace_mb", f"must be >= 1, got {self.workspace_mb}")
        if not 0 <= self.optimization_level <= 5:
            self.fail("optimization_level", f"must be in [0, 5], got {self.optimization_level}")
        if self.device < 0:
            self.fail("device", f"must be >= 0, got {self.device}")
        parse_ranges(self.profile)


def require_tensorrt(device: int = 0) -> Any:
    """The tensorrt module, or a BackendError saying what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise BackendError(
            "the tensorrt backend needs TensorRT, which is not installed",
            hint="pip install 'torchkiln[gpu]' on a machine with an NVIDIA GPU; or use backend onnxruntime",
        ) from None
    if not torch.cuda.is_available() or device >= torch.cuda.device_count():
        raise BackendError(
            f"the tensorrt backend needs CUDA device {device}; torch sees {torch.cuda.device_count()} device(s)",
            hint="run on a machine with an NVIDIA GPU, or use backend onnxruntime",
        )
    return tensorrt


def current_device(trt: Any, device: int) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    return device_record(trt.__version__, props.name, (props.major, props.minor))


class TensorRTArtifact(Artifact):
    backend = "tensorrt"

    def __init__(
        self, directory: Path, options: TensorRTOptions, info: dict[str, Any], owns_directory: bool = False
    ):
        self.directory, self.options, self.info = directory, options, info
        trt = require_tensorrt(options.device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        # A version-compatible engine can carry host code (a lean runtime) that TensorRT would run
        # when deserializing it; a loaded artifact must never execute code. (False is TensorRT's
        # default: set here so that no environment or future default changes it.)
        if hasattr(self._runtime, "engine_host_code_allowed"):
            self._runtime.engine_host_code_allowed = False
        self.engine = self._runtime.deserialize_cuda_engine((directory / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise ArtifactError(
                f"TensorRT could not deserialize {ENGINE_FILE}", where=str(directory / ENGINE_FILE)
            )
        # an execution context holds one call's shapes and buffer addresses: one per call at once
        self.contexts: Pool[Any] = Pool(self.engine.create_execution_context)
        self._trt = trt
        if owns_directory:
            weakref.finalize(self, remove_private, directory)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with self.contexts.taken() as context:
            return self._run(context, inputs)

    def _run(self, context: Any, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        trt, engine = self._trt, self.engine
        device = torch.device("cuda", self.options.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        staged = []
        for name, tensor in zip(input_names, inputs):
            bounds = self.info["profiles"].get(name)
            problem = check_shape(name, tensor.shape, bounds) if bounds else None
            if problem:
                raise InputError(
                    problem,
                    where=name,
                    hint="rebuild with a wider profile (backend option profile=axis=min:opt:max)",
                )
            value = tensor.to(device).contiguous()
            staged.append(value)
            context.set_input_shape(name, tuple(value.shape))
            context.set_tensor_address(name, value.data_ptr())
        outputs = []
        for name in (n for n in names if n not in input_names):
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=device)
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT failed to run the engine", hint="see TensorRT's log above")
        stream.synchronize()
        back = inputs[0].device if inputs else torch.device("cpu")
        return [o.to(back) for o in outputs]

    def save(self, directory: Path) -> list[str]:
        names = [MODEL_FILE, ENGINE_FILE, INFO_FILE]
        for name in names:
            shutil.copyfile(self.directory / name, directory / name)
        return names

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE  # the ONNX it was built from: kiln compare reads it

    @classmethod
    def load(cls, directory: Path, options: dict[str, Any]) -> TensorRTArtifact:
        parsed = TensorRTOptions.from_mapping(options, owner="backend tensorrt")
        try:
            info = parse_json((directory / INFO_FILE).read_text(), str(directory / INFO_FILE))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read {INFO_FILE}: {exc}", where=str(directory / INFO_FILE)) from exc
        if not (isinstance(info, dict) and isinstance(info.get("device"), dict) and isinstance(info.get("profiles"), dict)):
            raise ArtifactError(f"{INFO_FILE} lacks its device and profiles records", where=str(directory / INFO_FILE))
        trt = require_tensorrt(parsed.device)  # type: ignore[attr-defined]
        check_compatible(info["device"], current_device(trt, parsed.device), str(directory / ENGINE_FILE))  # type: ignore[attr-defined]
        return cls(directory, parsed, info)  # type: ignore[arg-type]

    def file_bytes(self) -> int:
        return (self.directory / ENGINE_FILE).stat().st_size

    def notes(self) -> list[str]:
        chosen = Counter(layer.get("precision", "?") for layer in self.info.get("layers", []))
        device = self.info["device"]
        notes = [
            f"TensorRT {device['tensorrt']} on {device['gpu']}; profiles: {self.info['profiles'] or 'static shapes'}"
        ]
        if chosen:
            notes.append(
                "layer precisions: " + ", ".join(f"{count} {p}" for p, count in sorted(chosen.items()))
            )
        return notes


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool, trt.int64: torch.int64, trt.bfloat16: torch.bfloat16}  # fmt: skip
    return table[dtype]


class TensorRTBackend(Backend):
    name = "tensorrt"
    Options = TensorRTOptions

    def lower(self, program: Program, options: BackendOptions) -> TensorRTArtifact:
        assert isinstance(options, TensorRTOptions)
        trt = require_tensorrt(options.device)
        directory = Path(tempfile.mkdtemp(prefix="torchkiln-tensorrt-"))
        try:
            export_onnx(program, options, directory)
            traced = {s.name: tuple(t.shape) for s, t in zip(program.inputs, program.example_inputs)}
            profiles = profile_shapes(program.inputs, traced, parse_ranges(options.profile))
            from torchkiln.backends.tensorrt_engine import build_engine

            engine, layers = build_engine(
                trt, directory / MODEL_FILE, options, profiles, _timing_cache(options)
            )
            (directory / ENGINE_FILE).write_bytes(engine)
            info = {"device": current_device(trt, options.device), "profiles": profiles, "layers": layers}
            (directory / INFO_FILE).write_text(json.dumps(info, indent=2))
            return TensorRTArtifact(directory, options, json.loads(json.dumps(info)), owns_directory=True)
        except BaseException:
            remove_private(directory)
            raise

    def load(self, directory: Path, options: BackendOptions) -> TensorRTArtifact:
        return TensorRTArtifact.load(directory, options.to_dict())


def _timing_cache(options: TensorRTOptions) -> Path:
    if options.timing_cache:
        return Path(os.path.expanduser(options.timing_cache))
    from torchkiln.compiler.files import default_directory

    return default_directory() / "tensorrt.timing"


BACKEND = TensorRTBackend()
