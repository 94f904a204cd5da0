"""``kiln bench MODEL_OR_ARTIFACT``: latency of a model's runtimes side by side, in one process.

For a MODEL (zoo name, file.py:factory): eager PyTorch, torch.compile, ONNX Runtime fp32 and int8,
OpenVINO fp32 and int8 (when torchkiln[openvino] is installed), each at every --batch-sizes; with a
CUDA GPU also eager on CUDA, the torch backend in fp16 with CUDA graphs and TensorRT fp16 / int8
engines (a runtime that cannot be built is a line saying why). For an ARTIFACT directory: the
artifact (and eager, with --model). Per runtime and batch size: p50/p90/p99 latency (ms),
throughput at p50, peak memory growth while built, file size, and p50 relative to eager, timed in
alternating blocks so the ratios are fair when the machine drifts. Python: torchkiln.bench_model /
torchkiln.bench_artifact (torchkiln.workflows.bench).
"""

from __future__ import annotations

import argparse
import json

from torchkiln.cli.common import (
    add_model_arguments,
    add_native_code_argument,
    calibration_batches,
    example_inputs,
    stage_printer,
)
from torchkiln.compiler.files import names_existing
from torchkiln.errors import ConfigError
from torchkiln.workflows.bench import (
    MODEL_RUNTIMES,
    ON_REQUEST,
    PROMPT_LENGTH,
    bench_artifact,
    bench_model,
    needs_calibration,
    wanted_runtimes,
)
from torchkiln.workflows.loading import load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="latency of a model's runtimes (or an artifact) side by side",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_model_arguments(parser)
    parser.add_argument(
        "--model", dest="eager_model", metavar="MODEL", help="with an ARTIFACT: also time this eager model (default: none)"
    )
    parser.add_argument(
        "--runtimes",
        help=f"for a MODEL, any of {','.join(MODEL_RUNTIMES)} (default: the CPU ones, plus the GPU ones with CUDA; "
        f"{', '.join(ON_REQUEST)} only when named: each compiles C++ for up to a minute)",
    )
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default: 1)")
    parser.add_argument(
        "--runs", type=int, default=100, help="timed calls per runtime and batch size (default: 100)"
    )
    parser.add_argument(
        "--calibration", metavar="SOURCE",
        help="int8 calibration: FILE.pt / FILE.npz / random:N (default: random:8, fine for latency only)",
    )  # fmt: skip
    parser.add_argument("--prompt-length", type=int, default=PROMPT_LENGTH,
                        help=f"with a causal LM artifact compiled with its cache: the prompt of the prefill row; the "
                        f"decode row is one token after it (default: {PROMPT_LENGTH})")  # fmt: skip
    parser.add_argument("--plot", metavar="FILE.png", help="write throughput over batch sizes as a PNG (default: none)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_native_code_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    sizes = _batch_sizes(args.batch_sizes)
    common = {"batch_sizes": sizes, "runs": args.runs, "plot": args.plot, "progress": stage_printer(args.quiet)}
    if names_existing(args.model, "dir"):  # a directory is an artifact; load() says what is wrong with it
        eager = load_model(args.eager_model)[0] if args.eager_model else None
        result = bench_artifact(args.model, eager_model=eager, eager_name=f"--model {args.eager_model}", seed=args.seed,
                                allow_native_code=args.allow_native_code, prompt_length=args.prompt_length, **common)  # fmt: skip
    else:
        wanted = wanted_runtimes(args.runtimes)
        model, entry = load_model(args.model)
        example = example_inputs(args, entry)
        # Read up front: a bad --calibration is the user's error (exit 2), not a runtime that failed to build.
        source = args.calibration or "random:8"
        calibration = (calibration_batches(argparse.Namespace(**{**vars(args), "calibration": source}), entry, example)
                       if needs_calibration(wanted) else None)  # fmt: skip
        result = bench_model(model, example, runtimes=args.runtimes, calibration=calibration, **common)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise ConfigError(f"bad --batch-sizes '{text}'", where="--batch-sizes", hint="write e.g. 1,8,32")
    return sizes
