"""The pipeline runtime: rank r of a ``torchrun`` group runs stage r of a partition.

    torchrun --nproc-per-node 2 -m torchkiln.cli pipeline DIR --inputs data.npz --microbatches 4 -o out.npz

(``kiln pipeline`` parses the arguments; :func:`pipeline` is this rank's part, :func:`run_pipeline`
the same on a loaded partition and tensors.)

Rank 0 reads the inputs (``.npz``, one array per model input, batch first) and cuts them into
micro-batches along the batch axis; each rank runs its stage on a micro-batch and sends what the
next stage needs — the boundary tensors named in ``partition.json`` — with ``torch.distributed``
point-to-point (``isend``: a shape header, then the data), so while rank 1 works on micro-batch i,
rank 0 already computes i + 1 (a GPipe forward schedule). The last rank concatenates the outputs
in input order and writes them (``output_0``, ``output_1``, … in ``-o``, atomically).

What crosses between ranks is checked on both sides against the boundary schema ``partition.json``
binds (rank, dtype, every size but the batch's, a byte budget): the sender before sending, the
receiver from a fixed-size header before it allocates or receives data. A rank that fails — a
wrong tensor, its stage raising — sends an error header downstream instead, so every later rank
ends with a typed error naming the failed rank, not a transport abort or a hang. The ``.npz``
inputs must hold the partition's inputs with their dtypes and non-batch sizes; their declared sizes
are checked against ``--max-input-mb`` before any array is read into memory.

Process group: gloo on CPU, NCCL when every rank has a CUDA device (each rank then uses its local
device, ``LOCAL_RANK``); every collective has ``--timeout`` seconds. Progress lines go to stderr
prefixed ``[rank r]``; a rank that fails prints ``[rank r] error: …`` and exits 1, and ``torchrun``
stops the others. Several machines: ``torchrun --nnodes M --node-rank i --rdzv-endpoint HOST:PORT``.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from torchkiln.compiler import arguments
from torchkiln.compiler.files import atomic_file, check_file_destination, mark_npz
from torchkiln.compiler.program import dtype_from_name, dtype_name
from torchkiln.driver.partition import Boundary, Partition, load_partition
from torchkiln.errors import ConfigError, InputError, PipelineError

DEFAULT_TIMEOUT_S = 300
MAX_RANK = 8  # a header holds [status, ndim, size_0 .. size_7]
HEADER = 2 + MAX_RANK
OK, FAILED = 0, 1
MAX_BOUNDARY_BYTES = 1 << 32  # what one received tensor may allocate
DEFAULT_MAX_INPUT_MB = 4096


def join_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """(rank, world size), joining the torchrun group (gloo, or NCCL with a GPU per rank)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ConfigError("the pipeline runs under torchrun (RANK / WORLD_SIZE are not set)",
                              hint="torchrun --nproc-per-node N -m torchkiln.cli pipeline DIR ...")  # fmt: skip
        gpu = torch.cuda.is_available() and torch.cuda.device_count() > int(os.environ.get("LOCAL_RANK", 0))
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def run_pipeline(
    directory: str | os.PathLike[str] | Partition,
    inputs: Mapping[str, torch.Tensor] | None,
    microbatches: int,
    say: Callable[[str], None] = lambda _: None,
    stage_seconds: list[float] | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """This rank's part of the pipeline; the outputs (concatenated, in input order) on the last
    rank, None on the others. ``inputs`` are read on rank 0 only. ``stage_seconds`` receives the
    time this rank spent running its stage (not waiting), for balance measurements. ``directory``
    may be a partition already loaded for this rank's stage."""
    rank, world = join_group()
    if microbatches < 1:
        raise ConfigError(f"microbatches must be >= 1, got {microbatches}", where="--microbatches")
    part = directory if isinstance(directory, Partition) else load_partition(directory, stages=[rank])
    if len(part.records) != world:
        raise ConfigError(f"{directory} has {len(part.records)} stages, but {world} ranks were started",
                          hint=f"torchrun --nproc-per-node {len(part.records)} (or the same number across nodes)")  # fmt: skip
    stage, record = part.stages[rank], part.records[rank]
    assert stage is not None
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    chunks = _microbatches(inputs, record.inputs, microbatches) if rank == 0 else [None] * microbatches
    pending: list[tuple[Any, torch.Tensor]] = []
    outputs = []
    for index, chunk in enumerate(chunks):
        try:
            values = chunk if rank == 0 else _receive(rank - 1, part.records[rank - 1].boundary, device)
            assert values is not None
            start = time.perf_counter()
            result = [t for t in pytree.tree_leaves(stage(**values)) if isinstance(t, torch.Tensor)]
            if stage_seconds is not None:
                stage_seconds.append(time.perf_counter() - start)
            if rank < world - 1:
                pending += _send(rank + 1, result, record.boundary, device)
        except Exception:
            if rank < world - 1:  # tell the next rank, which would otherwise wait for data that never comes
                _send_failure(rank + 1, device)
            raise
        if rank == world - 1:
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


def check_boundary(spec: Boundary, ndim: int, sizes: list[int], dtype: str, side: str) -> None:
    """A tensor crossing a cut must be what ``partition.json`` binds: the rank, the dtype, every size
    but the batch's, and within :data:`MAX_BOUNDARY_BYTES`."""
    wanted = f"{spec.dtype}[batch, {', '.join(map(str, spec.shape[1:]))}]"
    fits = ndim == len(spec.shape) and dtype == spec.dtype and sizes[1:] == spec.shape[1:] and sizes[0] >= 0
    if not fits:
        raise PipelineError(f"boundary tensor '{spec.name}' {side} is {dtype}{sizes}; the partition binds {wanted}",
                            where=spec.name, hint="rebuild the partition, and give inputs of the sizes it was built for")  # fmt: skip
    if math.prod(sizes) * dtype_from_name(dtype).itemsize > MAX_BOUNDARY_BYTES:
        raise PipelineError(f"boundary tensor '{spec.name}' {side} would take over {MAX_BOUNDARY_BYTES >> 30} GiB",
                            where=spec.name, hint="use more micro-batches")  # fmt: skip


def _send(
    destination: int, tensors: list[torch.Tensor], boundary: list[Boundary], device: torch.device
) -> list[tuple[Any, torch.Tensor]]:
    """Check every tensor against the schema, then start sending; each (work, tensor) pair keeps its
    tensor alive until ``work.wait()``."""
    if len(tensors) != len(boundary):
        raise PipelineError(f"the stage returned {len(tensors)} tensors; the partition binds {len(boundary)}",
                            hint="rebuild the partition")  # fmt: skip
    for tensor, spec in zip(tensors, boundary):
        check_boundary(spec, tensor.dim(), list(tensor.shape), dtype_name(tensor.dtype), "to send")
    works = []
    for tensor in tensors:
        data = tensor.detach().to(device).contiguous()
        header = torch.tensor([OK, data.dim(), *data.shape, *[0] * (MAX_RANK - data.dim())], dtype=torch.int64, device=device)
        works += [(dist.isend(header, destination), header), (dist.isend(data, destination), data)]
    return works


def _send_failure(destination: int, device: torch.device) -> None:
    """An error header in place of the next tensor: the receiving rank stops with a typed error."""
    header = torch.tensor([FAILED] + [0] * (HEADER - 1), dtype=torch.int64, device=device)
    try:
        dist.send(header, destination)
    except Exception:  # noqa: BLE001 - the peer may be gone already; the original error is what counts
        pass


def _receive(source: int, boundary: list[Boundary], device: torch.device) -> dict[str, torch.Tensor]:
    values = {}
    for spec in boundary:
        header = torch.empty(HEADER, dtype=torch.int64, device=device)
        dist.recv(header, source)
        status, ndim, *sizes = header.tolist()
        if status != OK:
            raise PipelineError(f"rank {source} failed (its error is above); nothing more to compute",
                                where=f"rank {source}")  # fmt: skip
        if not 0 < ndim <= MAX_RANK:
            raise PipelineError(f"rank {source} sent a header of rank {ndim} for '{spec.name}'", where=spec.name)
        check_boundary(spec, ndim, sizes[:ndim], spec.dtype, f"from rank {source}")
        data = torch.empty(tuple(sizes[:ndim]), dtype=dtype_from_name(spec.dtype), device=device)
        dist.recv(data, source)
        values[spec.name] = data if device.type == "cpu" else data.cpu()
    return values


def pipeline(
    directory: str | os.PathLike[str],
    inputs: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    microbatches: int = 4,
    threads: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_input_mb: float = DEFAULT_MAX_INPUT_MB,
    say: Callable[[str], None] = lambda _: None,
) -> Path | None:
    """This rank's part of running the partition ``directory`` on the ``.npz`` ``inputs`` (read on rank
    0), the last rank writing the outputs to ``output`` (``kiln pipeline`` under ``torchrun``); returns
    ``output`` on the last rank, None on the others. Every argument is checked on every rank before
    the group is joined, so all ranks stop alike; the group is left on return and on error."""
    arguments.path("directory", directory)
    arguments.path("inputs", inputs)
    arguments.integer("--microbatches", microbatches, high=1 << 20)
    threads = arguments.integer("--threads", threads, high=1 << 12) if threads is not None else None
    timeout_s = arguments.real("--timeout", timeout_s, unit="of seconds")
    max_input_mb = arguments.real("--max-input-mb", max_input_mb)
    check_file_destination(arguments.path("output", output), "npz", reads=[("--inputs", inputs)])
    try:
        rank, _ = join_group(timeout_s)
        if threads is not None:  # this rank's process only: set once it is one
            torch.set_num_threads(threads)
        part = load_partition(directory, stages=[rank])
        stage = part.stages[rank] if rank < len(part.stages) else None
        values = _read_inputs(Path(inputs), stage.inputs, max_input_mb) if rank == 0 and stage else None
        outputs = run_pipeline(part, values, microbatches, say)
        if outputs is None:
            return None
        _write_outputs(Path(output), outputs)
        say(f"wrote {output}")
        return Path(output)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _read_inputs(path: Path, inputs: list[Any], max_mb: float) -> dict[str, torch.Tensor]:
    """The ``.npz`` arrays named like the partition's inputs: members, dtypes and non-batch sizes
    checked against the first stage's specs, and declared sizes against ``max_mb``, before reading."""
    if path.suffix != ".npz":
        raise InputError(f"{path}: the pipeline reads .npz inputs", where=str(path), hint="np.savez(path, name=array, ...)")
    specs = {s.name: s for s in inputs}
    try:
        with np.load(path, allow_pickle=False) as data:
            headers = {k: _npz_header(data, k) for k in data.files}
            _check_inputs(headers, specs, path, max_mb)
            return {k: torch.from_numpy(np.array(data[k])) for k in specs}
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}", where=str(path)) from exc


def _npz_header(data: Any, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """An array's shape and dtype from its ``.npy`` header, without reading its data."""
    with data.zip.open(f"{key}.npy") as member:
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        version = np.lib.format.read_magic(member)
        if version not in read:
            raise ValueError(f"array {key!r} has .npy format version {version}")
        shape, _, dtype = read[version](member)
    return tuple(shape), dtype


def _check_inputs(headers: dict[str, tuple[tuple[int, ...], np.dtype]], specs: dict[str, Any], path: Path, max_mb: float) -> None:
    missing = [n for n in specs if n not in headers]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}", where=str(path), hint=f"give arrays named {list(specs)}")
    total = 0
    for name, spec in specs.items():
        shape, dtype = headers[name]
        fits = len(shape) == len(spec.shape) and all(isinstance(w, str) or w == g for w, g in zip(spec.shape[1:], shape[1:]))
        if str(dtype) != spec.dtype or not fits:
            raise InputError(f"{path}: '{name}' is {dtype}{list(shape)}; the partition takes {spec.dtype}{spec.pretty_shape()}",
                             where=f"{path}:{name}")  # fmt: skip
        total += math.prod(shape) * dtype.itemsize
    if total > max_mb * 1e6:
        raise InputError(f"{path} declares {total / 1e6:.0f} MB of inputs, over --max-input-mb {max_mb:g}",
                         where=str(path), hint="raise --max-input-mb if the machine has the memory")  # fmt: skip


def _write_outputs(path: Path, outputs: tuple[torch.Tensor, ...]) -> None:
    with atomic_file(path, "npz") as partial:
        np.savez(partial, **mark_npz({f"output_{i}": o.numpy() for i, o in enumerate(outputs)}))


if __name__ == "__main__":  # the runtime's command moved to the kiln command line
    print("torchkiln.workflows.pipeline is a Python API; run the pipeline with "
          "torchrun --nproc-per-node N -m torchkiln.cli pipeline DIR --inputs IN.npz -o OUT.npz", file=sys.stderr)  # fmt: skip
    sys.exit(2)
