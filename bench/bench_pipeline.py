"""Pipeline throughput: a 2-stage partition over 2 ranks (1 thread each, `torchrun`) vs the whole
model in one process with 1 and with 2 threads, on this machine.

    python bench/bench_pipeline.py [--model resnet18] [--batch 16] [--microbatches 8] [--runs 10]

The model is compiled once (torch backend, cleanup + fold_batchnorm) and partitioned with
balance=latency. Throughput is samples/s over `--runs` pipeline runs of the whole batch, timed on
the last rank between barriers; the single-process figures time the whole artifact on the same
batch. Stage balance is each rank's measured time running its stage (waits excluded): the slowest
stage over the mean.
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
from pathlib import Path

import torch

import torchkiln
from torchkiln import models
from torchkiln.driver.benchmark import machine_line

WORKER = """
import json, sys, time, torch, torch.distributed as dist
from torchkiln import models
from torchkiln.workflows.pipeline import join_group, run_pipeline
directory, model, batch, microbatches, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(1)
rank, world = join_group()
inputs = models.get(model).example_inputs(batch=batch, seed=1) if rank == 0 else None
run_pipeline(directory, inputs, microbatches)  # warm-up
walls, stage = [], []
for _ in range(runs):
    dist.barrier()
    start = time.perf_counter()
    run_pipeline(directory, inputs, microbatches, stage_seconds=stage)
    dist.barrier()
    walls.append(time.perf_counter() - start)
seconds = torch.tensor([sum(stage) / runs])
gathered = [torch.zeros(1) for _ in range(world)]
dist.all_gather(gathered, seconds)
if rank == world - 1:
    print(json.dumps({"wall_s": sorted(walls)[len(walls) // 2], "stage_s": [float(g) for g in gathered]}))
dist.destroy_process_group()
"""


def single_process(model: torch.nn.Module, inputs: dict[str, torch.Tensor], threads: int, runs: int) -> float:
    compiled = torchkiln.compile(model, inputs, backend="torch", dynamic_axes="batch", latency_runs=0)
    torch.set_num_threads(threads)
    with torch.no_grad():
        compiled(**inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            compiled(**inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(machine_line())
    entry = models.get(args.model)
    model, inputs = entry.build(), entry.example_inputs(batch=args.batch, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        part = torchkiln.partition(model, entry.example_inputs(batch=2), stages=2, balance="latency")
        print(part.table())
        directory = part.save(Path(tmp) / "part")
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                   str(directory), args.model, str(args.batch), str(args.microbatches), str(args.runs)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
    one = single_process(model, inputs, 1, args.runs)
    two = single_process(model, inputs, threads, args.runs)
    pipe = result["wall_s"]
    stages = result["stage_s"]
    balance = max(stages) / statistics.mean(stages)
    print(f"{args.model} batch {args.batch}, {args.microbatches} micro-batches, medians of {args.runs} runs")
    print(f"  whole model, 1 thread : {args.batch / one:8.1f} samples/s")
    print(f"  whole model, {threads} threads: {args.batch / two:8.1f} samples/s")
    print(f"  pipeline 2 ranks x 1 thread: {args.batch / pipe:8.1f} samples/s "
          f"({one / pipe:.2f}x the 1-thread process, {two / pipe:.2f}x the {threads}-thread one)")  # fmt: skip
    print(f"  stage time per run: {', '.join(f'{s * 1e3:.1f} ms' for s in stages)}; slowest / mean {balance:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
