"""``kiln compare MODEL ARTIFACT``: run the eager model and a saved ONNX artifact on the same inputs,
compare every module's output, and name the first module whose output is over the tolerance (by
default the one the artifact was verified against, from its manifest: cosine >= 0.99 for int8).

The tool for "the exported model gives different answers". Exit code 0 when everything agrees,
1 when a module or an output is over the tolerance.
"""

from __future__ import annotations

import argparse
import json

from torchkiln.cli.common import (
    add_model_arguments,
    add_native_code_argument,
    example_inputs,
    tolerance_from_flags,
)
from torchkiln.compiler.verify import Tolerance
from torchkiln.driver.compiled import load
from torchkiln.errors import ConfigError
from torchkiln.workflows.compare import compare_artifact
from torchkiln.workflows.loading import load_model, load_weights


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compare", help="find the first module where an artifact differs from the eager model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_model_arguments(parser)
    parser.add_argument("artifact", metavar="ARTIFACT", help="directory written by kiln export / kiln build")
    parser.add_argument("--weights", help="state dict for MODEL, loaded with torch.load(weights_only=True) (default: "
                        "MODEL's own weights)")  # fmt: skip
    parser.add_argument("--atol", type=float,
                        help="absolute tolerance (default: the artifact's promise; fp32: 1e-5)")  # fmt: skip
    parser.add_argument("--rtol", type=float,
                        help="tolerance relative to each output's scale (default: the artifact's promise; fp32: 1e-4)")  # fmt: skip
    parser.add_argument("--min-cosine", type=float,
                        help="compare by cosine similarity instead (default: the artifact's promise; int8: 0.99)")  # fmt: skip
    parser.add_argument(
        "--no-optimize", action="store_true", help="run ONNX Runtime without graph optimizations"
    )
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    add_native_code_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, entry = load_model(args.model)
    if args.weights:
        load_weights(model, args.weights, args.weights)
    compiled = load(args.artifact, allow_native_code=args.allow_native_code)
    inputs = example_inputs(args, entry)
    comparison = compare_artifact(
        model.eval(), compiled, inputs, _tolerance(args), optimize=not args.no_optimize
    )
    if args.json:
        print(json.dumps(comparison.to_dict(), indent=2, default=str))
    else:
        print(comparison.table())
    return 0 if comparison.passed else 1


def _tolerance(args: argparse.Namespace) -> Tolerance | None:
    if args.min_cosine is not None:
        if args.atol is not None or args.rtol is not None:
            raise ConfigError("give either --min-cosine or --atol/--rtol", where="--min-cosine")
        return Tolerance(min_cosine=args.min_cosine)
    return tolerance_from_flags(args.atol, args.rtol)
