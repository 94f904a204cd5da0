"""Quantization benchmark: our static int8 against ONNX Runtime fp32, eager PyTorch, and ONNX
Runtime's own ``quantize_static`` (QDQ, per-channel, the same calibration batches) as the reference.

Per row, in one process, side by side: median latency of ``session.run`` for the fp32 model, our
int8 model and the reference int8 model (same session options), and of the eager model; accuracy as
the output cosine similarity to eager over 8 held-out random batches (and top-1 accuracy on the
digits test split for the trained ``digits_cnn``). Cosine is taken over all held-out outputs at
once: per batch-1 sample a 4-logit output of a random-init model is too short for it to mean much.

Per-layer check: both ORT models are profiled; any layer whose integer kernel is slower than its
float kernel (by more than 10% in ORT's profile) is reported and the int8 model is rebuilt with those layers in ``quantize:ignore``
("int8 tuned").

    python bench/bench_quant.py       # resnet b1/b8, text_encoder, digits_cnn, resnet18 (224x224)
    python bench/bench_quant.py --rows resnet18:1 --runs 50
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import torchkiln
from torchkiln import models
from torchkiln.compiler.verify import cosine_similarity
from torchkiln.driver.benchmark import interleaved_times
from torchkiln.models.digits import DigitsCNN, accuracy, load_digits_split, train_digits

INTEGER_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
FLOAT_KERNELS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
DEFAULT_ROWS = ("resnet:1", "resnet:8", "text_encoder:1", "digits_cnn:1", "resnet18:1")


class Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.items = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def session(path: Path, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    options.enable_profiling = profile
    if profile:
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "kiln_bench_profile")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def numpy_feeds(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


def reference_int8(fp32_path: Path, calibration: list[dict[str, torch.Tensor]], directory: Path) -> Path:
    """ONNX Runtime's own static quantization of our fp32 export (QDQ, per-channel int8 weights,
    uint8 activations, MinMax calibration: its defaults for CNNs on x86)."""
    out = directory / "reference_int8.onnx"
    quantize_static(
        str(fp32_path),
        str(out),
        Reader([numpy_feeds(b) for b in calibration]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def layer_times(path: Path, feeds: dict[str, np.ndarray], runs: int) -> dict[str, tuple[str, float]]:
    """Module path → (kernel, mean µs per call) for conv/gemm/matmul kernels, from ORT's profiler."""
    sess = session(path, profile=True)
    for _ in range(runs):
        sess.run(None, feeds)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    totals: dict[str, list[Any]] = collections.defaultdict(lambda: ["", 0.0])
    for event in events:
        kernel = event.get("args", {}).get("op_name", "")
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            if kernel in INTEGER_KERNELS | FLOAT_KERNELS and "/" in event["name"]:
                entry = totals[event["name"].split("/")[0]]
                entry[0], entry[1] = kernel, entry[1] + event["dur"] / runs
    return {k: (v[0], v[1]) for k, v in totals.items()}


def slower_in_int8(fp32: Path, int8: Path, feeds: dict[str, np.ndarray], runs: int) -> list[str]:
    floats, ints = layer_times(fp32, feeds, runs), layer_times(int8, feeds, runs)
    return sorted(
        layer
        for layer, (kernel, micros) in ints.items()
        if kernel in INTEGER_KERNELS and layer in floats and micros > floats[layer][1] * 1.10
    )


def build(name: str, batch: int) -> tuple[torch.nn.Module, Any, Any, Any, Any]:
    entry = models.get(name)
    if name == "digits_cnn":
        data = load_digits_split()
        torch.manual_seed(0)
        model = train_digits(DigitsCNN(), data)
        calibration = [{"x": data.x_train[i : i + batch]} for i in range(0, 256, batch)][:64]
        evaluation = [{"x": data.x_test[i : i + batch]} for i in range(0, 64, batch)][:8]
        return model, calibration[0], calibration, evaluation, data
    model = entry.build()
    calibration = [entry.example_inputs(batch, seed=100 + i) for i in range(16)]
    evaluation = [entry.example_inputs(batch, seed=200 + i) for i in range(8)]
    return model, entry.example_inputs(batch), calibration, evaluation, None


def bench_row(name: str, batch: int, runs: int, directory: Path) -> dict[str, Any]:
    model, inputs, calibration, evaluation, data = build(name, batch)
    axes = models.get(name).dynamic_axes
    fp32 = torchkiln.compile(model, inputs, dynamic_axes=axes, latency_runs=0)

    def ours(ignore: list[str]) -> torchkiln.CompiledModel:
        spec = "cleanup,fold_batchnorm,quantize" + (f":ignore={'|'.join(ignore)}" if ignore else "")
        return torchkiln.compile(
            model, inputs, passes=spec, dynamic_axes=axes, calibration_data=calibration, latency_runs=0
        )

    int8 = ours([])
    feeds = numpy_feeds(inputs)
    slower = slower_in_int8(fp32.artifact.model_path, int8.artifact.model_path, feeds, runs)
    tuned = ours(slower) if slower else int8
    paths = {
        "fp32": fp32.artifact.model_path,
        "ours": int8.artifact.model_path,
        "tuned": tuned.artifact.model_path,
        "ort": reference_int8(fp32.artifact.model_path, calibration, directory),
    }
    sessions = {key: session(path) for key, path in paths.items()}
    calls: dict[str, Callable[[], Any]] = {"eager": lambda: model(**inputs)}
    calls.update({key: (lambda sess=sess: sess.run(None, feeds)) for key, sess in sessions.items()})
    row: dict[str, Any] = {"model": name, "batch": batch}
    row.update({f"{key}_ms": ms for key, ms in interleaved_ms(calls, runs).items()})
    for key in ("ours", "tuned", "ort"):
        row[f"{key}_cosine"] = _cosine(model, sessions[key], evaluation)
    if data is not None:
        row["eager_top1"] = accuracy(model, data.x_test, data.y_test)
        for key in ("ours", "ort"):
            row[f"{key}_top1"] = accuracy(_runner(sessions[key]), data.x_test, data.y_test)
    row["slower_layers_kept_float"] = slower
    return row


def interleaved_ms(calls: dict[str, Callable[[], Any]], runs: int, block: int = 20) -> dict[str, float]:
    """Median ms per call, the candidates timed in alternating blocks (torchkiln.driver.benchmark)."""
    return {key: statistics.median(values) for key, values in interleaved_times(calls, runs, block).items()}


def _runner(sess: ort.InferenceSession) -> Any:
    return lambda x: torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


def _cosine(model: torch.nn.Module, sess: ort.InferenceSession, batches: list[dict[str, torch.Tensor]]) -> float:
    """Cosine similarity of all held-out outputs, concatenated, to eager's."""
    with torch.no_grad():
        want = torch.cat([model(**b).flatten() for b in batches])
    got = torch.cat([torch.from_numpy(sess.run(None, numpy_feeds(b))[0]).flatten() for b in batches])
    return cosine_similarity(got, want)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(DEFAULT_ROWS), help="MODEL:BATCH rows")
    parser.add_argument("--runs", type=int, default=200, help="timed calls per latency figure")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process, per call
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads; medians of {args.runs} calls")
    print(
        f"{'model':14s} {'b':>2s} {'eager/fp32':>10s} {'eager/int8':>10s} {'eager/ORTq':>10s} "
        f"{'fp32/int8':>9s} {'ORTq/int8':>9s} {'cos int8':>9s} {'cos ORTq':>9s}  notes"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, spec in enumerate(args.rows, 1):
            name, _, batch = spec.partition(":")
            print(f"[{index}/{len(args.rows)}] {spec}...", file=sys.stderr, flush=True)
            row = bench_row(name, int(batch or 1), args.runs, Path(tmp))
            rows.append(row)
            print(_line(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _line(row: dict[str, Any]) -> str:
    eager = row["eager_ms"]
    best = "tuned" if row["slower_layers_kept_float"] else "ours"
    notes = []
    if row["slower_layers_kept_float"]:
        notes.append(f"slower in int8, kept float: {', '.join(row['slower_layers_kept_float'])}")
    if "eager_top1" in row:
        notes.append(f"top-1 eager {row['eager_top1']:.2f}, int8 {row['ours_top1']:.2f}, ORTq {row['ort_top1']:.2f}")
    return (
        f"{row['model']:14s} {row['batch']:2d} {eager / row['fp32_ms']:9.2f}x {eager / row[best + '_ms']:9.2f}x "
        f"{eager / row['ort_ms']:9.2f}x {row['fp32_ms'] / row[best + '_ms']:8.2f}x "
        f"{row['ort_ms'] / row[best + '_ms']:8.2f}x {row[best + '_cosine']:9.5f} {row['ort_cosine']:9.5f}  "
        + "; ".join(notes)
    )


if __name__ == "__main__":
    sys.exit(main())
