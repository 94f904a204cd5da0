"""Runtimes side by side on this CPU: eager, ONNX Runtime (ours and ONNX Runtime's own quantizers),
AOTInductor (fp32, bf16, int8) and ``backend="auto"``, in one process.

Rows (``--rows``):

* ``resnet18`` — ResNet-18, 224x224, batch 1. References: ONNX Runtime fp32 (our export) and ONNX
  Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax, the
  same calibration batches as ours). Ours: static int8 on ONNX Runtime and on Inductor.
* ``bert`` — BERT-base (transformers' ``BertConfig()``, random weights), sequence 128, batch 1.
  Reference: ONNX Runtime's transformers optimizer (``optimize_model``, model_type bert) then
  ``quantize_dynamic`` (int8 weights). Ours: dynamic int8 on ONNX Runtime and on Inductor, and
  static int8 on Inductor.

Latency: medians of the interleaved timer (alternating blocks), all candidates of a row timed
together. Accuracy: cosine similarity of all outputs on 8 held-out batches to eager's. The CPU's
model and kernel flags are printed first: the winner depends on them (VNNI/AMX or not).

    python bench/bench_inductor.py                      # both rows, 100 timed calls each
    python bench/bench_inductor.py --rows resnet18 --runs 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from bench_quant import numpy_feeds, reference_int8, session
from onnxruntime.quantization import QuantType, quantize_dynamic

import torchkiln
from torchkiln import models
from torchkiln.compiler.verify import cosine_similarity
from torchkiln.driver.benchmark import interleaved_times, machine_line

Row = dict[str, Any]


def resnet18_case() -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[Any], list[Any], Any]:
    entry = models.get("resnet18")
    model = entry.build()
    calibration = [entry.example_inputs(1, seed=100 + i) for i in range(16)]
    held_out = [entry.example_inputs(1, seed=200 + i) for i in range(8)]
    return model, entry.example_inputs(1), calibration, held_out, None


def bert_case() -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[Any], list[Any], Any]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(), add_pooling_layer=False).eval()

    def batch(seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000, 30000, (1, 128), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    calibration = [batch(100 + i) for i in range(16)]
    held_out = [batch(200 + i) for i in range(8)]
    return model, batch(1), calibration, held_out, "bert"


CASES = {"resnet18": resnet18_case, "bert": bert_case}


def first_output(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    if isinstance(value, dict):
        return next(iter(value.values()))
    return first_output(value[0])


def ours(model: torch.nn.Module, inputs: Any, passes: str, backend: str, calibration: Any, **options: Any) -> Any:
    half = options.get("dtype") in ("bfloat16", "float16")
    return torchkiln.compile(
        model, inputs, passes=passes, backend=backend, backend_options=options, latency_runs=0,
        calibration_data=calibration if "quantize" in passes and "mode=dynamic" not in passes else None,
        tolerance=torchkiln.Tolerance(min_cosine=0.999) if half else None,
    )  # fmt: skip


def keywords(compiled: Any) -> Callable[[dict[str, torch.Tensor]], Any]:
    return lambda x: compiled(**x)


def ort_reference(kind: str | None, fp32: Path, calibration: list[Any], directory: Path) -> Path:
    """ONNX Runtime's own int8: quantize_static for a CNN; optimizer fusion + quantize_dynamic for BERT."""
    if kind != "bert":
        return reference_int8(fp32, calibration, directory)
    from onnxruntime.transformers.optimizer import optimize_model

    fused = directory / "bert_fused.onnx"
    optimize_model(str(fp32), model_type="bert", num_heads=12, hidden_size=768).save_model_to_file(str(fused))
    out = directory / "bert_fused_dynamic_int8.onnx"
    quantize_dynamic(str(fused), str(out), weight_type=QuantType.QInt8)
    return out


def candidates(case: str, model: torch.nn.Module, inputs: Any, calibration: list[Any], directory: Path) -> dict[str, Any]:
    """label -> a callable(inputs) for every runtime of the row (each built here, timed later)."""
    built: dict[str, Any] = {"eager": lambda x: model(**x)}
    float_passes = "cleanup,fold_batchnorm" if case == "resnet18" else "cleanup"
    int8_passes = float_passes + (",quantize" if case == "resnet18" else ",quantize:mode=dynamic")
    fp32 = ours(model, inputs, float_passes, "onnxruntime", None)
    built["ORT fp32 (ours)"] = keywords(fp32)
    # ONNX Runtime's transformers optimizer fuses the opset-18 attention pattern (at 23 the exporter
    # writes ONNX Attention, which it turns into an invalid QAttention).
    source = fp32 if case == "resnet18" else ours(model, inputs, float_passes, "onnxruntime", None, opset=18)
    ort_path = ort_reference(None if case == "resnet18" else "bert", source.artifact.model_path, calibration, directory)
    ref = session(ort_path)
    names = [i.name for i in ref.get_inputs()]
    built["ORT own int8"] = lambda x: ref.run(None, {k: v for k, v in numpy_feeds(x).items() if k in names})
    plans: list[tuple[str, str, str, dict[str, Any]]] = [
        ("ORT int8 (ours)", int8_passes, "onnxruntime", {}),
        ("Inductor fp32", float_passes, "inductor", {}),
        ("Inductor bf16", float_passes, "inductor", {"dtype": "bfloat16"}),
        ("Inductor int8", int8_passes, "inductor", {}),
    ]
    if case == "bert":
        plans.append(("Inductor static int8", float_passes + ",quantize", "inductor", {}))
    plans.append(("auto", int8_passes, "auto", {}))
    for label, passes, backend, options in plans:
        print(f"  building {label}...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            compiled = ours(model, inputs, passes, backend, calibration, **options)
        except torchkiln.KilnError as exc:
            print(f"  {label}: failed: {exc.message.splitlines()[0][:200]}", file=sys.stderr, flush=True)
            continue
        if backend == "auto":
            label += f" -> {compiled.report.candidates[0].label}"
            for candidate in compiled.report.candidates:
                shown = "-" if candidate.latency_ms is None else f"{candidate.latency_ms:.3f}"
                print(f"  auto candidate {candidate.label}: {candidate.verdict} {shown} ms", file=sys.stderr)
        built[label] = keywords(compiled)
        notes = "; ".join(compiled.report.artifact.notes)
        print(f"  {label}: built in {time.perf_counter() - start:.0f} s; {notes}", file=sys.stderr, flush=True)
    return built


def bench_row(case: str, runs: int, directory: Path) -> Row:
    model, inputs, calibration, held_out, _ = CASES[case]()
    built = candidates(case, model, inputs, calibration, directory)
    calls: dict[str, Callable[[], Any]] = {label: (lambda f=f: f(inputs)) for label, f in built.items()}
    medians = {k: statistics.median(v) for k, v in interleaved_times(calls, runs).items()}
    with torch.no_grad():
        want = torch.cat([first_output(model(**b)).flatten() for b in held_out])
    cosines = {}
    for label, run in built.items():
        with torch.no_grad():
            got = [first_output(run(b)) for b in held_out]
        flat = torch.cat([torch.as_tensor(np.asarray(g)).flatten().float() for g in got])
        cosines[label] = cosine_similarity(flat, want)
    return {"case": case, "ms": medians, "cosine": cosines}


def table(row: Row) -> str:
    ms, cos = row["ms"], row["cosine"]
    ort_int8 = ms["ORT own int8"]
    lines = [f"{row['case']}: {'runtime':30s} {'ms':>8s} {'vs eager':>9s} {'vs ORT own int8':>16s} {'cosine':>9s}"]
    for label in ms:
        lines.append(
            f"{'':{len(row['case']) + 2}s}{label:30s} {ms[label]:8.2f} {ms['eager'] / ms[label]:8.2f}x "
            f"{ort_int8 / ms[label]:15.2f}x {cos[label]:9.5f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--runs", type=int, default=100, help="timed calls per runtime")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    print(machine_line())
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}; medians of {args.runs} interleaved calls")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.rows:
            print(f"[{case}] building...", file=sys.stderr, flush=True)
            row = bench_row(case, args.runs, Path(tmp))
            rows.append(row)
            print(table(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
