"""``kiln tune RECIPE``: search the recipe's ``[tune]`` space with Optuna (see :mod:`torchkiln.workflows.tuning`)."""

from __future__ import annotations

import argparse
import sys

from torchkiln.cli.common import stage_printer
from torchkiln.errors import ConfigError
from torchkiln.workflows import tuning
from torchkiln.workflows.recipe import load_recipe
from torchkiln.workflows.tune import tune


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tune", help="search a recipe's [tune] space for the best artifact (Optuna)",
                            description=tuning.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("recipe", metavar="RECIPE", help="path to kiln.toml with a [tune] table")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite tune.db next to the recipe); "
                        "workers on several machines share one RDB URL")  # fmt: skip
    parser.add_argument("-o", "--output", help="output directory (default: tune/ next to the recipe)")
    parser.add_argument("--trials", type=int, help="the budget (default: [tune] trials; the study is the same)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="start no trial after this long (default: no limit)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="local worker processes on the study (default: 1)")
    parser.add_argument("--grace-period", type=int, default=30, metavar="SECONDS",
                        help="a running trial without a heartbeat for this long is a killed worker's: failed, "
                        "not counted, redone (default: 30)")  # fmt: skip
    parser.add_argument("--cache-dir", help="stage cache directory (default: $TORCHKILN_CACHE_DIR or ~/.cache/torchkiln)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the stage cache")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--trials", args.trials), ("--workers", args.workers), ("--grace-period", args.grace_period)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}", where=flag)
    recipe = load_recipe(args.recipe)
    result = tune(recipe, args.output, storage=args.storage, trials=args.trials, timeout=args.timeout,
                  workers=args.workers, grace_period=args.grace_period, cache_dir=args.cache_dir,
                  use_cache=not args.no_cache, progress=stage_printer(args.quiet))  # fmt: skip
    if not args.quiet:
        print(f"kiln tune: {result.summary(tuning.settings(recipe).objectives)}")
        print(f"kiln: wrote {result.output}", file=sys.stderr)
    for k, status in result.failed_workers.items():
        print(f"kiln tune: error: worker {k} exited with status {status} (its lines above say why)", file=sys.stderr)
    return 1 if result.failed_workers or result.best is None else 0
