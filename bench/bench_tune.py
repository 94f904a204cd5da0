"""``kiln tune`` against hand-written recipes, on a ResNet-style CNN and a transformer encoder.

Both models are trained on scikit-learn's digits (examples/digits/digits.py: ``resnet`` — basic
blocks (2, 2, 2), 175k parameters; ``encoder`` — a ViT-style encoder, 2x2 patches, 2 layers, dim
64, 69k parameters), so accuracy is real top-1 on the 450 held-out images. For each model:

* every **hand-written recipe** below (the single recipes README recommends) is built with
  ``kiln build`` — its accuracy drop, size and gate verdict come from that build (the bf16 one
  states ``[verify] min_cosine = 0.999``: a lossless pipeline is otherwise held to fp32);
* ``kiln tune`` searches from a hand-written recipe (``--trials``, default 16) with objectives
  latency and size and the recipe's gate (accuracy drop <= ``--max-drop``, default 0.5 points) as a
  constraint, then ``kiln build tune/best.toml`` builds the chosen recipe. Two cases (``--cases``):
  ``search`` starts from "prune 0.5 + distill 8 + static int8" and searches a space over all the
  hand-written recipes (passes dropped, ratios, modes, calibrators, backends); ``int8`` starts from
  "static int8 (percentile), ONNX Runtime" and searches its quantization mode, calibrator, backend
  and whether fold_batchnorm runs. The search starts from its recipe as written (warm start), so
  the goal is tuned / starting recipe <= 1.0x on latency and size at the same gate;
* every artifact, and eager, is then **timed side by side** in this process (the interleaved
  timer, batch 32 and batch 1): latency is only compared within one run. "best hand-written" is the
  fastest hand-written recipe that meets the gate in that timing.

The CPU's model and kernel flags are printed first: which recipe wins depends on them.

    python bench/bench_tune.py                                   # both models and cases, 16 trials
    python bench/bench_tune.py --models resnet --cases int8 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import torchkiln
from torchkiln.cli import main
from torchkiln.driver.benchmark import interleaved_times, machine_line
from torchkiln.workflows.tuning import toml_text

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"
CLEANUP = [{"name": "cleanup"}, {"name": "fold_batchnorm"}]
INT8 = {"name": "quantize", "options": {"calibrator": "percentile"}}
PRUNE = {"name": "prune", "options": {"structured": True, "ratio": 0.5}}
DISTILL = {"name": "distill", "options": {"epochs": 8, "lr": 0.003}}
HAND: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "fp32, ONNX Runtime": (CLEANUP, {"name": "onnxruntime"}),
    "static int8 (percentile), ONNX Runtime": ([*CLEANUP, INT8], {"name": "onnxruntime"}),
    "dynamic int8, ONNX Runtime": ([*CLEANUP, {"name": "quantize", "options": {"mode": "dynamic"}}], {"name": "onnxruntime"}),
    "static int8 (percentile), Inductor": ([*CLEANUP, INT8], {"name": "inductor"}),
    "bf16, Inductor": (CLEANUP, {"name": "inductor", "options": {"dtype": "bfloat16"}}),
    "prune 0.5 + distill 8 + static int8, ONNX Runtime": ([*CLEANUP, PRUNE, DISTILL, INT8], {"name": "onnxruntime"}),
}
SEARCH_SPACE = {
    "prune": "optional", "prune.ratio": [0.1, 0.7], "distill": "optional", "distill.epochs": [2, 12],
    "quantize": "optional", "quantize.mode": ["int8", "dynamic", "fp16"],
    "quantize.calibrator": ["minmax", "percentile", "entropy"], "backend": ["onnxruntime", "inductor"],
}  # fmt: skip
INT8_SPACE = {
    "fold_batchnorm": "optional", "quantize.mode": ["int8", "dynamic", "fp16"],
    "quantize.calibrator": ["minmax", "percentile", "entropy"], "backend": ["onnxruntime", "inductor"],
}  # fmt: skip
CASES = {  # the hand-written recipe a search starts from, and its space
    "search": ("prune 0.5 + distill 8 + static int8, ONNX Runtime", SEARCH_SPACE),
    "int8": ("static int8 (percentile), ONNX Runtime", INT8_SPACE),
}


def recipe(model: str, passes: list[dict[str, Any]], backend: dict[str, Any], max_drop: float) -> dict[str, Any]:
    return {
        "model": {"source": f"digits.py:{model}_architecture", "weights": f"{model}.pt",
                  "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "dynamic": {"0": "batch"}}]},
        "passes": passes, "calibration": {"source": "digits.py:calibration"},
        "training": {"source": "digits.py:training"},
        "evaluation": {"source": "digits.py:validation", "metric": "top1"}, "backend": backend,
        # a reduced-precision backend is lossy: it builds only under a promise the recipe states
        **({"verify": {"min_cosine": 0.999}} if backend.get("options", {}).get("dtype") else {}),
        "gate": {"max_accuracy_drop": max_drop},
    }  # fmt: skip


def build(path: Path, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = main(["build", str(path), "-o", str(out), "--no-cache", "--quiet"])
    if code != 0:  # a missed gate or a failed build: nothing written, the error says why
        return {"error": errors.getvalue().strip().splitlines()[-1][:200] if errors.getvalue().strip() else f"exit {code}"}
    report = json.loads((out / "report.json").read_text())
    return {"dir": str(out), "drop": report["evaluation"]["drop"], "top1": report["evaluation"]["artifact"],
            "eager_top1": report["evaluation"]["eager"], "size_mb": report["artifact"]["file_bytes"] / 1e6,
            "passed": all(g["passed"] for g in report["gates"]), "build_s": time.perf_counter() - started}  # fmt: skip


def bench_model(model: str, work: Path, trials: int, runs: int, max_drop: float, cases: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(work))
    import digits  # the example's module, copied into the work directory

    started = time.perf_counter()
    trained = getattr(digits, model)()
    torch.save(trained.state_dict(), work / f"{model}.pt")
    print(f"[{model}] trained in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    rows: dict[str, dict[str, Any]] = {}
    for index, (name, (passes, backend)) in enumerate(HAND.items()):
        path = work / f"{model}-hand{index}.toml"
        path.write_text(toml_text(recipe(model, passes, backend, max_drop)))
        rows[name] = {"kind": "hand-written", **build(path, work / f"{model}-hand{index}")}
        print(f"[{model}] built {name}: {rows[name]}", file=sys.stderr)
    searches = {}
    for case in cases:
        start, space = CASES[case]
        base = recipe(model, *HAND[start], max_drop)
        base["tune"] = {"trials": trials, "objectives": ["latency_ms", "size_mb"], "sampler": "tpe", "seed": 0,
                        "space": space}  # fmt: skip
        tuned = work / f"{model}-{case}-tune.toml"
        tuned.write_text(toml_text(base))
        started = time.perf_counter()
        code = main(["tune", str(tuned), "--no-cache", "-o", str(work / f"{model}-{case}-tune")])
        table = json.loads((work / f"{model}-{case}-tune" / "trials.json").read_text())
        states = {s: sum(t["state"] == s and t["same_as"] is None for t in table) for s in ("COMPLETE", "PRUNED", "FAIL")}
        searches[case] = {"start": start, "trials": trials, "seconds": time.perf_counter() - started, "states": states,
                          "repeats": sum(t["same_as"] is not None for t in table), "exit": code}  # fmt: skip
        if code == 0:
            best = work / f"{model}-{case}-tune" / "best.toml"
            rows[f"kiln tune best ({case})"] = {"kind": "tuned", "case": case,
                                                **build(best, work / f"{model}-{case}-tuned"), "recipe": best.read_text()}  # fmt: skip
    timed = {name: row for name, row in rows.items() if "dir" in row}
    latency = time_side_by_side(trained, timed, runs)
    for name, row in rows.items():
        row.update(latency.get(name, {}))
    feasible = [n for n, r in rows.items() if r["kind"] == "hand-written" and r.get("passed") and "ms_b32" in r]
    best_hand = min(feasible, key=lambda n: rows[n]["ms_b32"]) if feasible else None
    return {"model": model, "eager": latency["eager"], "rows": rows, "best_hand_written": best_hand,
            "searches": searches}  # fmt: skip


def time_side_by_side(eager: torch.nn.Module, rows: dict[str, dict[str, Any]], runs: int) -> dict[str, dict[str, float]]:
    import digits

    x = torch.cat([b[0] for b in digits.validation()])
    loaded = {name: torchkiln.load(row["dir"], allow_native_code=True) for name, row in rows.items()}
    out: dict[str, dict[str, float]] = {name: {} for name in ["eager", *loaded]}
    for batch in (32, 1):
        inputs = x[:batch]
        calls = {"eager": lambda i=inputs: eager(i), **{n: (lambda m=m, i=inputs: m(i)) for n, m in loaded.items()}}
        for name, times in interleaved_times(calls, runs).items():
            out[name][f"ms_b{batch}"] = statistics.median(times)
    return out


def print_table(result: dict[str, Any]) -> None:
    eager = result["eager"]
    print(f"\n{result['model']}: eager top-1 {next(iter(result['rows'].values())).get('eager_top1', float('nan')):.2f}, "
          f"{eager['ms_b32']:.3f} ms at batch 32, {eager['ms_b1']:.3f} ms at batch 1")  # fmt: skip
    print("| recipe | top-1 | drop | gate | size MB | ms b32 | x eager | ms b1 | x eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in result["rows"].items():
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | | | |")
            continue
        mark = " (best hand-written)" if name == result["best_hand_written"] else ""
        print(f"| {name}{mark} | {r['top1']:.2f} | {r['drop']:.2f} | {'met' if r['passed'] else 'missed'} | "
              f"{r['size_mb']:.3f} | {r['ms_b32']:.3f} | {eager['ms_b32'] / r['ms_b32']:.2f}x | {r['ms_b1']:.3f} | "
              f"{eager['ms_b1'] / r['ms_b1']:.2f}x |")  # fmt: skip
    for case, s in result["searches"].items():
        print(f"search '{case}' from \"{s['start']}\": {s['trials']} trials in {s['seconds']:.0f} s: {s['states']}, "
              f"{s['repeats']} repeated proposal(s) not built")  # fmt: skip
        tuned = result["rows"].get(f"kiln tune best ({case})")
        for label, other in (("starting recipe", s["start"]), ("best hand-written", result["best_hand_written"])):
            hand = result["rows"].get(other or "")
            if tuned and hand and "ms_b32" in tuned and "ms_b32" in hand:
                print(f"  tuned / {label}: latency b32 {tuned['ms_b32'] / hand['ms_b32']:.2f}x, "
                      f"b1 {tuned['ms_b1'] / hand['ms_b1']:.2f}x, size {tuned['size_mb'] / hand['size_mb']:.2f}x, "
                      f"drop {tuned['drop']:.2f} vs {hand['drop']:.2f} points")  # fmt: skip


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet", "encoder"], choices=["resnet", "encoder"])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--runs", type=int, default=200, help="timed calls per artifact and batch size")
    parser.add_argument("--max-drop", type=float, default=0.5, help="the accuracy gate, in top-1 points")
    parser.add_argument("--workdir", help="keep the builds here (default: a temporary directory)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    print(machine_line())
    print(f"torch {torch.__version__}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kiln-bench-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE / "digits.py", work / "digits.py")
    results = []
    for model in args.models:
        results.append(bench_model(model, work, args.trials, args.runs, args.max_drop, args.cases))
        print_table(results[-1])
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "results": results}, indent=2, default=str))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
