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
from torchkiln.compiler.verify import FP32, ErrorStats, Tolerance, compare
from torchkiln.errors import ConfigError, InputError, KilnError, PassError


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
    """Compare the graph's outputs on every check input set. A lossless pass must stay within
    ``tolerance`` of the graph it was given — which is the eager model until a lossy pass has
    changed it (after ``prune``, ``fold_batchnorm`` is held to the pruned graph, not to eager). A
    lossy pass must keep what it promises (:meth:`Pass.tolerance`) against the graph it was given;
    its error against eager is reported."""

    def __init__(self, tolerance: Tolerance = FP32):
        self.tolerance = tolerance
        self._given: list[tuple[torch.Tensor, ...]] = []
        self._given_held_back: list[tuple[torch.Tensor, ...]] = []
        self._lossy_ran = False

    def before_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        needed = self._lossy_ran or not pass_.lossless
        self._given = [program.run(c.inputs) for c in program.checks] if needed else []
        self._given_held_back = [program.run(c.inputs) for c in program.held_back] if not pass_.lossless else []

    def after_pass(self, pass_: Pass, program: Program, record: PassRecord) -> None:
        outputs = [program.run(c.inputs) for c in program.checks]
        against_eager = self._worst(pass_, outputs, [c.outputs for c in program.checks], self.tolerance)
        record.max_abs_error, record.max_rel_error = against_eager.max_abs, against_eager.max_rel
        record.cosine = against_eager.cosine
        if pass_.lossless:
            record.tolerance = None
            reference = self._given or [c.outputs for c in program.checks]
            worst = self._worst(pass_, outputs, reference, self.tolerance)
            if not worst.within():
                of = "the graph it was given" if self._given else "the eager model"
                raise PassError(
                    f"pass '{pass_.name}' changed output {worst.worst_output} of {of} by max abs "
                    f"{worst.max_abs:.3e} (allowed {worst.allowed:.3e}: {self.tolerance})",
                    hint="this is a bug in the pass; run without it and report the model",
                )
            return
        promise = pass_.tolerance()
        record.tolerance = None if promise is None else str(promise)
        if promise is not None:
            self._check_promise(pass_, outputs, self._given, promise, "")
            if program.held_back:
                held = [program.run(c.inputs) for c in program.held_back]
                stats = self._check_promise(
                    pass_, held, self._given_held_back, promise, " on a held-back input"
                )
                record.held_back_batches = len(held)
                record.held_back_cosine, record.held_back_max_abs_error = stats.cosine, stats.max_abs
        self._lossy_ran = self._lossy_ran or record.modified

    def _worst(
        self,
        pass_: Pass,
        outputs: list[tuple[torch.Tensor, ...]],
        references: list[tuple[torch.Tensor, ...]],
        tolerance: Tolerance,
    ) -> ErrorStats:
        worst = None
        for got, want in zip(outputs, references):
            try:
                stats = compare(got, want, tolerance)
            except ValueError as exc:
                raise PassError(f"pass '{pass_.name}' changed the outputs' structure: {exc}") from exc
            if worst is None or stats.ratio > worst.ratio:
                worst = stats
        assert worst is not None
        return worst

    def _check_promise(
        self,
        pass_: Pass,
        outputs: list[tuple[torch.Tensor, ...]],
        given: list[tuple[torch.Tensor, ...]],
        promise: Tolerance,
        on: str,
    ) -> ErrorStats:
        stats = self._worst(pass_, outputs, given, promise)
        if not stats.within():
            raise PassError(
                f"pass '{pass_.spec}' broke its accuracy promise{on} on output {stats.worst_output}: cosine "
                f"{stats.cosine:.4f}, max abs error {stats.max_abs:.3e} (promised: {promise})",
                hint="keep more layers in higher precision (ignore=..., max_error=...) or relax the promise",
            )
        return stats


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
                cause = exc.message if isinstance(exc, KilnError) else _cause(exc)
                hint = exc.hint if isinstance(exc, KilnError) else None
                context = f"while running {pass_.spec} after [{done}]: {cause}"
                if isinstance(exc, (InputError, ConfigError)):  # the user's data or settings, not the pass
                    raise type(exc)(context, where=exc.where, hint=hint) from exc
                raise PassError(context, hint=hint) from exc
            records.append(record)
        return records


def _cause(exc: Exception) -> str:
    """``Type: message``, led by the graph node that raised when fx's interpreter names one (its
    report of the node comes after the message, often pages below the first line)."""
    text = str(exc)
    failed = G.failed_node(text)
    if failed is None:
        return f"{type(exc).__name__}: {text}"
    message = text.split("\n\nWhile executing")[0].strip()
    return f"at node '{failed[0]}' ({failed[1]}): {type(exc).__name__}: {message}"
