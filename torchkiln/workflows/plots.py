"""PNG plots for build and bench reports. matplotlib is optional (``pip install torchkiln[plot]``):
without it the plot is skipped and the report says so."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchkiln.compiler.files import PNG_MARKER, atomic_file

#: One point on an accuracy plot: label, accuracy, size in MB, latency in ms (None: not measured).
Point = tuple[str, float, float, float | None]


def matplotlib_or_reason() -> tuple[Any, str | None]:
    """``(pyplot, None)``, or ``(None, why)`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install 'torchkiln[plot]')"
    return plt, None


def accuracy_plot(path: Path, points: Sequence[Point], metric: str) -> str | None:
    """Accuracy vs size and vs latency, one marker per point; returns why it was skipped, if it was."""
    plt, reason = matplotlib_or_reason()
    if plt is None:
        return reason
    figure, (by_size, by_latency) = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, accuracy, size_mb, latency_ms in points:
        by_size.scatter([size_mb], [accuracy], label=label)
        by_size.annotate(label, (size_mb, accuracy), textcoords="offset points", xytext=(4, 4))
        if latency_ms is not None:
            by_latency.scatter([latency_ms], [accuracy], label=label)
            by_latency.annotate(label, (latency_ms, accuracy), textcoords="offset points", xytext=(4, 4))
    by_size.set(xlabel="size (MB)", ylabel=metric, title=f"{metric} vs size")
    by_latency.set(xlabel="latency (ms)", ylabel=metric, title=f"{metric} vs latency")
    save_figure(plt, figure, path)
    return None


def latency_plot(path: Path, series: dict[str, list[tuple[int, float]]]) -> str | None:
    """Throughput (samples/s) over batch size, one line per runtime."""
    plt, reason = matplotlib_or_reason()
    if plt is None:
        return reason
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        axes.plot([b for b, _ in values], [t for _, t in values], marker="o", label=label)
    sizes = sorted({b for values in series.values() for b, _ in values})
    axes.set(xlabel="batch size", ylabel="samples / s", title="throughput")
    if len(sizes) > 1:
        axes.set_xscale("log", base=2)
    axes.set_xticks(sizes, [str(b) for b in sizes])
    axes.legend()
    save_figure(plt, figure, path)
    return None


def save_figure(plt: Any, figure: Any, path: Path, dpi: int = 100) -> None:
    """Written beside and renamed into place (never a half-written PNG, never over a file of
    yours), with our marker chunk and no "Software" entry: the file does not change with the
    matplotlib version."""
    figure.tight_layout()
    try:
        with atomic_file(path, "png") as partial:
            figure.savefig(partial, format="png", dpi=dpi, metadata=PNG_MARKER)
    finally:
        plt.close(figure)
