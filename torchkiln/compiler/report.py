"""The compile report: what each pass did and what the artifact measures, as a table or JSON."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from typing import Any

#: the widest line of a report's table (``table(width=None)``, ``--verbose``: everything)
WIDTH = 120
#: the narrowest "ops changed / stats" cell kept on its row's line (else it goes below the row)
MIN_CELL = 24


@dataclasses.dataclass
class PassRecord:
    name: str
    spec: str
    modified: bool = False
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    ops_before: dict[str, int] = dataclasses.field(default_factory=dict)
    ops_after: dict[str, int] = dataclasses.field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    cosine: float | None = None
    tolerance: str | None = None  # what a lossy pass promised (None: fp32 for lossless passes)
    #: a lossy pass's promise checked on calibration batches held back from calibration
    held_back_batches: int = 0
    held_back_cosine: float | None = None
    held_back_max_abs_error: float | None = None

    @property
    def op_delta(self) -> dict[str, int]:
        keys = sorted(set(self.ops_before) | set(self.ops_after))
        delta = {k: self.ops_after.get(k, 0) - self.ops_before.get(k, 0) for k in keys}
        return {k: v for k, v in delta.items() if v}


@dataclasses.dataclass
class ArtifactRecord:
    backend: str
    seconds: float = 0.0
    file_bytes: int | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    cosine: float | None = None
    tolerance: str | None = None
    eager_ms: float | None = None
    artifact_ms: float | None = None
    #: calls each of the quick latency sample took (eager and artifact interleaved)
    latency_runs: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    #: the same check on calibration batches held back from calibration (lossy pipelines)
    held_back_batches: int = 0
    held_back_cosine: float | None = None
    held_back_max_abs_error: float | None = None


@dataclasses.dataclass
class CandidateRecord:
    """One runtime ``backend="auto"`` built, verified and timed; ``verdict`` says how it fared."""

    label: str
    backend: str
    options: dict[str, Any]
    verdict: str  # "chosen", "slower", "outside tolerance" or "failed"
    reason: str = ""
    seconds: float = 0.0  # to build
    latency_ms: float | None = None  # median of the side-by-side timing
    latency_spread_ms: tuple[float, float] | None = None  # its 10th and 90th percentiles
    max_abs_error: float | None = None
    cosine: float | None = None


@dataclasses.dataclass
class Report:
    model: str
    flavour: str
    trace_seconds: float = 0.0
    params: int = 0
    param_bytes: int = 0
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    artifact: ArtifactRecord | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    #: stage -> "hit <key>" / "miss <key>" / "not cacheable: why", when compiled with a cache
    cache: dict[str, str] = dataclasses.field(default_factory=dict)
    #: what ``backend="auto"`` tried, the chosen one first
    candidates: list[CandidateRecord] = dataclasses.field(default_factory=list)
    #: a causal LM's int8 KV cache: its mode, bytes per cached position and distance from the float cache
    kv_cache: dict[str, Any] | None = None
    #: the model was in training mode: what compile switched in its eval() copy (:func:`~torchkiln.compiler.trace.eval_copy`)
    eval_copy: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for record, raw in zip(self.passes, data["passes"]):
            raw["op_delta"] = record.op_delta
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        data = dict(data)
        passes = []
        for raw in data.pop("passes", []):
            raw = {k: v for k, v in raw.items() if k != "op_delta"}
            passes.append(PassRecord(**raw))
        artifact = data.pop("artifact", None)
        candidates = [CandidateRecord(**c) for c in data.pop("candidates", [])]
        return cls(
            **data, passes=passes, artifact=ArtifactRecord(**artifact) if artifact else None, candidates=candidates
        )

    def table(self, width: int | None = WIDTH) -> str:
        """The report as text, each line at most ``width`` columns: a pass's long "ops changed /
        stats" cell is cut (the count of what was left out said; ``to_dict()`` and ``width=None``
        have all of it), prose lines wrap."""
        lines = [f"torchkiln report: {self.model} (captured with {self.flavour}, {self.trace_seconds:.2f} s)"
                 + (" from its eval() copy: the model was in training mode" if self.eval_copy else "")]
        header = ("pass", "modified", "seconds", "params", "max abs err", "ops changed / stats")
        rows = [header]
        for p in self.passes:
            changes = ", ".join(f"{k} {v:+d}" for k, v in p.op_delta.items())
            stats = ", ".join(f"{k}={v}" for k, v in p.stats.items() if v)
            rows.append(
                (
                    p.spec,
                    "yes" if p.modified else "no",
                    f"{p.seconds:.3f}",
                    _params_cell(p),
                    _error_cell(p),
                    "; ".join(x for x in (changes, stats) if x) or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        for row in rows:
            start = "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  "
            if width is None or len(start) + min(len(row[-1]), MIN_CELL) <= width:
                lines.append(start + _cut(row[-1], None if width is None else width - len(start)))
                continue
            # too wide for one line (long params / error cells): the row wraps, its ops go below it
            lines += textwrap.wrap(start.rstrip(), width, subsequent_indent=" " * 6, drop_whitespace=False) or [""]
            lines.append(" " * 6 + _cut(row[-1], width - 6))
        table_rows = len(lines)
        lines.extend([f"  note: {self.eval_copy}"] if self.eval_copy else [])
        for p in self.passes:
            lines.extend(f"  note ({p.name}): {n}" for n in p.notes)
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.cache:
            lines.append("  cache: " + ", ".join(f"{stage} {state}" for stage, state in self.cache.items()))
        if self.kv_cache:
            lines.append(_kv_line(self.kv_cache))
        if self.artifact:
            lines.append(_artifact_line(self.artifact, self.params, self.param_bytes))
            lines.extend(f"  note ({self.artifact.backend}): {n}" for n in self.artifact.notes)
        lines.extend(_candidate_line(c) for c in self.candidates)
        if width is not None:
            lines = lines[:table_rows] + [
                wrapped for line in lines[table_rows:]
                for wrapped in textwrap.wrap(line, width, initial_indent="", subsequent_indent="      ",
                                             break_on_hyphens=False, drop_whitespace=True) or [""]
            ]  # fmt: skip
        return printable("\n".join(lines))  # the model's name and notes may come from a loaded manifest


#: control characters (C0 but tab, newline and carriage return; DEL; C1) and the bidirectional
#: overrides, each shown as its escape: text read from a file never moves the cursor, recolours the
#: terminal or reorders what is printed after it
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0)) if chr(c) not in "\t\n\r"} | {
    c: f"\\u{c:04x}" for c in (*range(0x202a, 0x202f), *range(0x2066, 0x206a))
}


def printable(text: str) -> str:
    """``text`` with :data:`_UNPRINTABLE` characters escaped (``\\x1b`` for ESC)."""
    return text.translate(_UNPRINTABLE)


class PrintableStream:
    """A text stream that writes through to ``stream`` with :func:`printable` applied (``kiln``'s
    stdout and stderr while a command runs)."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(printable(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding: the stream's own
        return getattr(self._stream, name)


def _cut(cell: str, room: int | None) -> str:
    """``cell`` in ``room`` columns: whole items ("a -1, b +2; k=v") while they fit, then how many
    were left out."""
    if room is None or len(cell) <= room:
        return cell
    items = [item for part in cell.split("; ") for item in part.split(", ")]
    kept: list[str] = []
    for index, item in enumerate(items):
        rest = len(items) - index - 1
        suffix = f", ... {rest} more (--verbose)" if rest else ""
        if len(", ".join([*kept, item])) + len(suffix) > room:
            break
        kept.append(item)
    left = len(items) - len(kept)
    return ", ".join(kept) + (f"{', ' if kept else ''}... {left} more (--verbose)" if left else "")


def _kv_line(kv: dict[str, Any]) -> str:
    ratio = kv["bytes_per_position"] / kv["float_bytes_per_position"]
    return (
        f"  kv cache: {kv['mode']} ({kv['scales']}), {kv['bytes_per_position']:,} bytes per position "
        f"({ratio:.2f}x float32's {kv['float_bytes_per_position']:,}); logits vs the float cache: min cosine "
        f"{kv['min_cosine']:.6f} (promise >= {kv['promise']}), max abs err {kv['max_abs_error']:.3g} on {kv['checked_on']}"
    )


def _candidate_line(c: CandidateRecord) -> str:
    measured = []
    if c.latency_ms is not None:
        spread = f" [p10 {c.latency_spread_ms[0]:.3f}, p90 {c.latency_spread_ms[1]:.3f}]" if c.latency_spread_ms else ""
        measured.append(f"{c.latency_ms:.3f} ms{spread}")
    if c.max_abs_error is not None:
        cosine = f", cosine {c.cosine:.5f}" if c.cosine is not None else ""
        measured.append(f"max abs err {c.max_abs_error:.2e}{cosine}")
    detail = f" ({'; '.join(measured)})" if measured else ""
    return f"  auto candidate {c.label}: {c.verdict}{detail}{': ' + c.reason if c.reason else ''}"


def _params_cell(p: PassRecord) -> str:
    cell = f"{p.params_before:,} -> {p.params_after:,}"
    if p.bytes_before != p.bytes_after:
        cell += f" ({p.bytes_before / 1e6:.2f} -> {p.bytes_after / 1e6:.2f} MB)"
    return cell


def _error_cell(p: PassRecord) -> str:
    if p.max_abs_error is None:
        return "-"
    if p.tolerance is not None and p.cosine is not None:  # a lossy pass: direction matters more
        cell = f"{p.max_abs_error:.2e} cos {p.cosine:.5f}"
        if p.held_back_cosine is not None:
            cell += f" (held-back cos {p.held_back_cosine:.5f})"
        return cell
    return f"{p.max_abs_error:.2e}"


def _artifact_line(a: ArtifactRecord, params: int, param_bytes: int) -> str:
    parts = [
        f"backend {a.backend}: built in {a.seconds:.2f} s",
        f"params {params:,} ({param_bytes / 1e6:.2f} MB)",
    ]
    if a.file_bytes is not None:
        parts.append(f"file {a.file_bytes / 1e6:.2f} MB")
    if a.max_abs_error is not None:
        cosine = f", cosine {a.cosine:.5f}" if a.cosine is not None else ""
        parts.append(
            f"max abs err {a.max_abs_error:.2e} (rel {a.max_rel_error:.2e}{cosine}; tolerance {a.tolerance})"
        )
    if a.held_back_cosine is not None and a.held_back_max_abs_error is not None:
        parts.append(
            f"on {a.held_back_batches} held-back input(s): max abs err "
            f"{a.held_back_max_abs_error:.2e}, cosine {a.held_back_cosine:.5f}"
        )
    if a.eager_ms is not None and a.artifact_ms is not None:
        calls = f"{a.latency_runs} calls each, " if a.latency_runs else ""
        parts.append(  # a sample taken while building: not a speed claim (kiln bench times runtimes properly)
            f"quick latency sample ({calls}interleaved; not a benchmark, see kiln bench): "
            f"artifact {a.artifact_ms:.3f} ms, eager {a.eager_ms:.3f} ms"
        )
    return "  " + "; ".join(parts)
