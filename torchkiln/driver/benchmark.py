"""Side-by-side latency measurement: the runtimes of one model, timed in one process.

Timings drift (thermal state, other load: up to 1.7x within half an hour on a shared machine), so
candidates are timed in alternating blocks and compared only with each other, as ratios. The
first calls of each block are not timed: ONNX Runtime's worker threads keep spinning for a while
after a run and would slow whatever runs next.

Peak memory is the growth of the process's resident set while a runtime is built and run, sampled
every 2 ms from ``/proc/self/statm`` (Linux; None elsewhere). Memory freed by one runtime is not
always returned to the OS, so a later runtime can show less than it uses; read it as a rough,
upper-bound-by-order figure.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from torchkiln.compiler.machine import KERNEL_FLAGS, cpu_flags, cpu_model

K = TypeVar("K")


@dataclasses.dataclass(frozen=True)
class Latency:
    p50: float
    p90: float
    p99: float
    runs: int

    @classmethod
    def of(cls, times_ms: list[float]) -> Latency:
        ordered = sorted(times_ms)

        def at(q: float) -> float:  # nearest rank: the smallest value with a share >= q at or below it
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return cls(at(0.5), at(0.9), at(0.99), len(ordered))


def machine_line() -> str:
    """``CPU: <model>, <n> threads; flags: ...`` for a benchmark's header."""
    flags = cpu_flags()
    present = [f for f in KERNEL_FLAGS if f in flags] if flags is not None else ["(unknown)"]
    listed = " ".join(present) or "none of " + " ".join(KERNEL_FLAGS)
    return f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; flags: {listed}"


def interleaved_times(
    calls: Mapping[K, Callable[[], Any]],
    runs: int,
    block: int = 20,
    on_block: Callable[[], None] | None = None,
    settle: float = 0.0,
) -> dict[K, list[float]]:
    """Wall times (ms) of ``runs`` calls of each candidate, timed in alternating blocks. With
    ``settle`` (seconds) the process sleeps before each block, so the worker threads the previous
    runtime left spinning go idle instead of competing with the next one for the cores."""
    times: dict[K, list[float]] = {key: [] for key in calls}
    block = max(1, min(block, runs))
    with torch.no_grad():
        for _ in range(max(1, runs // block)):
            for key, call in calls.items():
                if settle:
                    time.sleep(settle)
                for index in range(block + 3):
                    start = time.perf_counter()
                    call()
                    if index >= 3:
                        times[key].append((time.perf_counter() - start) * 1e3)
            if on_block is not None:
                on_block()
    return times


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.growth_bytes``."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.growth_bytes: int | None = None

    @contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        start = _rss_bytes()
        if start is None:
            yield self
            return
        peak = [start]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_bytes() or 0)
                stop.wait(self.interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            stop.set()
            sampler.join()
            peak[0] = max(peak[0], _rss_bytes() or 0)
            self.growth_bytes = peak[0] - start
