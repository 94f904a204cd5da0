"""Zoo benchmark: eager vs ONNX Runtime latency, and compile time vs torch.onnx.export alone.

Every figure of one row is measured in the same process, side by side, so the ratios are
meaningful even when absolute timings drift. Latency is the median of --runs calls after
warm-up, at batch 1, through the public call path (``compiled(**inputs)``) with the default
passes (cleanup, fold_batchnorm). Compile and export times are the median of --builds builds.

    python bench/bench_zoo.py                    # the small zoo
    python bench/bench_zoo.py --models resnet18 resnet50 --runs 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

import torchkiln
from torchkiln import models
from torchkiln.compiler.export import quiet
from torchkiln.driver.api import median_ms


def seconds(fn, builds: int) -> float:
    times = []
    for _ in range(builds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, runs: int, builds: int) -> dict[str, float | str]:
    entry = models.get(name)
    model, inputs = entry.build(), entry.example_inputs()
    compiled = torchkiln.compile(model, inputs, dynamic_axes=entry.dynamic_axes, latency_runs=0)
    eager_ms = median_ms(lambda: model(**inputs), runs)
    ort_ms = median_ms(lambda: compiled(**inputs), runs)
    compile_s = seconds(
        lambda: torchkiln.compile(model, inputs, dynamic_axes=entry.dynamic_axes, latency_runs=0), builds
    )

    def export_alone() -> None:
        with quiet():
            torch.onnx.export(model, (), kwargs=inputs, dynamo=True, verbose=False)

    export_alone()  # warm-up: the first export pays one-time import and registry costs
    export_s = seconds(export_alone, builds)
    return {
        "model": name,
        "eager_ms": eager_ms,
        "ort_ms": ort_ms,
        "eager_over_ort": eager_ms / ort_ms,
        "compile_s": compile_s,
        "export_s": export_s,
        "compile_over_export": compile_s / export_s,
        "max_rel_error": compiled.report.artifact.max_rel_error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=models.small_models())
    parser.add_argument("--runs", type=int, default=100, help="timed calls per latency figure")
    parser.add_argument("--builds", type=int, default=3, help="builds per compile/export time figure")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1; medians of {args.runs} calls / {args.builds} builds"
    )
    header = f"{'model':18s} {'eager ms':>9s} {'ORT ms':>8s} {'eager/ORT':>9s} {'compile s':>9s} {'export s':>8s} {'compile/export':>14s}"
    print(header)
    rows = []
    for index, name in enumerate(args.models, 1):
        print(f"[{index}/{len(args.models)}] {name}...", file=sys.stderr, flush=True)
        row = bench_model(name, args.runs, args.builds)
        rows.append(row)
        print(
            f"{name:18s} {row['eager_ms']:9.3f} {row['ort_ms']:8.3f} {row['eager_over_ort']:8.2f}x "
            f"{row['compile_s']:9.2f} {row['export_s']:8.2f} {row['compile_over_export']:13.2f}x",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
