"""The pass manager and the instruments it runs around every pass.

Instruments are hooks (``before_pass`` / ``after_pass``), never code inside a pass: timing, op and
parameter counts, graph lint/verification and the numeric check against the eager model all live
here, so a pass only rewrites.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from torchkiln.compiler import graph as G
from torchkiln.compiler.passes import Pass
from torchkiln.compiler.program import Program
from torchkiln.compiler.report import PassRecord
from torchkiln.compiler.verify import FP32, Tolerance, compare
from torchkiln.errors import KilnError, PassError


class Instrument:
    def before_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        """Called before the pass runs."""

    def after_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        """Called after the pass succeeded; may raise PassError to reject its result."""


class Timing(Instrument):
    def before_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        self._start = time.perf_counter()

    def after_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        record.seconds = time.perf_counter() - self._start


class Counts(Instrument):
    """Op histogram, parameter count and parameter/buffer bytes before and after."""

    def before_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        record.ops_before = G.op_histogram(program.graph_module)
        record.params_before, record.bytes_before = G.parameter_stats(program.graph_module)

    def after_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        record.ops_after = G.op_histogram(program.graph_module)
        record.params_after, record.bytes_after = G.parameter_stats(program.graph_module)


class GraphCheck(Instrument):
    """Re-run shape propagation, which refreshes the metadata the next pass reads and proves the
    rewritten graph still runs on the example inputs (``Pass.__call__`` has already linted it)."""

    def after_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        try:
            G.annotate(program.graph_module, program.example_inputs)
        except Exception as exc:
            raise PassError(
                f"pass '{pass_.name}' left an invalid graph: {type(exc).__name__}: {exc}"
            ) from exc


class Numerics(Instrument):
    """Compare the graph's outputs with the eager model on every check input set. Lossless passes
    must stay within ``tolerance``; lossy ones within what they promise (:meth:`Pass.tolerance`)."""

    def __init__(self, tolerance: Tolerance = FP32):
        self.tolerance = tolerance
        self._given: list[tuple[torch.Tensor, ...]] = []

    def before_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        # A lossy pass's promise is about what it does to the graph it is given: after an earlier
        # lossy pass (prune, then quantize) that is no longer the eager model.
        self._given = [program.run(c.inputs) for c in program.checks] if not pass_.lossless else []

    def after_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        tolerance = self.tolerance if pass_.lossless else pass_.tolerance()
        worst = None
        for check in program.checks:
            try:
                stats = compare(program.run(check.inputs), check.outputs, tolerance or self.tolerance)
            except ValueError as exc:
                raise PassError(f"pass '{pass_.name}' changed the outputs' structure: {exc}") from exc
            if worst is None or stats.ratio > worst.ratio:
                worst = stats
        assert worst is not None
        record.max_abs_error, record.max_rel_error = worst.max_abs, worst.max_rel
        record.cosine = worst.cosine
        record.tolerance = None if pass_.lossless or tolerance is None else str(tolerance)
        if pass_.lossless and not worst.within():
            raise PassError(
                f"pass '{pass_.name}' changed output {worst.worst_output} by max abs {worst.max_abs:.3e} "
                f"(allowed {worst.allowed:.3e}: {self.tolerance})",
                hint="this is a bug in the pass; run without it and report the model",
            )
        if tolerance is not None and not pass_.lossless:
            self._check_promise(pass_, program, tolerance)

    def _check_promise(self, pass_: Pass, program: Program, tolerance: Tolerance) -> None:
        for check, given in zip(program.checks, self._given):
            stats = compare(program.run(check.inputs), given, tolerance)
            if not stats.within():
                raise PassError(
                    f"pass '{pass_.spec}' broke its accuracy promise on output {stats.worst_output}: cosine "
                    f"{stats.cosine:.4f}, max abs error {stats.max_abs:.3e} (promised: {tolerance})",
                    hint="keep more layers in higher precision (ignore=..., max_error=...) or relax the promise",
                )


class Progress(Instrument):
    """Report each pass as it starts (the CLI prints these to stderr)."""

    def __init__(self, callback: Callable[[str], None], total: int):
        self.callback, self.total, self.done = callback, total, 0

    def before_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        self.done += 1
        self.callback(f"pass {self.done}/{self.total}: {pass_.spec}")


def default_instruments(
    tolerance: Tolerance = FP32,
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
    total: int = 0,
) -> list[Instrument]:
    instruments: list[Instrument] = [Progress(progress, total)] if progress else []
    instruments += [Timing(), Counts(), GraphCheck()]
    if verify:
        instruments.append(Numerics(tolerance))
    return instruments


class PassManager:
    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] | None = None):
        self.passes = list(passes)
        self.instruments = list(instruments) if instruments is not None else default_instruments()

    def run(self, program: Program) -> list[PassRecord]:
        records: list[PassRecord] = []
        for pass_ in self.passes:
            record = PassRecord(name=pass_.name, spec=pass_.spec)
            try:
                for instrument in self.instruments:
                    instrument.before_pass(pass_, program, record)
                result = pass_(program)
                record.modified, record.stats, record.notes = result.modified, result.stats, result.notes
                for instrument in self.instruments:
                    instrument.after_pass(pass_, program, record)
            except Exception as exc:
                done = ", ".join(r.spec for r in records)
                cause = exc.message if isinstance(exc, KilnError) else f"{type(exc).__name__}: {exc}"
                hint = exc.hint if isinstance(exc, KilnError) else None
                raise PassError(f"while running {pass_.spec} after [{done}]: {cause}", hint=hint) from exc
            records.append(record)
        return records
