"""``kiln partition``: cut a model into pipeline stages, each its own artifact, for
``kiln pipeline`` under ``torchrun``."""

from __future__ import annotations

import argparse
import sys

from torchkiln.backends import BACKEND_NAMES
from torchkiln.cli.common import add_model_arguments, example_inputs, stage_printer
from torchkiln.compiler.arguments import integer
from torchkiln.compiler.files import check_destination
from torchkiln.driver.api import DEFAULT_PASSES
from torchkiln.driver.partition import partition
from torchkiln.workflows.loading import files_read, load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "partition",
        help="cut MODEL into pipeline stages (one artifact each) for kiln pipeline (torchrun -m torchkiln.cli pipeline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--stages", type=int, default=2, help="number of stages (= ranks of the pipeline) (default: 2)")
    parser.add_argument("--balance", choices=("latency", "memory", "params"), default="latency",
                        help="cost the cuts balance (default: latency, each node timed on the example inputs)")  # fmt: skip
    parser.add_argument("--passes", default=",".join(DEFAULT_PASSES), help=f"passes run before cutting (default: {','.join(DEFAULT_PASSES)})")
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="torch", help="backend of every stage (default: torch)")
    parser.add_argument("--batch", type=int, default=2, help="batch of the example inputs (default: 2)")
    parser.add_argument("-o", "--output", required=True, help="partition directory (partition.json + stage<k>/)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_destination(args.output, "partition", files_read(args.model))  # before the work, not after it
    model, entry = load_model(args.model)
    inputs = example_inputs(args, entry)
    if entry is not None and not args.input:
        inputs = entry.example_inputs(batch=integer("--batch", args.batch, high=1 << 20), seed=args.seed)
    result = partition(model, inputs, stages=args.stages, balance=args.balance, backend=args.backend,
                       passes=args.passes, progress=stage_printer(args.quiet))  # fmt: skip
    result.save(args.output)
    if not args.quiet:
        print(result.table())
        print(f"kiln: wrote {args.output}", file=sys.stderr)
    return 0
