"""``kiln build RECIPE [-o DIR]``: build the artifact a ``kiln.toml`` recipe describes, check its gates.

Writes, atomically into DIR (default: build/ next to the recipe): the backend files, manifest.json
(file hashes, tool versions, specs, the recipe, hashes of what was read, the evaluation and gate
results), report.json, report.md and accuracy.png (accuracy vs size and latency, with matplotlib and
an [evaluation]). When the build fails or a gate is missed, DIR is left as it was and the exit code
is 1 (2 for a malformed recipe). Stages are cached: an unchanged rebuild reuses the artifact; the
report's cache line says which stages were hits. Python: torchkiln.build("kiln.toml").
"""

from __future__ import annotations

import argparse
import json
import sys

from torchkiln.cli.common import stage_printer
from torchkiln.compiler.report import WIDTH
from torchkiln.workflows.build import build


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "build", help="build the artifact a kiln.toml recipe describes", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("recipe", metavar="RECIPE", help="path to kiln.toml")
    parser.add_argument("-o", "--output", help="output directory (default: build/ next to the recipe)")
    parser.add_argument(
        "--cache-dir", help="stage cache directory (default: $TORCHKILN_CACHE_DIR or ~/.cache/torchkiln)"
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the stage cache")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--verbose", action="store_true",
                        help="the report's lines in full (default: cut to 120 columns; --json has everything)")  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = build(args.recipe, args.output, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                   progress=stage_printer(args.quiet))  # fmt: skip
    if result.output is None or args.quiet:  # a torchrun rank other than 0 wrote nothing
        return 0
    print(json.dumps(result.report, indent=2, default=str) if args.json else result.summary(width=None if args.verbose else WIDTH))
    print(f"kiln: wrote {result.output}", file=sys.stderr)
    return 0
