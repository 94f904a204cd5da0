"""``kiln tune RECIPE``: search the recipe's ``[tune]`` space with Optuna (see :mod:`torchkiln.tuning`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from torchkiln import tuning
from torchkiln.cli.build import build_and_check, prepare
from torchkiln.cli.common import stage_printer
from torchkiln.compiler.files import atomic_directory, check_destination
from torchkiln.driver.cache import default_directory
from torchkiln.recipe import Recipe, load_recipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tune", help="search a recipe's [tune] space for the best artifact (Optuna)",
                            description=tuning.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("recipe", metavar="RECIPE", help="path to kiln.toml with a [tune] table")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite tune.db next to the recipe); "
                        "workers on several machines share one RDB URL")  # fmt: skip
    parser.add_argument("-o", "--output", help="output directory (default: tune/ next to the recipe)")
    parser.add_argument("--cache-dir", help="stage cache directory")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the stage cache")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.set_defaults(run=run)


def is_tune_directory(path: Path) -> bool:
    return (path / "trials.json").is_file()


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    tune = tuning.settings(recipe)
    output = Path(args.output) if args.output else recipe.path.parent / "tune"
    check_destination(output, replaceable=is_tune_directory)
    say = stage_printer(args.quiet) or (lambda _: None)
    model, inputs, axes, calibration = prepare(recipe)
    cache = None if args.no_cache else (args.cache_dir or default_directory())

    def evaluate(candidate: Recipe) -> dict[str, Any]:
        compiled, evaluation, gates = build_and_check(candidate, model, inputs, axes, calibration, cache, None)
        artifact = compiled.report.artifact
        return {"accuracy_drop": evaluation.get("drop", math.nan), "latency_ms": artifact.artifact_ms,
                "size_mb": (artifact.file_bytes or 0) / 1e6, "backend": compiled.backend,
                "constraints": {g["gate"]: g["value"] - g["limit"] for g in gates}}  # fmt: skip

    study = tuning.run_study(recipe, tune, tuning.storage_url(recipe, args.storage), evaluate, say)
    table = tuning.rows(study, tune)
    chosen = tuning.best(study, tune, table)
    with atomic_directory(output, replaceable=is_tune_directory) as staging:
        (staging / "trials.json").write_text(json.dumps(table, indent=2) + "\n")
        (staging / "trials.csv").write_text(tuning.csv_text(table))
        if chosen is not None:
            best = tuning.variant(recipe, chosen["params"])
            (staging / "best.toml").write_text(tuning.toml_text(tuning.relocated(best.raw, recipe.path.parent, output)))
        _plot(staging / "pareto.png", table, tune)
    if not args.quiet:
        done = [r for r in table if r["state"] == "COMPLETE"]
        print(f"kiln tune: {len(done)} complete trial(s) of {len(table)}; "
              + (f"best #{chosen['number']}: " + ", ".join(f"{o} {chosen[o]:.4g}" for o in tune.objectives)
                 + f" {json.dumps(chosen['params'], sort_keys=True)}" if chosen else "no feasible trial (see trials.csv)"))  # fmt: skip
        print(f"kiln: wrote {output}", file=sys.stderr)
    return 0 if chosen is not None else 1


def _plot(path: Path, table: list[dict[str, Any]], tune: tuning.TuneSettings) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    done = [r for r in table if r["state"] == "COMPLETE"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, other in zip(axes, ("latency_ms", "size_mb")):
        for feasible, marker in ((True, "o"), (False, "x")):
            points = [r for r in done if r["feasible"] is feasible]
            ax.scatter([r[other] for r in points], [r["accuracy_drop"] for r in points], marker=marker,
                       label="feasible" if feasible else "misses a gate")  # fmt: skip
        ax.set_xlabel(other)
        ax.set_ylabel("accuracy drop (points)")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(figure)
