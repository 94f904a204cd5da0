"""The pipeline runtime: rank r of a ``torchrun`` group runs stage r of a partition.

    torchrun --nproc-per-node 2 -m torchkiln.pipeline DIR --inputs data.npz --microbatches 4 -o out.npz

Rank 0 reads the inputs (``.npz``, one array per model input, batch first) and cuts them into
micro-batches along the batch axis; each rank runs its stage on a micro-batch and sends what the
next stage needs — the boundary tensors named in ``partition.json`` — with ``torch.distributed``
point-to-point (``isend``: a shape header, then the data), so while rank 1 works on micro-batch i,
rank 0 already computes i + 1 (a GPipe forward schedule). The last rank concatenates the outputs
in input order and writes them (``output_0``, ``output_1``, … in ``-o``, atomically).

Process group: gloo on CPU, NCCL when every rank has a CUDA device (each rank then uses its local
device, ``LOCAL_RANK``); every collective has ``--timeout`` seconds. Progress lines go to stderr
prefixed ``[rank r]``; a rank that fails prints ``[rank r] error: …`` and exits 1, and ``torchrun``
stops the others. Several machines: ``torchrun --nnodes M --node-rank i --rdzv-endpoint HOST:PORT``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from torchkiln.compiler.program import dtype_from_name
from torchkiln.driver.partition import Boundary, load_partition
from torchkiln.errors import ConfigError, KilnError

DEFAULT_TIMEOUT_S = 300


def join_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """(rank, world size), joining the torchrun group (gloo, or NCCL with a GPU per rank)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ConfigError("the pipeline runs under torchrun (RANK / WORLD_SIZE are not set)",
                              hint="torchrun --nproc-per-node N -m torchkiln.pipeline DIR ...")  # fmt: skip
        gpu = torch.cuda.is_available() and torch.cuda.device_count() > int(os.environ.get("LOCAL_RANK", 0))
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def run_pipeline(
    directory: str | os.PathLike[str],
    inputs: Mapping[str, torch.Tensor] | None,
    microbatches: int,
    say: Callable[[str], None] = lambda _: None,
    stage_seconds: list[float] | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """This rank's part of the pipeline; the outputs (concatenated, in input order) on the last
    rank, None on the others. ``inputs`` are read on rank 0 only. ``stage_seconds`` receives the
    time this rank spent running its stage (not waiting), for balance measurements."""
    rank, world = join_group()
    if microbatches < 1:
        raise ConfigError(f"microbatches must be >= 1, got {microbatches}", where="--microbatches")
    part = load_partition(directory, stages=[rank])
    if len(part.records) != world:
        raise ConfigError(f"{directory} has {len(part.records)} stages, but {world} ranks were started",
                          hint=f"torchrun --nproc-per-node {len(part.records)} (or the same number across nodes)")  # fmt: skip
    stage, record = part.stages[rank], part.records[rank]
    assert stage is not None
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    chunks = _microbatches(inputs, record.inputs, microbatches) if rank == 0 else [None] * microbatches
    pending, outputs = [], []
    for index, chunk in enumerate(chunks):
        values = chunk if rank == 0 else _receive(rank - 1, part.records[rank - 1].boundary, device)
        assert values is not None
        start = time.perf_counter()
        result = [t for t in pytree.tree_leaves(stage(**values)) if isinstance(t, torch.Tensor)]
        if stage_seconds is not None:
            stage_seconds.append(time.perf_counter() - start)
        if rank < world - 1:
            pending += _send(rank + 1, result, device)
        else:
            outputs.append(result)
        say(f"micro-batch {index + 1}/{microbatches}")
    for work, _ in pending:
        work.wait()
    if rank < world - 1:
        return None
    return tuple(torch.cat([o[i].cpu() for o in outputs]) for i in range(len(outputs[0])))


def _microbatches(
    inputs: Mapping[str, torch.Tensor] | None, names: list[str], count: int
) -> list[dict[str, torch.Tensor]]:
    if inputs is None:
        raise ConfigError("rank 0 needs the inputs", where="--inputs")
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ConfigError(f"the inputs lack {', '.join(missing)}", where="--inputs", hint=f"give arrays named {names}")
    batch = inputs[names[0]].shape[0]
    if batch < count:
        raise ConfigError(f"{count} micro-batches of a batch of {batch}", where="--microbatches")
    split = {n: torch.tensor_split(inputs[n], count) for n in names}
    return [{n: split[n][i].contiguous() for n in names} for i in range(count)]


def _send(destination: int, tensors: list[torch.Tensor], device: torch.device) -> list[tuple[Any, torch.Tensor]]:
    """Start sending; each (work, tensor) pair keeps its tensor alive until ``work.wait()``."""
    works = []
    for tensor in tensors:
        data = tensor.detach().to(device).contiguous()
        shape = torch.tensor(data.shape, dtype=torch.int64, device=device)
        works += [(dist.isend(shape, destination), shape), (dist.isend(data, destination), data)]
    return works


def _receive(source: int, boundary: list[Boundary], device: torch.device) -> dict[str, torch.Tensor]:
    values = {}
    for spec in boundary:
        shape = torch.empty(len(spec.shape), dtype=torch.int64, device=device)
        dist.recv(shape, source)
        data = torch.empty(tuple(shape.tolist()), dtype=dtype_from_name(spec.dtype), device=device)
        dist.recv(data, source)
        values[spec.name] = data if device.type == "cpu" else data.cpu()
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchkiln.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("directory", help="a partition written by kiln partition / Partition.save")
    parser.add_argument("--inputs", required=True, help=".npz with one array per model input (read on rank 0)")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("-o", "--output", required=True, help=".npz the last rank writes")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: torch's)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds any collective may wait")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))

    def say(line: str) -> None:
        print(f"[rank {rank}] {line}", file=sys.stderr, flush=True)

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        join_group(args.timeout)
        inputs = _read_inputs(Path(args.inputs)) if rank == 0 else None
        outputs = run_pipeline(args.directory, inputs, args.microbatches, say)
        if outputs is not None:
            _write_outputs(Path(args.output), outputs)
            say(f"wrote {args.output}")
    except Exception as exc:  # noqa: BLE001 - any failure ends this rank with its error, prefixed
        say(f"error: {exc.message if isinstance(exc, KilnError) else f'{type(exc).__name__}: {exc}'}")
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _read_inputs(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", where=str(path)) from exc


def _write_outputs(path: Path, outputs: tuple[torch.Tensor, ...]) -> None:
    partial = path.with_name(path.name + ".partial.npz")
    arrays: dict[str, Any] = {f"output_{i}": o.numpy() for i, o in enumerate(outputs)}
    np.savez(partial, **arrays)
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
