"""The short GPU bench of `make gpu-check`: ResNet-50 (224x224) and BERT-base (sequence 128) at
batch 1 and 32 — eager fp32 on CUDA, the torch backend in fp16 with CUDA graphs, Inductor CUDA in
bf16, and Inductor CUDA on the static int8 program (ResNet-50; its notes say whether integer
kernels ran) — timed side by side (interleaved, synchronized), error as cosine to eager fp32.

Each runtime is built once with a dynamic batch axis; a runtime that fails to build is a row with
its error. Writes JSON to the path given (``--json``); prints one line per row.

    PYTHONPATH=. python bench/gpu_bench.py --json $OUT/gpu-bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import torchkiln
from torchkiln import models
from torchkiln.driver.benchmark import interleaved_times, machine_line

BATCHES = (1, 32)


def resnet50() -> tuple[torch.nn.Module, Callable[[int, int], dict[str, torch.Tensor]]]:
    entry = models.get("resnet50")
    return entry.build(), lambda batch, seed: entry.example_inputs(batch, seed=seed)


def bert_base() -> tuple[torch.nn.Module, Callable[[int, int], dict[str, torch.Tensor]]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(), add_pooling_layer=False).eval()

    def inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, 30000, (batch, 128), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return model, inputs


def output(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    if isinstance(value, dict):
        return next(iter(value.values()))
    return output(value[0])


def runtimes(name: str, model: torch.nn.Module, make: Any) -> dict[str, Any]:
    """label -> callable(inputs on CPU) -> output, or -> the error string when it failed to build."""
    example = make(2, 0)
    gpu_model = copy.deepcopy(model).to("cuda")
    built: dict[str, Any] = {"eager-cuda-fp32": lambda x: gpu_model(**{k: v.cuda() for k, v in x.items()})}
    fp16 = torchkiln.Tolerance(min_cosine=0.999)
    plans: list[tuple[str, str, str, dict[str, Any], Any]] = [
        ("torch-cuda-fp16-graphs", "cleanup,fold_batchnorm", "torch",
         {"device": "cuda", "dtype": "float16", "cuda_graphs": True}, fp16),
        ("inductor-cuda-bf16", "cleanup,fold_batchnorm", "inductor", {"device": "cuda", "dtype": "bfloat16"}, fp16),
    ]  # fmt: skip
    if name == "resnet50":
        plans.append(("inductor-cuda-int8", "cleanup,fold_batchnorm,quantize", "inductor", {"device": "cuda"}, None))
    for label, passes, backend, options, tolerance in plans:
        start = time.perf_counter()
        print(f"  building {label}...", file=sys.stderr, flush=True)
        try:
            compiled = torchkiln.compile(
                model, example, passes=passes, backend=backend, backend_options=options, tolerance=tolerance,
                dynamic_axes="batch", latency_runs=0,
                calibration_data=[make(2, 10 + i) for i in range(8)] if "quantize" in passes else None,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot build is a row with its reason
            built[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            continue
        built[label] = compiled
        print(f"  {label}: {time.perf_counter() - start:.0f} s; notes: {compiled.report.artifact.notes}", file=sys.stderr)
    return built


def synchronized(run: Callable[[Any], Any], inputs: Any) -> Callable[[], Any]:
    def call() -> Any:
        out = run(inputs)
        torch.cuda.synchronize()
        return out

    return call


def bench(name: str, runs: int) -> list[dict[str, Any]]:
    model, make = resnet50() if name == "resnet50" else bert_base()
    model.eval()
    built = runtimes(name, model, make)
    rows = []
    for batch in BATCHES:
        inputs = make(batch, 100 + batch)
        with torch.no_grad():
            want = output(built["eager-cuda-fp32"](inputs)).float().cpu()
        live = {k: v for k, v in built.items() if not isinstance(v, str)}
        calls = {k: synchronized(v, inputs) for k, v in live.items()}
        for call in calls.values():
            call()  # CUDA graph capture / autotuning outside the timed blocks
        medians = {k: statistics.median(v) for k, v in interleaved_times(calls, runs).items()}
        for label, value in built.items():
            row: dict[str, Any] = {"model": name, "batch": batch, "runtime": label}
            if isinstance(value, str):
                row["error"] = value
            else:
                with torch.no_grad():
                    got = output(value(inputs)).float().cpu()
                row["ms"] = medians[label]
                row["speedup_vs_eager_fp32"] = medians["eager-cuda-fp32"] / medians[label]
                row["cosine"] = float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0))
                if hasattr(value, "report"):
                    row["notes"] = value.report.artifact.notes
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,bert")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 1
    env = {"machine": machine_line(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(env, flush=True)
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        rows += bench(name, args.runs)
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2))  # partial results survive a timeout
    return 0


if __name__ == "__main__":
    sys.exit(main())
