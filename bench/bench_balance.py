"""Stage balance of ``torchkiln.partition(balance="latency")`` on ResNet-18, BERT-base and a
Llama-style decoder, 2 and 3 stages, three runs each.

Each model is compiled once (torch backend; export frontend for the transformers models, dynamic
batch) and partitioned three times per stage count. The figure reported is the partition's own
``balance_ratio``: each compiled stage timed on its example inputs (median of 15 runs after 2
warm-up runs), slowest over mean — the measurement, not the prediction the cuts were chosen by.
Stages run with one thread each, as a pipeline rank does (``--threads``). Goal: <= 1.25.

    python bench/bench_balance.py [--models resnet18 bert-base llama] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import torchkiln
from torchkiln import models
from torchkiln.driver.benchmark import machine_line


def resnet18() -> tuple[torch.nn.Module, dict[str, torch.Tensor], str, Any]:
    entry = models.get("resnet18")
    return entry.build(), entry.example_inputs(batch=1), "auto", ("cleanup", "fold_batchnorm")


def bert_base() -> tuple[torch.nn.Module, dict[str, torch.Tensor], str, Any]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()  # bert-base-uncased's shapes: 12 layers, 768 wide, 110M parameters
    ids = torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "export", ("cleanup",)


def llama() -> tuple[torch.nn.Module, dict[str, torch.Tensor], str, Any]:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, use_cache=False)  # fmt: skip
    ids = torch.randint(0, 8000, (1, 128), generator=torch.Generator().manual_seed(0))
    return LlamaModel(config).eval(), {"input_ids": ids}, "export", ("cleanup",)


MODELS = {"resnet18": resnet18, "bert-base": bert_base, "llama": llama}


def bench(name: str, runs: int) -> dict[str, Any]:
    model, inputs, frontend, passes = MODELS[name]()
    started = time.perf_counter()
    whole = torchkiln.compile(model, inputs, passes=passes, backend="torch", dynamic_axes="batch", frontend=frontend,
                              latency_runs=0)  # fmt: skip
    print(f"[{name}] compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    result: dict[str, Any] = {"model": name, "stages": {}}
    for stages in (2, 3):
        ratios, stage_ms = [], []
        for run in range(runs):
            started = time.perf_counter()
            part = torchkiln.partition(whole, inputs, stages=stages, balance="latency")
            ratios.append(part.balance_ratio)
            stage_ms.append([r.measured_ms for r in part.records])
            print(f"[{name}] {stages} stages, run {run + 1}: {time.perf_counter() - started:.0f} s\n{part.table()}",
                  file=sys.stderr)  # fmt: skip
        result["stages"][stages] = {"ratios": ratios, "stage_ms": stage_ms}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    results = [bench(name, args.runs) for name in args.models]
    print("\n| model | stages | slowest / mean stage time, run 1 / 2 / 3 | worst |")
    print("|---|---|---|---|")
    for result in results:
        for stages, row in result["stages"].items():
            ratios = " / ".join(f"{r:.2f}" for r in row["ratios"])
            print(f"| {result['model']} | {stages} | {ratios} | {max(row['ratios']):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
