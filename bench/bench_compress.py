"""Compression benchmark: what each pass does to parameters, bytes and ONNX file size, and the
ONNX Runtime latency of the 50%-channel-pruned zoo ResNet against the unpruned one.

One process, side by side: every row compiles the same model; latency is the median of
``session.run`` over calls timed in alternating blocks (see bench_quant.interleaved_ms).

    python bench/bench_compress.py [--model resnet] [--batch 8] [--runs 200]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import onnxruntime as ort
import torch
from bench_quant import interleaved_ms, numpy_feeds, session

import torchkiln
from torchkiln import models

PIPELINES = {
    "dense (cleanup, fold_batchnorm)": "cleanup,fold_batchnorm",
    "prune 50% unstructured": "cleanup,fold_batchnorm,prune:ratio=0.5",
    "prune 2:4": "cleanup,fold_batchnorm,prune:pattern=2:4",
    "prune 50% channels": "cleanup,fold_batchnorm,prune:structured=true,ratio=0.5",
    "lowrank rank_ratio=0.5": "cleanup,fold_batchnorm,lowrank:rank_ratio=0.5",
    "cluster 16": "cleanup,fold_batchnorm,cluster:clusters=16",
    "quantize int8": "cleanup,fold_batchnorm,quantize",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    entry = models.get(args.model)
    model, inputs = entry.build(), entry.example_inputs(args.batch)
    calibration = [entry.example_inputs(args.batch, seed=100 + i) for i in range(8)]
    print(f"{args.model}, batch {args.batch}; torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.runs} calls")  # fmt: skip
    built = {}
    for label, passes in PIPELINES.items():
        print(f"building {label}...", file=sys.stderr, flush=True)
        built[label] = torchkiln.compile(
            model, inputs, passes=passes, calibration_data=calibration, dynamic_axes=entry.dynamic_axes,
            latency_runs=0,
        )  # fmt: skip
    feeds = numpy_feeds(inputs)
    sessions = {label: session(c.artifact.model_path) for label, c in built.items()}
    latency = interleaved_ms({label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()}, args.runs)
    dense = built["dense (cleanup, fold_batchnorm)"]
    base = dense.report
    print(f"{'pipeline':34s} {'params':>8s} {'bytes':>7s} {'file':>7s} {'ORT ms':>8s} {'speed-up':>8s} {'cosine':>8s}")
    for label, compiled in built.items():
        report = compiled.report
        print(
            f"{label:34s} {report.params / base.params:7.2f}x {report.param_bytes / base.param_bytes:6.2f}x "
            f"{report.artifact.file_bytes / base.artifact.file_bytes:6.2f}x {latency[label]:8.3f} "
            f"{latency['dense (cleanup, fold_batchnorm)'] / latency[label]:7.2f}x {report.artifact.cosine:8.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
