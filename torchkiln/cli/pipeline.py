"""``kiln pipeline PARTITION --inputs IN.npz -o OUT.npz``: run a partition's stages as a pipeline,
rank r of a ``torchrun`` group running stage r.

    torchrun --nproc-per-node 2 -m torchkiln.cli pipeline DIR --inputs data.npz --microbatches 4 -o out.npz

Rank 0 reads the inputs (``.npz``, one array per model input, batch first) and cuts them into
micro-batches; the last rank writes the outputs (``output_0``, ``output_1``, ... in ``-o``,
atomically). Each rank prints progress on stderr prefixed ``[rank r]``; a rank that fails prints
``[rank r] error: ...`` and exits 1 (2 for a bad argument or input), and torchrun stops the others.
Several machines: ``torchrun --nnodes M --node-rank i --rdzv-endpoint HOST:PORT -m torchkiln.cli
pipeline ...``. Python: torchkiln.workflows.pipeline.pipeline (run_pipeline on tensors).
"""

from __future__ import annotations

import argparse
import os
import sys

from torchkiln.errors import ConfigError, InputError, KilnError
from torchkiln.workflows.pipeline import DEFAULT_MAX_INPUT_MB, DEFAULT_TIMEOUT_S, pipeline


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "pipeline", help="run a partition (kiln partition) as a pipeline: one stage per torchrun rank",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("directory", metavar="PARTITION", help="a partition written by kiln partition / Partition.save")
    parser.add_argument("--inputs", required=True, help=".npz with one array per model input (read on rank 0)")
    parser.add_argument("--microbatches", type=int, default=4, help="micro-batches the batch is cut into (default: 4)")
    parser.add_argument("-o", "--output", required=True, help=".npz the last rank writes")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: torch's)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds any collective may wait (default: {DEFAULT_TIMEOUT_S})")  # fmt: skip
    parser.add_argument("--max-input-mb", type=float, default=DEFAULT_MAX_INPUT_MB,
                        help=f"refuse --inputs whose arrays declare more than this (default: {DEFAULT_MAX_INPUT_MB})")  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Every line names the rank (all ranks share the terminal); so does the error, which is this
    rank's and printed here rather than by ``kiln``'s handler."""
    rank = os.environ.get("RANK", "0")

    def say(line: str) -> None:
        print(f"[rank {rank}] {line}", file=sys.stderr, flush=True)

    try:
        pipeline(args.directory, args.inputs, args.output, microbatches=args.microbatches, threads=args.threads,
                 timeout_s=args.timeout, max_input_mb=args.max_input_mb, say=say)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any failure ends this rank with its error, prefixed
        if args.debug:
            raise
        say(f"error: {exc.message if isinstance(exc, KilnError) else f'{type(exc).__name__}: {exc}'}")
        return 2 if isinstance(exc, (ConfigError, InputError)) else 1
    return 0
