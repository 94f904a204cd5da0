"""torchkiln against the runtimes a CPU user would pick instead: each runtime in its own process,
in alternating rounds.

Cases (``--cases``, each ``model:batch``): ``resnet18``, ``resnet50``, ``mobilenet_v2`` (torchvision
layouts, 224x224), ``bert`` (BERT-base, sequence 128), ``vit`` (ViT-B/16, 224x224); random weights
(speed does not depend on their values; BatchNorm statistics randomised so that folding is real).

Runtimes (``--runtimes``):

* ``eager`` — the PyTorch model;
* ``ort-fp32`` — ONNX Runtime on the fp32 ONNX; ``ort-int8`` — ONNX Runtime's own int8:
  ``quantize_static`` (QDQ, per-channel, uint8 activations) for CNNs and ViT, the transformers
  optimizer then ``quantize_dynamic`` for BERT;
* ``openvino`` — OpenVINO on the fp32 ONNX at its default precision (bf16 where the CPU has it);
  ``nncf-int8`` — ``nncf.quantize`` of that model (model type transformer for BERT and ViT);
* ``kiln-<backend>-<fp32|int8>`` for onnxruntime, openvino and inductor — torchkiln's artifact (int8 =
  static for CNNs, dynamic for transformers); ``kiln-auto`` — ``backend=auto`` on the int8 program.

Every int8 runtime is calibrated on the same 16 batches. Each runtime is built once (the parent
saves it under a work directory); then for every round every runtime runs in a fresh process that
loads it, checks its cosine against eager on 4 held-out batches, and times ``--runs`` calls; the
round's order rotates. A runtime's latency is the median of its round medians, with the range.

    python bench/bench_peers.py                                   # resnet18:1 and bert:1
    python bench/bench_peers.py --cases resnet18:1 resnet18:32 vit:1 --rounds 3 --json peers.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

KILN = [f"kiln-{b}-{p}" for b in ("onnxruntime", "openvino", "inductor") for p in ("fp32", "int8")] + ["kiln-auto"]
RUNTIMES = ["eager", "ort-fp32", "ort-int8", "openvino", "nncf-int8", *KILN]
TRANSFORMERS = ("bert", "vit")


# --- the cases -------------------------------------------------------------------------------------------


def build_model(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if case in ("resnet18", "resnet50", "mobilenet_v2"):
        from torchkiln import models
        from torchkiln.models.mobilenet import MobileNetV2

        model = MobileNetV2(1.0, 1000, stem_stride=2) if case == "mobilenet_v2" else models.build(case)
        models.randomize_batchnorm(model)
        return model.eval()
    if case == "bert":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(), add_pooling_layer=False).eval()
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(), add_pooling_layer=False).eval()


def inputs(case: str, batch: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if case == "bert":
        ids = torch.randint(1000, 30000, (batch, 128), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    name = "pixel_values" if case == "vit" else "x"
    return {name: torch.randn(batch, 3, 224, 224, generator=generator)}


def first_output(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32)
    if hasattr(value, "last_hidden_state"):
        return first_output(value.last_hidden_state)
    if isinstance(value, dict):
        return first_output(next(iter(value.values())))
    return first_output(value[0])


CALIBRATION, HELD_OUT = [100 + i for i in range(16)], [200 + i for i in range(4)]


# --- building (parent) -----------------------------------------------------------------------------------


def build_all(case: str, batch: int, runtimes: list[str], work: Path, say: Callable[[str], None]) -> dict[str, str]:
    """Save every runtime of the case under ``work``; label -> how it was built (or why it failed)."""
    import torchkiln

    model = build_model(case)
    example = inputs(case, batch, 1)
    calibration = [inputs(case, 1, s) for s in CALIBRATION]
    with torch.no_grad():
        expected = np.concatenate([first_output(model(**inputs(case, batch, s))).ravel() for s in HELD_OUT])
    np.save(work / "expected.npy", expected)
    axes = {name: {0: "batch"} for name in example}
    dynamic = ",quantize:mode=dynamic" if case in TRANSFORMERS else ",quantize"
    float_passes = "cleanup" if case in TRANSFORMERS else "cleanup,fold_batchnorm"
    built: dict[str, str] = {}

    def kiln(label: str, passes: str, backend: str, **options: Any) -> Any:
        compiled = torchkiln.compile(
            model, example, passes=passes, backend=backend, backend_options=options, dynamic_axes=axes,
            calibration_data=calibration if passes.endswith(",quantize") else None, latency_runs=0,
        )  # fmt: skip
        compiled.save(work / label)
        chosen = f" -> {compiled.backend}" if backend == "auto" else ""
        return compiled, f"torchkiln {passes} on {backend}{chosen}; {'; '.join(compiled.report.artifact.notes)}"

    source = None  # the fp32 ONNX every peer starts from (opset 18: what ORT's transformers optimizer fuses)
    for label in runtimes:
        say(f"[{case}:{batch}] building {label}")
        start = time.perf_counter()
        try:
            if label.startswith("kiln-"):
                backend, _, precision = label.removeprefix("kiln-").rpartition("-")
                passes = float_passes + (dynamic if precision == "int8" or label == "kiln-auto" else "")
                built[label] = kiln(label, passes, backend or "auto")[1]
            elif label != "eager":
                if source is None:
                    compiled, _ = kiln("fp32-onnx", float_passes, "onnxruntime", opset=18)
                    source = compiled.artifact.model_path
                built[label] = build_peer(case, label, Path(source), calibration, work)
            else:
                built[label] = "PyTorch eager"
        except Exception as exc:  # a runtime that cannot be built is a row saying why
            built[label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        say(f"  {label}: {built[label]} ({time.perf_counter() - start:.0f} s)")
    return built


def build_peer(case: str, label: str, fp32: Path, calibration: list[dict[str, torch.Tensor]], work: Path) -> str:
    import openvino as ov

    if label == "ort-fp32":
        (work / "ort-fp32.onnx").write_bytes(fp32.read_bytes())
        return "ONNX Runtime, the fp32 ONNX"
    if label == "ort-int8":
        from bench_inductor import ort_reference

        out = ort_reference("bert" if case == "bert" else None, fp32, calibration, work)
        out.rename(work / "ort-int8.onnx")
        return "ONNX Runtime " + ("optimize_model + quantize_dynamic" if case == "bert" else "quantize_static (QDQ)")
    model = ov.convert_model(str(fp32))
    if label == "openvino":
        ov.save_model(model, str(work / "openvino.xml"), compress_to_fp16=False)
        return f"OpenVINO {ov.__version__.split('-')[0]}, default precision"
    import nncf

    dataset = nncf.Dataset([{k: v.numpy() for k, v in batch.items()} for batch in calibration])
    kind = {"model_type": nncf.ModelType.TRANSFORMER} if case in TRANSFORMERS else {}
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration), **kind)
    ov.save_model(quantized, str(work / "nncf-int8.xml"), compress_to_fp16=False)
    return f"NNCF {nncf.__version__} quantize (int8), OpenVINO default precision"


# --- one runtime in its own process (worker) --------------------------------------------------------------


def load_runtime(case: str, label: str, work: Path) -> Callable[[dict[str, torch.Tensor]], Any]:
    if label == "eager":
        model = build_model(case)
        return lambda x: model(**x)
    if label.startswith("kiln-"):
        import torchkiln

        compiled = torchkiln.load(work / label, allow_native_code=True)
        return lambda x: compiled(**x)
    if label.startswith("ort-"):
        import onnxruntime as ort

        session = ort.InferenceSession(str(work / f"{label}.onnx"), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        return lambda x: session.run(None, {k: v.numpy() for k, v in x.items() if k in names})
    import openvino as ov

    compiled_model = ov.Core().compile_model(str(work / f"{label}.xml"), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    request = compiled_model.create_infer_request()
    names = [port.get_any_name() for port in compiled_model.inputs]

    def infer(x: dict[str, torch.Tensor]) -> Any:
        for index, name in enumerate(names):
            request.set_input_tensor(index, ov.Tensor(x[name].numpy(), shared_memory=True))
        request.infer()
        return request.get_output_tensor(0).data.copy()

    return infer


def worker(case: str, batch: int, label: str, work: Path, runs: int) -> dict[str, Any]:
    run = load_runtime(case, label, work)
    example = inputs(case, batch, 1)
    with torch.no_grad():
        got = np.concatenate([first_output(run(inputs(case, batch, s))).ravel() for s in HELD_OUT])
        expected = np.load(work / "expected.npy")
        cosine = float(np.dot(got, expected) / (np.linalg.norm(got) * np.linalg.norm(expected)))
        for _ in range(3):
            run(example)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run(example)
            times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "cosine": cosine}


# --- the rounds (parent) -----------------------------------------------------------------------------------


def measure(case: str, batch: int, labels: list[str], work: Path, runs: int, rounds: int, say: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for number in range(rounds):
        order = labels[number % len(labels):] + labels[: number % len(labels)]
        for label in order:
            command = [sys.executable, __file__, "--worker", f"{case}:{batch}", label, str(work), str(runs)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            if done.returncode != 0 or not line.startswith("{"):
                say(f"  {label} round {number + 1}: failed: {done.stderr.strip().splitlines()[-1:] or '?'}")
                continue
            results[label].append(json.loads(line))
        say(f"[{case}:{batch}] round {number + 1}/{rounds} done")
    summary = {}
    for label, found in results.items():
        if found:
            medians = [r["ms"] for r in found]
            summary[label] = {"ms": statistics.median(medians), "min": min(medians), "max": max(medians),
                              "cosine": found[0]["cosine"], "rounds": len(found)}  # fmt: skip
    return summary


def table(case: str, batch: int, summary: dict[str, Any], built: dict[str, str]) -> str:
    peers = [summary[p]["ms"] for p in ("ort-fp32", "ort-int8", "openvino", "nncf-int8") if p in summary]
    fastest = min(peers) if peers else None
    lines = [f"{case} batch {batch}: {'runtime':22s} {'ms':>8s} {'range':>17s} {'vs fastest peer':>16s} {'cosine':>9s}"]
    indent = " " * (len(f"{case} batch {batch}: "))
    for label in built:
        if label not in summary:
            lines.append(f"{indent}{label:22s} {built[label]}")
            continue
        row = summary[label]
        ratio = f"{fastest / row['ms']:15.2f}x" if fastest else f"{'-':>16s}"
        lines.append(f"{indent}{label:22s} {row['ms']:8.2f} {row['min']:8.2f}-{row['max']:<8.2f} {ratio} {row['cosine']:9.5f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=["resnet18:1", "bert:1"])
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated labels")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per runtime per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=4, metavar=("CASE:BATCH", "RUNTIME", "WORK", "RUNS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.worker:
        case, batch = args.worker[0].split(":")
        print(json.dumps(worker(case, int(batch), args.worker[1], Path(args.worker[2]), int(args.worker[3]))))
        return 0
    from torchkiln.driver.benchmark import machine_line

    labels = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = sorted(set(labels) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    print(machine_line())
    print(versions())
    print(f"each runtime in its own process; median of {args.rounds} rounds x {args.runs} calls")
    everything = []
    for spec in args.cases:
        case, _, batch = spec.partition(":")
        with tempfile.TemporaryDirectory() as tmp:
            built = build_all(case, int(batch or 1), labels, Path(tmp), say)
            good = [label for label in labels if not built[label].startswith("failed")]
            summary = measure(case, int(batch or 1), good, Path(tmp), args.runs, args.rounds, say)
        print(table(case, int(batch or 1), summary, built), flush=True)
        everything.append({"case": case, "batch": int(batch or 1), "built": built, "results": summary})
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "versions": versions(), "cases": everything}, indent=2))
    return 0


def versions() -> str:
    import importlib.metadata as metadata

    found = []
    for package in ("torch", "onnxruntime", "openvino", "nncf", "transformers"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return ", ".join(found)


if __name__ == "__main__":
    sys.exit(main())
