"""``backend="auto"``: build every runtime this machine and this program allow, verify each
against the compile's promise, time the ones that pass side by side, and keep the fastest.

Candidates (labels, as ``backend_options={"candidates": "..."}`` names them):

* ``onnxruntime`` — the program in ONNX (QDQ for int8) on ONNX Runtime's CPU provider;
* ``inductor`` — AOTInductor, float32 (a quantized program's int8 layers in integer kernels);
* ``inductor-bf16`` — AOTInductor in bfloat16, for a float program on a CPU with bf16 instructions
  (``avx512_bf16`` / ``amx_bf16``); lossy, so it wins only under a tolerance that allows it;
* ``torch`` — the rewritten graph in PyTorch (the reference and fallback);
* ``openvino`` — OpenVINO IR on its CPU plugin (the same verified ONNX; static int8 as int8
  kernels), and ``openvino-bf16`` for a float program on a CPU with bf16 instructions (lossy),
  when the ``openvino`` package is installed;
* with a CUDA device: ``torch-cuda-fp16`` (CUDA graphs), ``inductor-cuda`` (bfloat16 for a float
  program), and ``tensorrt`` when it is importable.

Each is built through the lower stage (so the stage cache serves a rebuild), verified like a single
backend, and timed with the interleaved timer (:func:`torchkiln.driver.benchmark.interleaved_times`) on
the example inputs: in alternating blocks, each after a short sleep so that the runtime timed before
it has its spinning worker threads idle, then the two fastest once more, the choice made on their samples of
both rounds. The report lists every candidate: its latency (median, p10 and p90), error and why it
lost.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from torchkiln.backends import Artifact, BackendOptions
from torchkiln.backends import backend_options as backend_options_for
from torchkiln.compiler.machine import cpu_flags
from torchkiln.compiler.options import Options, option
from torchkiln.compiler.program import Program, fresh
from torchkiln.compiler.report import ArtifactRecord, CandidateRecord, Report
from torchkiln.driver.benchmark import interleaved_times
from torchkiln.errors import BackendError, ConfigError, KilnError, VerificationError

#: label -> (backend, options); which of them apply is decided by :func:`candidates`
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "onnxruntime": ("onnxruntime", {}),
    "inductor": ("inductor", {}),
    "inductor-bf16": ("inductor", {"dtype": "bfloat16"}),
    "torch": ("torch", {}),
    "torch-cuda-fp16": ("torch", {"device": "cuda", "dtype": "float16", "cuda_graphs": True}),
    "inductor-cuda": ("inductor", {"device": "cuda"}),
    "tensorrt": ("tensorrt", {}),
    "openvino": ("openvino", {}),
    "openvino-bf16": ("openvino", {"precision": "bf16"}),
}


@dataclasses.dataclass(frozen=True)
class AutoOptions(Options):
    owner = "backend auto"
    candidates: str = option("", "comma-separated candidate labels to try (empty: every one this machine allows)")
    runs: int = option(40, "timed calls of each candidate, in alternating blocks")

    def validate(self) -> None:
        unknown = [c for c in self.labels if c not in CANDIDATES]
        if unknown:
            self.fail("candidates", f"names unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
        if self.runs < 1:
            self.fail("runs", f"must be >= 1, got {self.runs}")

    @property
    def labels(self) -> list[str]:
        return [c.strip() for c in self.candidates.split(",") if c.strip()]

    @classmethod
    def parse(cls, options: Mapping[str, Any] | BackendOptions | None) -> AutoOptions:
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(
                "backend auto takes its options as a mapping (candidates, runs)",
                where="backend_options",
                hint='e.g. backend_options={"candidates": "onnxruntime,inductor"}',
            )
        parsed = cls.from_mapping(options or {}, owner=cls.owner)
        assert isinstance(parsed, AutoOptions)
        return parsed


class Build(Protocol):
    report: Report
    program: Program

    @property
    def say(self) -> Callable[[str], None]: ...

    def __call__(self, backend: str, options: BackendOptions, strict: bool) -> tuple[Artifact, ArtifactRecord]: ...


def is_quantized(program: Program) -> bool:
    """Does the program hold quantized ops (static Q/DQ or torchkiln's dynamic / weight-only)?"""
    return any(
        n.op == "call_function" and getattr(n.target, "namespace", None) in ("quantized_decomposed", "torchkiln")
        for n in program.graph_module.graph.nodes
    )


def candidates(program: Program, chosen: list[str]) -> dict[str, str]:
    """label -> "" for the candidates to build, or -> the reason a requested one does not apply."""
    quantized = is_quantized(program)
    flags = cpu_flags() or frozenset()
    cuda = torch.cuda.is_available()
    bf16 = "" if flags & {"avx512_bf16", "amx_bf16"} else "this CPU has no bf16 instructions (avx512_bf16 / amx_bf16)"
    openvino = "" if importlib.util.find_spec("openvino") else "openvino is not installed (pip install 'torchkiln[openvino]')"
    why_not = {
        "inductor-bf16": "the program is quantized" if quantized else bf16,
        "torch-cuda-fp16": "" if cuda else "no CUDA device",
        "inductor-cuda": "" if cuda else "no CUDA device",
        "tensorrt": "" if cuda and importlib.util.find_spec("tensorrt") else "needs a CUDA device and tensorrt",
        "openvino": openvino,
        "openvino-bf16": openvino or ("the program is quantized" if quantized else bf16),
    }  # fmt: skip
    if chosen:
        return {label: why_not.get(label, "") for label in chosen}
    return {label: why for label, why in ((lb, why_not.get(lb, "")) for lb in CANDIDATES) if not why}


def _options(label: str, quantized: bool) -> tuple[str, BackendOptions]:
    backend, values = CANDIDATES[label]
    if label == "inductor-cuda" and not quantized:
        values = {**values, "dtype": "bfloat16"}
    return backend, backend_options_for(backend, values)


def choose(build: Build, options: AutoOptions, strict: bool) -> tuple[Artifact, BackendOptions, ArtifactRecord]:
    """Build, verify and time the candidates; the fastest that meets the promise, its options and
    record. The report's ``candidates`` lists every one, the chosen first. With ``strict`` False
    (``verify=False``) a candidate outside the tolerance is timed too, its error reported."""
    quantized = is_quantized(build.program)
    records: list[CandidateRecord] = []
    built: dict[str, tuple[Artifact, BackendOptions, ArtifactRecord]] = {}
    listed = candidates(build.program, options.labels)
    applicable = [label for label, why_not in listed.items() if not why_not]
    for label, why_not in listed.items():
        backend, backend_options = _options(label, quantized)
        record = CandidateRecord(label, backend, backend_options.to_dict(), "failed", why_not)
        records.append(record)
        if why_not:
            record.verdict = "not applicable"
            continue
        native = " (AOTInductor compiles C++: up to a minute)" if backend == "inductor" else ""
        build.say(f"auto: candidate {applicable.index(label) + 1}/{len(applicable)}: {label}{native}")
        try:
            artifact, artifact_record = build(backend, backend_options, strict=strict)
        except VerificationError as exc:
            record.verdict, record.reason = "outside tolerance", exc.message
            continue
        except KilnError as exc:
            record.reason = exc.message.splitlines()[0]
            continue
        _move_cache_state(build.report, label)
        record.seconds = artifact_record.seconds
        record.max_abs_error, record.cosine = artifact_record.max_abs_error, artifact_record.cosine
        built[label] = (artifact, backend_options, artifact_record)
    if not built:
        raise _nothing_passed(records)
    build.say(f"auto: timing {len(built)} candidate(s) side by side, {options.runs} calls each")
    best = _time(build.program, built, records, options.runs, strict)
    artifact, backend_options, artifact_record = built[best]
    tried = len([r for r in records if r.verdict != "not applicable"])
    artifact_record.notes.append(f"chosen by backend=auto from {tried} candidate(s) built here (see the candidates)")
    build.report.candidates = sorted(records, key=lambda r: r.verdict != "chosen")
    return artifact, backend_options, artifact_record


#: seconds to sleep before each timed block: long enough for ONNX Runtime's and OpenVINO's worker
#: threads, which spin after a run, to go idle before another runtime takes the cores
SETTLE = 0.02


def _time(
    program: Program, built: Mapping[str, tuple[Artifact, BackendOptions, ArtifactRecord]],
    records: list[CandidateRecord], runs: int, strict: bool,
) -> str:  # fmt: skip
    """Time every candidate side by side, then the two fastest again (a second round of ``runs``
    calls each, so the choice between close runtimes rests on twice the samples, half of them taken
    after the ranking). A candidate's latency is the median of all its samples, with p10 and p90:
    the chosen one's is the lowest of the two finalists'."""
    inputs = fresh(program.example_inputs)
    calls: dict[str, Callable[[], Any]] = {
        label: functools.partial(artifact.run, inputs) for label, (artifact, _, _) in built.items()
    }
    first = interleaved_times(calls, runs, settle=SETTLE)
    ranked = sorted(first, key=lambda label: _median(first[label]))
    finalists = ranked[:2]
    second = interleaved_times({label: calls[label] for label in finalists}, runs, settle=SETTLE) if len(ranked) > 1 else {}
    samples = {label: sorted(first[label] + second.get(label, [])) for label in first}
    best = min(finalists, key=lambda label: _median(samples[label]))
    # only a verified build (strict) is known to be within the tolerance
    why = "fastest within the tolerance" if strict else "fastest; not verified (verify=False), its error is measured only"
    for record in records:
        if record.label not in first:
            continue
        mine = samples[record.label]
        record.latency_ms = _median(mine)
        record.latency_spread_ms = (mine[len(mine) // 10], mine[(len(mine) * 9) // 10])
        if record.label == best:
            record.verdict, record.reason = "chosen", why + (" (the two fastest timed twice)" if second else "")
            continue
        if record.label in second:  # the other finalist: both rounds of both
            ratio, when = record.latency_ms / _median(samples[best]), "over both rounds"
        else:  # ranked out by the first round: compared on it
            ratio, when = _median(first[record.label]) / _median(first[best]), "in the first round"
        record.verdict, record.reason = "slower", f"{ratio:.2f}x the latency of {best} {when}"
    return best


def _median(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def _move_cache_state(report: Report, label: str) -> None:
    if "lower" in report.cache:
        report.cache[f"lower {label}"] = report.cache.pop("lower")


def _nothing_passed(records: list[CandidateRecord]) -> BackendError | VerificationError:
    lines = "; ".join(f"{r.label}: {r.verdict}{' (' + r.reason + ')' if r.reason else ''}" for r in records)
    error = VerificationError if any(r.verdict == "outside tolerance" for r in records) else BackendError
    return error(
        f"backend auto: no candidate built and met the tolerance — {lines}",
        hint="loosen `tolerance`, or name a backend that builds here",
    )
