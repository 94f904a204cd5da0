"""``openvino`` backend: the program as OpenVINO IR (``model.xml`` + ``model.bin``) on OpenVINO's CPU
plugin. An optional extra: ``pip install torchkiln[openvino]``.

Lowering goes through the verified ONNX export (:func:`~torchkiln.backends.onnx_backend.export_onnx`),
so the quantization placement, calibration and verification stay torchkiln's; OpenVINO's ONNX
frontend reads it and the result is saved as IR. What the IR ops become on OpenVINO's CPU plugin:

* static int8 (ONNX QDQ) — read as ``FakeQuantize``; OpenVINO's low-precision transformations run
  the convolutions and matmuls between them in int8 (VNNI / AMX where the CPU has them);
* weight-only int4/int8 (``MatMulNBits``) — read as compressed weights (``Constant`` u4/u8 →
  ``Convert`` → ``Multiply``), which the plugin runs as its weight-compressed fully-connected kernel:
  the same form ``nncf.compress_weights`` writes;
* dynamic int8 (``torchkiln::dynamic_linear``: int8 weights per output channel, the activation
  quantized per call) — exported for OpenVINO as the int8 weight dequantized into a MatMul, which
  OpenVINO reads as compressed weights; its CPU plugin quantizes the activations itself, per group
  of ``dynamic_quantization_group_size`` (32) values rather than per tensor: a different rounding
  than ONNX Runtime's, held to the same promise by the verification. (OpenVINO turns this off under
  an f32 precision hint unless the group size is set, so the backend always sets it.)

Precision: ``precision=f32`` (the default) asks the plugin to compute in float32, so a float
program is exact. OpenVINO's own default on a CPU with bf16 instructions is bfloat16 (lossy); ask
for it with ``precision=bf16`` and a tolerance that allows it (``backend=auto`` tries it as the
``openvino-bf16`` candidate).

Loading reads the two files of the IR and nothing else: every op must belong to one of OpenVINO's
standard opsets (a custom op would need an extension library, which is never loaded), the model
must take the manifest's inputs by name and return as many outputs, and ``cache_dir`` is ignored
when loading (OpenVINO would write compiled blobs there, and loading never writes).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from torchkiln.backends.base import Artifact, Backend, BackendOptions, CacheSession, Memo, Pool
from torchkiln.backends.onnx_backend import MODEL_FILE, OnnxOptions, export_onnx
from torchkiln.compiler import quant_ops  # noqa: F401 - registers the torchkiln ops counted below
from torchkiln.compiler.files import remove_private
from torchkiln.compiler.machine import cpu_flags, cpu_model
from torchkiln.compiler.options import option
from torchkiln.compiler.program import Program
from torchkiln.errors import ArtifactError, BackendError

FILES = ("model.xml", "model.bin")
_PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}
_HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
#: every op of a loaded IR must come from one of these (OpenVINO's public opsets)
_STANDARD_OPSET = re.compile(r"opset\d{1,2}")
#: the CPU flags worth recording with an artifact (what OpenVINO's kernels dispatch on)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_fp16")


@dataclasses.dataclass(frozen=True)
class OpenVinoOptions(OnnxOptions):
    # OpenVINO 2026.4's ONNX frontend cannot compile opset 23's Attention over a KV cache with
    # grouped heads (a MatMul shape check fails); at 18 attention is plain ops it fuses itself
    opset: int = option(18, "ONNX opset of the export OpenVINO reads (18 or newer; 18: attention as plain ops)")
    precision: Literal["f32", "bf16", "f16"] = option(
        "f32", "compute precision hint of the CPU plugin (f32 is exact; bf16/f16 are lossy)"
    )
    performance_hint: Literal["latency", "throughput"] = option(
        "latency", "OpenVINO's performance hint: latency (one request) or throughput (streams)"
    )
    threads: int = option(0, "inference threads (0 = OpenVINO's default: the physical cores)")
    streams: int = option(0, "parallel execution streams (0 = what the performance hint picks)")
    dynamic_quantization_group_size: int = option(
        32, "compressed-weight layers (dynamic int8, weight-only): activations quantized per group of this "
        "many values by OpenVINO (0 = float activations)"
    )
    cache_dir: str = option(
        "", "OpenVINO's compiled-model cache directory, used while compiling (a loaded artifact ignores it)"
    )
    stateful_cache: bool = option(
        True, "generation keeps the KV cache inside OpenVINO (its stateful form) instead of passing it in and "
        "out on every step"
    )

    def validate(self) -> None:
        super().validate()
        for key in ("threads", "streams", "dynamic_quantization_group_size"):
            if getattr(self, key) < 0:
                self.fail(key, f"must be >= 0, got {getattr(self, key)}")


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise BackendError(
            "backend openvino needs the openvino package, which is not installed",
            where="backend openvino",
            hint="pip install 'torchkiln[openvino]' (or openvino>=2025)",
        ) from exc
    return openvino


def isa_note() -> str:
    """``OpenVINO <version> on <CPU> (<flags>)``: what an artifact was built and verified on."""
    ov = _openvino()
    flags = cpu_flags() or frozenset()
    have = [f for f in ISA_FLAGS if f in flags] or ["flags unknown"]
    return f"OpenVINO {ov.__version__.split('-')[0]} on {cpu_model()} ({', '.join(have)})"


class OpenVinoArtifact(Artifact):
    backend = "openvino"

    def __init__(self, directory: Path, options: OpenVinoOptions, owns_directory: bool = False, loading: bool = False):
        self.directory = directory
        self.options = options
        model = _read(directory)
        self.built_on = _recorded(model, BUILT_ON) or "(not recorded)"
        self.compiled = _compile(model, options, cache=not loading)
        # one infer request serves one call at a time ("Infer Request is busy", or another caller's
        # outputs read back): each call takes its own from the pool
        self.requests: Pool[Any] = Pool(self.compiled.create_infer_request)
        self._tensor = _openvino().Tensor
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output_count = len(self.compiled.outputs)
        self.integer_note = _integer_note(model, options)
        self._stateful: Memo[tuple[Any, list[str]]] = Memo()
        if owns_directory:
            weakref.finalize(self, remove_private, directory)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with self.requests.taken() as request:
            return _infer(request, self._tensor, inputs, self.output_count, str(self.directory / FILES[0]))

    def cache_session(
        self, pairs: Sequence[tuple[int, int]], initial: Sequence[torch.Tensor], capacity: int
    ) -> CacheSession | None:
        if not self.options.stateful_cache:  # (OpenVINO's states grow as they need: no capacity)
            return None
        key = tuple(pairs)  # compiled once per artifact, on its first generation
        compiled, variables = self._stateful.get(key, lambda: _stateful(self.directory, key, self.options))
        return _StatefulSession(compiled, variables, initial, self.directory)

    def files(self) -> list[str]:
        missing = [f for f in FILES if not (self.directory / f).is_file()]
        if missing:
            raise ArtifactError(
                f"the artifact's {', '.join(missing)} is gone from {self.directory}",
                where=str(self.directory / missing[0]),
                hint="compile or load the model again",
            )
        return list(FILES)

    def file_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self.files())

    def save(self, directory: Path) -> list[str]:
        names = self.files()
        for name in names:
            shutil.copyfile(self.directory / name, directory / name)
        return names

    def check_signature(self, inputs: list[str], outputs: int) -> None:
        if self.input_names != inputs or self.output_count != outputs:
            raise ArtifactError(
                f"{FILES[0]} takes {self.input_names} and returns {self.output_count} output(s); the manifest "
                f"declares {inputs} and {outputs}",
                where=str(self.directory / FILES[0]),
                hint="the IR does not belong to this manifest: rebuild the artifact",
            )

    def notes(self) -> list[str]:
        return [f"built on {self.built_on}; precision {self.options.precision}", *self.integer_note]

    @classmethod
    def load(cls, directory: Path, options: dict[str, Any]) -> OpenVinoArtifact:
        parsed = OpenVinoOptions.from_mapping(options, owner="backend openvino")
        assert isinstance(parsed, OpenVinoOptions)
        for name in FILES:
            if not (directory / name).is_file():
                raise FileNotFoundError(2, "missing", str(directory / name))
        return cls(directory, parsed, loading=True)


def _read(directory: Path) -> Any:
    """The IR in ``directory``, every op checked against the standard opsets."""
    ov = _openvino()
    xml, weights = directory / FILES[0], directory / FILES[1]
    try:
        model = ov.Core().read_model(str(xml), str(weights))
    except Exception as exc:
        raise ArtifactError(f"cannot read {FILES[0]}: {_first_line(exc)}", where=str(xml), hint="rebuild the artifact") from exc
    for op in model.get_ordered_ops():
        info = op.get_type_info()
        if not _STANDARD_OPSET.fullmatch(str(info.version_id)):
            raise ArtifactError(
                f"{FILES[0]}: op '{op.get_friendly_name()}' is {info.name} from {info.version_id!r}, not one of "
                "OpenVINO's standard opsets",
                where=str(xml),
                hint="torchkiln loads only IR in OpenVINO's opsets (no extension ops); rebuild the artifact",
            )
    return model


def _compile(model: Any, options: OpenVinoOptions, cache: bool) -> Any:
    ov = _openvino()
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": _PRECISIONS[options.precision],
        "PERFORMANCE_HINT": _HINTS[options.performance_hint],
        # OpenVINO leaves it off under an f32 precision hint unless it is set explicitly
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": options.dynamic_quantization_group_size,
    }
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = options.threads
    if options.streams:
        config["NUM_STREAMS"] = options.streams
    core = ov.Core()
    if cache and options.cache_dir:
        core.set_property({"CACHE_DIR": options.cache_dir})
    try:
        return core.compile_model(model, "CPU", config)
    except Exception as exc:
        raise BackendError(
            f"OpenVINO cannot compile the model for its CPU plugin: {_first_line(exc)}",
            where="backend openvino",
            hint="try opset=18 (the default), precision=f32, or backend onnxruntime",
        ) from exc


def _stateful(directory: Path, pairs: tuple[tuple[int, int], ...], options: OpenVinoOptions) -> tuple[Any, list[str]]:
    """The IR in its stateful form: each cache input and the output that is its next value become
    one state (OpenVINO's ``MakeStateful``: ReadValue / Assign) that the plugin keeps between calls.
    Returns the compiled model and its state names in the order of ``pairs``. Transformed in memory
    from the artifact's own IR file; nothing is written."""
    _openvino()
    from openvino import passes

    model = _read(directory)
    parameters, results = model.get_parameters(), model.get_results()
    if any(not (0 <= i < len(parameters) and 0 <= o < len(results)) for i, o in pairs):
        raise BackendError(f"cache pairs {list(pairs)} do not fit the IR's {len(parameters)} inputs / {len(results)} "
                           "outputs", where=str(directory / FILES[0]))
    chosen = [(parameters[i], results[o]) for i, o in pairs]
    cached = {i for i, _ in pairs}
    kept = [port.get_any_name() for i, port in enumerate(model.inputs) if i not in cached]
    # MakeStateful names each state after its Parameter and Result (checked below, not assumed)
    names = [p.get_friendly_name() + r.get_friendly_name() for p, r in chosen]
    manager = passes.Manager()
    manager.register_pass(passes.MakeStateful(chosen))
    try:
        manager.run_passes(model)
    except Exception as exc:
        raise BackendError(f"OpenVINO cannot make the cache stateful: {_first_line(exc)}", where="backend openvino",
                           hint="compile with the backend option stateful_cache=false") from exc
    made = sorted(v.get_info().variable_id for v in model.get_variables())
    if made != sorted(names) or [port.get_any_name() for port in model.inputs] != kept:
        raise BackendError(f"OpenVINO's stateful form has states {made[:4]} and inputs {model.inputs[:4]}, not "
                           f"{names[:4]} and {kept[:4]}",
                           where="backend openvino", hint="compile with the backend option stateful_cache=false")
    return _compile(model, options, cache=False), names


class _StatefulSession(CacheSession):
    """One generation on the stateful form: a fresh request whose states start at ``initial``."""

    def __init__(self, compiled: Any, names: list[str], initial: Sequence[torch.Tensor], directory: Path):
        ov = _openvino()
        self.request, self.tensor, self.directory = compiled.create_infer_request(), ov.Tensor, directory
        self.outputs = len(compiled.outputs)
        start = dict(zip(names, initial))
        for state in self.request.query_state():
            state.state = ov.Tensor(start[state.name].detach().cpu().contiguous().numpy())

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return _infer(self.request, self.tensor, inputs, self.outputs, f"{self.directory / FILES[0]} (stateful cache)")


def _infer(request: Any, tensor: Any, inputs: Sequence[torch.Tensor], outputs: int, what: str) -> list[torch.Tensor]:
    """One call of ``request``: set_input_tensor on tensors sharing the arrays, then infer() (~15 us
    per call of a tiny model, where infer(list) costs ~40 us: it builds a result dictionary)."""
    try:
        for index, value in enumerate(inputs):
            request.set_input_tensor(index, tensor(value.detach().cpu().contiguous().numpy(), shared_memory=True))
        request.infer()
    except Exception as exc:
        raise BackendError(f"OpenVINO failed to run {what}: {exc}") from exc
    return [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(outputs)]


def _integer_note(model: Any, options: OpenVinoOptions) -> list[str]:
    """How the model's quantized layers run (see the module docstring)."""
    kinds = [op.get_type_name() for op in model.get_ordered_ops()]
    if "FakeQuantize" in kinds:
        return [f"{kinds.count('FakeQuantize')} FakeQuantize op(s): int8 kernels where OpenVINO fuses them"]
    compressed = sum(
        1 for op in model.get_ordered_ops()
        if op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() in ("u4", "i4", "u8", "i8")
    )  # fmt: skip
    notes = [f"weight-compressed: {compressed} u4/i4/u8/i8 constant(s) (weights, zero points)"] if compressed else []
    recorded = _recorded(model, DYNAMIC_LAYERS)
    dynamic = int(recorded) if recorded.isdigit() and len(recorded) < 7 else 0
    if dynamic:
        group = options.dynamic_quantization_group_size
        notes.append(f"{dynamic} dynamic int8 layer(s) as compressed int8 weights; OpenVINO quantizes their "
                     + (f"activations per group of {group}" if group else "activations: no (float activations)"))
    return notes


#: what the build records in the IR's rt_info, read back for the notes of a cached or loaded artifact:
#: how many layers were dynamic int8, and the OpenVINO version, CPU and ISA flags it was built on
DYNAMIC_LAYERS = ("torchkiln", "dynamic_layers")
BUILT_ON = ("torchkiln", "built_on")


def _recorded(model: Any, key: tuple[str, str]) -> str:
    """A value the build recorded; "" when absent, and only printable text of at most 300 characters
    (it is only shown in notes, but the file may be hostile)."""
    if not model.has_rt_info(list(key)):
        return ""
    text = str(model.get_rt_info(list(key)).astype(str))
    return text if len(text) <= 300 and text.isprintable() else ""


def _dynamic_layers(program: Program) -> int:
    dynamic = {torch.ops.torchkiln.dynamic_linear.default, torch.ops.torchkiln.grouped_dynamic_mm.default}
    return sum(1 for node in program.graph_module.graph.nodes if node.op == "call_function" and node.target in dynamic)


def _first_line(exc: BaseException) -> str:
    """The message of an OpenVINO exception without its ``Exception from src/...cpp:N:`` frames."""
    lines = [line for line in str(exc).splitlines() if line.strip() and not _FRAME.match(line)]
    return lines[0].strip() if lines else type(exc).__name__


_FRAME = re.compile(r"\s*Exception from \S+:\d+:?\s*$")


class OpenVinoBackend(Backend):
    name = "openvino"
    Options = OpenVinoOptions

    def lower(self, program: Program, options: BackendOptions) -> OpenVinoArtifact:
        assert isinstance(options, OpenVinoOptions)
        ov = _openvino()
        directory = Path(tempfile.mkdtemp(prefix="torchkiln-openvino-"))
        try:
            export_onnx(program, options, directory, compressed_dynamic=True)
            try:
                model = ov.Core().read_model(str(directory / MODEL_FILE))
                model.set_rt_info(str(_dynamic_layers(program)), list(DYNAMIC_LAYERS))  # for the notes
                model.set_rt_info(isa_note(), list(BUILT_ON))  # the machine it was built and verified on
                ov.save_model(model, str(directory / FILES[0]), compress_to_fp16=False)
            except Exception as exc:
                raise BackendError(
                    f"OpenVINO cannot read the exported ONNX model: {_first_line(exc)}",
                    where="backend openvino",
                    hint="try backend onnxruntime, or another opset (backend option opset=...)",
                ) from exc
            for leftover in directory.glob(f"{MODEL_FILE}*"):
                leftover.unlink()
            return OpenVinoArtifact(directory, options, owns_directory=True)
        except BaseException:
            remove_private(directory)
            raise

    def load(self, directory: Path, options: BackendOptions) -> OpenVinoArtifact:
        return OpenVinoArtifact.load(directory, options.to_dict())


BACKEND = OpenVinoBackend()
