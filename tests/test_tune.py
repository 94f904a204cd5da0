"""kiln tune: the [tune] table's checks, a search on the digits recipe, resuming, two workers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torchkiln.cli import main

pytestmark = pytest.mark.xdist_group("tune")
DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
MLP = '[model]\nsource = "mlp"\n\n[[passes]]\nname = "cleanup"\n\n[[passes]]\nname = "quantize"\noptions = { mode = "dynamic" }\n\n[backend]\nname = "torch"\n'


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kiln.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("tune", "named"),
    [
        ('trials = 4\nspace = { "prune.ratio" = [0.0, 0.5] }', "no pass 'prune'"),
        ('trials = 4\nspace = { "quantize.ratio" = [0.0, 0.5] }', "has no option 'ratio'"),
        ('trials = 4\nspace = { "quantize.max_error" = [0.5, 0.5] }', "is empty"),
        ('trials = 4\nobjectives = ["flops"]\nspace = { "quantize" = "optional" }', "objectives"),
        ('trials = 4\nsampler = "grid"\nspace = { "quantize" = "optional" }', "sampler"),
        ('trials = 0\nspace = { "quantize" = "optional" }', "trials"),
        ('trials = 4\nspace = { "quantize" = "maybe" }', "optional"),
        ('trials = 4\nspace = { "backend" = ["tvm"] }', "backend"),
        ('trials = 4\nbudget = 3\nspace = { "quantize" = "optional" }', "budget"),
        ('trials = 4\npruner = "median"\nspace = { "quantize" = "optional" }', "pruner"),
        ('trials = 4\nspace = { "backend.opset" = [17, 19] }', "has an option 'opset'"),
        # a value no trial could use dropped that dimension silently before (every trial's params {})
        ('trials = 4\nspace = { "quantize.calibrator" = ["minmax", "percentil"] }', "'percentil' is never a valid value"),
        ('trials = 4\nspace = { "quantize.max_error" = [-1.0, 0.5] }', "-1.0 is never a valid value"),
        ('trials = 4\nspace = { "quantize.min_macs" = [0.5, 100.0] }', "is never a valid value"),
    ],
)
def test_a_malformed_tune_table_is_a_clear_error(tmp_path, capsys, tune, named):
    recipe = _recipe(tmp_path, MLP + "\n[tune]\n" + tune + "\n")
    assert main(["tune", str(recipe), "--no-cache", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert named in err and "kiln.toml:" in err  # the file and line at fault


def _tune(recipe: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torchkiln.cli", "tune", str(recipe), "--no-cache", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | (env or {}))  # type: ignore[return-value]  # fmt: skip


def _trials(recipe: Path) -> list[dict]:
    return json.loads((recipe.parent / "tune" / "trials.json").read_text())


def _study(recipe: Path):
    import optuna

    from torchkiln.workflows import tuning
    from torchkiln.workflows.recipe import load_recipe

    loaded = load_recipe(recipe)
    return optuna.load_study(study_name=tuning.study_name(loaded), storage=tuning.storage_url(loaded, None))


def test_a_killed_tune_resumes_without_redoing_finished_trials(tmp_path):
    text = MLP + '\n[tune]\ntrials = 3\nobjectives = ["size_mb"]\nsampler = "random"\nspace = { "quantize" = "optional", "quantize.mode" = ["dynamic", "weight_only"], "quantize.min_macs" = [0, 4096] }\n'
    recipe = _recipe(tmp_path, text)
    run = _tune(recipe, "--grace-period", "2")
    finished = 0
    for line in run.stderr:  # kill -9 once two trials have finished: the third is running or about to
        finished += " [" in line and "/3]: " in line
        if finished == 2:
            run.kill()
            break
    run.wait(timeout=60)
    assert finished == 2, run.stderr.read()[-2000:]
    before = {t.number: (t.params, t.values) for t in _study(recipe).trials if t.state.name == "COMPLETE"}
    assert len(before) == 2
    resumed = _tune(recipe, "--grace-period", "2", "--trials", "4")  # and a larger budget: the same study
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode in (0, 1), err[-2000:]
    trials = _trials(recipe)
    after = {t["number"]: t for t in trials}
    for number, (params, values) in before.items():  # kept as they were, not rebuilt
        assert after[number]["params"] == params and after[number]["size_mb"] == values[0]
        assert f"trial {number}:" not in err
    counted = [t for t in trials if t["state"] == "COMPLETE"]
    lost = [t for t in trials if t["state"] == "FAIL"]
    assert len(counted) == 4  # the budget, finished: the killed run's trial is not counted
    assert all(t["size_mb"] > 0.01 for t in counted)  # the torch backend's bytes (0 before: no file size)
    assert all(t["error"] is None for t in lost) and len(lost) <= 1  # at most the one it was running


def test_workers_share_one_sqlite_study_and_its_budget(tmp_path):
    recipe = _recipe(tmp_path, MLP + '\n[tune]\ntrials = 6\nobjectives = ["size_mb", "latency_ms"]\nspace = { "quantize" = "optional", "quantize.mode" = ["dynamic", "weight_only"], "quantize.min_macs" = [0, 4096] }\n')
    run = _tune(recipe, "--workers", "2")
    _, err = run.communicate(timeout=600)
    assert run.returncode in (0, 1), err[-2000:]
    assert "[worker 1] study kiln-tune-" in err  # the second worker joined (it may find the budget taken)
    trials = _trials(recipe)
    built = [t for t in trials if t["same_as"] is None]
    repeats = [t for t in trials if t["same_as"] is not None]
    assert 6 <= len(built) <= 7, (trials, err[-3000:])  # the budget, overshot at most by the other worker's last trial
    assert all(t["state"] == "COMPLETE" for t in built)  # the output waited for every worker's trials
    assert all(t["state"] == "FAIL" and t["error"] is None for t in repeats)  # asked again, not counted
    evaluated = [json.dumps(t["params"], sort_keys=True) for t in built]
    assert len(evaluated) == len(set(evaluated))  # no options built twice: 6 distinct builds


TOY = """import torch

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()

def validation():  # the eager model's own labels: its accuracy is 100
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return [(x, model()(x).argmax(-1))]
"""
TOY_RECIPE = """[model]
source = "toy.py:model"
inputs = [{ name = "input", shape = [8, 16], dynamic = { 0 = "batch" } }]

[[passes]]
name = "prune"
options = { ratio = 0.5 }

[[passes]]
name = "quantize"
options = { mode = "dynamic" }

[evaluation]
source = "toy.py:validation"

[backend]
name = "onnxruntime"

[gate]
max_accuracy_drop = 20.0
"""


def test_a_trial_whose_cheap_proxy_misses_the_accuracy_gate_is_pruned_before_its_build(tmp_path):
    (tmp_path / "toy.py").write_text(TOY)
    recipe = _recipe(tmp_path, TOY_RECIPE + '\n[tune]\ntrials = 4\nsampler = "random"\nseed = 3\n'
                     'space = { "prune.ratio" = [0.05, 0.9] }\n')  # fmt: skip
    assert main(["tune", str(recipe), "--no-cache", "--quiet"]) in (0, 1)
    trials = _trials(recipe)
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    built = [t for t in trials if t["state"] == "COMPLETE"]
    assert pruned and built, trials  # seed 3 draws ratios on both sides of the gate
    for t in pruned:  # the proxy (prune alone, torch backend) missed the gate; no artifact was measured
        assert t["proxy_accuracy_drop"] > 20.0 and t["size_mb"] is None and "misses the gate 20" in t["pruned"]
    for t in built:  # the proxy kept the gate and the full build ran
        assert t["proxy_accuracy_drop"] <= 20.0 and t["accuracy_drop"] is not None and t["size_mb"] > 0
    assert max(t["params"]["prune.ratio"] for t in built) < min(t["params"]["prune.ratio"] for t in pruned)


def test_the_proxy_is_the_passes_up_to_the_first_lossy_one_unless_distill_follows(tmp_path):
    from torchkiln.workflows import tuning
    from torchkiln.workflows.recipe import load_recipe

    (tmp_path / "toy.py").write_text(TOY)
    recipe = load_recipe(_recipe(tmp_path, TOY_RECIPE.replace('name = "prune"', 'name = "cleanup"\n\n[[passes]]\nname = "prune"')))
    cheap = tuning.proxy(recipe)
    assert cheap is not None and [n for n, _ in cheap.passes] == ["cleanup", "prune"] and cheap.backend == "torch"
    assert dict(cheap.gate) == {"max_accuracy_drop": 20.0}
    assert tuning.proxy(tuning.variant(recipe, {"prune": False, "backend": "torch"})) is None  # the whole build
    assert tuning.proxy(tuning.variant(recipe, {"prune": False})) is not None  # quantize, then onnxruntime
    with_distill = dataclasses.replace(recipe, passes=(*recipe.passes[:2], ("distill", {}), recipe.passes[2]))
    assert tuning.proxy(with_distill) is None  # distill may win the accuracy back


def test_backend_options_are_sampled_only_for_a_backend_that_declares_them(tmp_path):
    import optuna

    from torchkiln.workflows import tuning
    from torchkiln.workflows.recipe import load_recipe

    text = MLP + '\n[tune]\ntrials = 4\nspace = { "backend" = ["onnxruntime", "inductor"], "backend.dtype" = ["float32", "bfloat16"] }\n'
    recipe = load_recipe(_recipe(tmp_path, text))
    space = tuning.settings(recipe).space
    assert space[1].backends == ("inductor",)
    chosen = tuning.sample(optuna.trial.FixedTrial({"backend": "inductor", "backend.dtype": "bfloat16"}), space, recipe)
    assert chosen == {"backend": "inductor", "backend.dtype": "bfloat16"}
    built = tuning.variant(recipe, chosen)
    assert built.backend == "inductor" and dict(built.backend_options) == {"dtype": "bfloat16"}
    assert built.raw["backend"] == {"name": "inductor", "options": {"dtype": "bfloat16"}}
    ort = tuning.sample(optuna.trial.FixedTrial({"backend": "onnxruntime"}), space, recipe)
    assert ort == {"backend": "onnxruntime"}  # no dtype sampled: onnxruntime has no such option
    assert tuning.variant(recipe, ort).backend_options == {}


@pytest.mark.slow  # ~4-6 min: 16 trials, then best.toml built twice, each training the CNN
def test_the_digits_search_meets_the_gates_and_best_toml_rebuilds_it(tmp_path):
    shutil.copy(DIGITS / "digits.py", tmp_path / "digits.py")
    text = (DIGITS / "kiln.toml").read_text().replace('[[passes]]\nname = "quantize"',
                                                        '[[passes]]\nname = "prune"\n\n[[passes]]\nname = "quantize"')
    recipe = _recipe(tmp_path, text + '\n[tune]\ntrials = 16\nobjectives = ["accuracy_drop", "size_mb"]\n'
                     'space = { "prune" = "optional", "prune.ratio" = [0.1, 0.9], "quantize" = "optional", '
                     '"quantize.calibrator" = ["minmax", "percentile"] }\n')  # fmt: skip
    assert main(["tune", str(recipe), "--no-cache", "--quiet"]) == 0
    trials = _trials(recipe)
    assert len([t for t in trials if t["same_as"] is None]) == 16  # the budget counts builds, not repeats asked again
    best = tmp_path / "tune" / "best.toml"
    assert best.exists() and (tmp_path / "tune" / "trials.csv").exists()
    chosen = min((t for t in trials if t["feasible"]), key=lambda t: (t["accuracy_drop"], t["size_mb"]))
    assert chosen["accuracy_drop"] <= 0.5 and chosen["size_mb"] <= 0.3  # the recipe's gates
    assert "[tune]" not in best.read_text()
    for out in ("b1", "b2"):
        assert main(["build", str(best), "-o", str(tmp_path / out), "--no-cache", "--quiet"]) == 0
    report = json.loads((tmp_path / "b1" / "report.json").read_text())
    assert report["evaluation"]["drop"] == pytest.approx(chosen["accuracy_drop"])
    first, second = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("b1", "b2"))
    assert first["files"] == second["files"]  # the artifact's files, byte for byte (by SHA-256)


def test_an_option_that_does_not_apply_beside_the_ones_before_it_is_not_sampled(tmp_path):
    import optuna

    from torchkiln.workflows import tuning
    from torchkiln.workflows.recipe import load_recipe

    text = MLP + '\n[tune]\ntrials = 4\nspace = { "quantize.mode" = ["int8", "fp16"], "quantize.calibrator" = ["minmax", "percentile"] }\n'
    recipe = load_recipe(_recipe(tmp_path, text.replace('options = { mode = "dynamic" }\n', "")))
    space = tuning.settings(recipe).space
    half = tuning.sample(optuna.trial.FixedTrial({"quantize.mode": "fp16"}), space, recipe)
    assert half == {"quantize.mode": "fp16"}  # the calibrator applies to int8 only
    int8 = tuning.sample(optuna.trial.FixedTrial({"quantize.mode": "int8", "quantize.calibrator": "percentile"}), space, recipe)
    assert int8 == {"quantize.mode": "int8", "quantize.calibrator": "percentile"}


def test_a_trial_that_raises_anything_is_a_failed_trial_with_its_error_and_counts(tmp_path):
    from torchkiln.workflows import tuning
    from torchkiln.workflows.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, MLP + '\n[tune]\ntrials = 2\nsampler = "random"\nspace = { "quantize" = "optional" }\n'))

    def evaluate(_):
        raise RuntimeError("boom")

    study = tuning.run_study(recipe, tuning.settings(recipe), tuning.storage_url(recipe, None), evaluate, lambda _: None)
    rows = tuning.rows(study, tuning.settings(recipe))
    assert [(r["state"], r["error"]) for r in rows] == [("FAIL", "RuntimeError: boom")] * 2  # and the loop ended


def test_the_readme_tune_example_is_a_valid_table_and_unquoted_dotted_keys_are_named(tmp_path, capsys):
    import re

    from torchkiln.workflows import tuning
    from torchkiln.workflows.recipe import load_recipe

    readme = (Path(__file__).resolve().parents[1] / "docs" / "tuning.md").read_text()
    example = re.search(r"```toml\n(\[tune\]\n.*?)```", readme, re.S).group(1)
    (tmp_path / "data.py").write_text("def batches():\n    return []\n")
    base = MLP.replace('[backend]', '[[passes]]\nname = "prune"\n\n[[passes]]\nname = "distill"\n\n'
                       '[training]\nsource = "data.py:batches"\n\n[evaluation]\nsource = "data.py:batches"\n\n[backend]')  # fmt: skip
    # the example searches calibrators: its recipe quantizes statically (under mode=dynamic no
    # calibrator applies, and the space check says so)
    base = base.replace('options = { mode = "dynamic" }\n', "")
    tune = tuning.settings(load_recipe(_recipe(tmp_path, base + "\n" + example)))
    assert {d.key for d in tune.space} >= {"prune.ratio", "distill.epochs", "backend.dtype", "quantize"}
    recipe = _recipe(tmp_path, MLP + '\n[tune]\ntrials = 4\n\n[tune.space]\nquantize.mode = ["int8", "dynamic"]\n')
    assert main(["tune", str(recipe), "--no-cache", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "kiln.toml:18: [tune] space key 'quantize' is a table" in err and '"quantize.mode" = ...' in err


def test_timeout_starts_no_trial_after_it_and_bad_flags_are_errors(tmp_path, capsys):
    recipe = _recipe(tmp_path, MLP + '\n[tune]\ntrials = 4\nspace = { "quantize" = "optional" }\n')
    assert main(["tune", str(recipe), "--no-cache", "--timeout", "0"]) == 1  # no trial: none feasible
    err = capsys.readouterr().err
    assert "stopping: --timeout 0 s reached with 0 of 4 trials" in err and _trials(recipe) == []
    for flag in ("--trials", "--workers", "--grace-period"):
        assert main(["tune", str(recipe), "--no-cache", flag, "0"]) == 2
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_best_toml_paths_are_rewritten_for_its_directory(tmp_path):
    from torchkiln.workflows.tuning import relocated

    for name in ("toy.py", "weights.pt"):
        (tmp_path / name).write_text("")
    raw = {"model": {"source": "toy.py:model", "weights": "weights.pt"}, "training": {"source": "toy.py:batches"},
           "evaluation": {"source": "toy.py:validation", "metric": "top1"}, "backend": {"name": "torch"}}  # fmt: skip
    moved = relocated(raw, tmp_path, tmp_path / "tune")
    assert moved["model"] == {"source": "../toy.py:model", "weights": "../weights.pt"}
    assert moved["training"]["source"] == "../toy.py:batches" and moved["evaluation"]["metric"] == "top1"
    assert raw["model"]["source"] == "toy.py:model"  # the recipe's own table is untouched


SEARCH = ('\n[tune]\ntrials = {trials}\nobjectives = ["size_mb", "latency_ms"]\nsampler = "{sampler}"\n'
          'space = {{ "quantize" = "optional", "quantize.mode" = ["dynamic", "weight_only"], "quantize.min_macs" = [0, 100000] }}\n')


def _fake_search(directory: Path, trials: int, sampler: str = "random", metrics=None, say=None):
    """run_study with a deterministic stand-in for the build; the study and the recipes it built."""
    from torchkiln.workflows import tuning
    from torchkiln.workflows.recipe import load_recipe

    directory.mkdir(exist_ok=True)
    recipe = load_recipe(_recipe(directory, MLP + SEARCH.format(trials=trials, sampler=sampler)))
    built = []

    def evaluate(candidate):
        built.append(candidate)
        names = [n for n, _ in candidate.passes]
        options = dict(candidate.passes[-1][1]) if "quantize" in names else {}
        default = {"size_mb": 4.0 if "quantize" not in names else 1.0 + options.get("min_macs", 0) / 1e5,
                   "latency_ms": 1.0 if "quantize" not in names else 2.0, "constraints": {}}  # fmt: skip
        return metrics(candidate) if metrics else default

    study = tuning.run_study(recipe, tuning.settings(recipe), tuning.storage_url(recipe, None), evaluate,
                             say or (lambda _: None))  # fmt: skip
    return study, built, recipe


def _built_params(study) -> list[str]:
    return [json.dumps(t.params, sort_keys=True) for t in study.trials if t.state.name == "COMPLETE"]


def test_a_search_is_reproducible_and_a_resumed_one_continues_as_an_uninterrupted_one(tmp_path):
    whole, _, _ = _fake_search(tmp_path / "whole", 6)
    _fake_search(tmp_path / "split", 3)
    resumed, _, _ = _fake_search(tmp_path / "split", 6)  # the same study, a larger budget
    again, _, _ = _fake_search(tmp_path / "again", 6)
    assert _built_params(whole) == _built_params(resumed) == _built_params(again)
    assert len(set(_built_params(whole))) == 6  # six distinct builds


def test_a_killed_runs_trial_is_failed_at_once_and_the_search_goes_on(tmp_path):
    import optuna

    first, _, recipe = _fake_search(tmp_path, 2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = first.ask()  # what a killed run leaves: a RUNNING trial of a process that is gone
    orphan.set_user_attr("worker", f"{os.uname().nodename}:{int(dead.stdout)}")
    assert orphan.number == 2
    heard: list[str] = []
    resumed, built, _ = _fake_search(tmp_path, 4, say=heard.append)  # grace period 30 s: not waited for
    states = {t.number: t.state for t in resumed.trials}
    assert states[2] == optuna.trial.TrialState.FAIL and any("failed 1 trial(s) of a killed run" in h for h in heard)
    assert len(_built_params(resumed)) == 4 and len(built) == 2


def test_a_repeated_proposal_is_asked_again_not_built_and_not_counted(tmp_path):
    from torchkiln.workflows import tuning

    heard: list[str] = []
    # the space holds two option sets (with and without quantize), the budget asks for five
    recipe_text = MLP + '\n[tune]\ntrials = 5\nobjectives = ["size_mb"]\nsampler = "random"\nspace = { "quantize" = "optional" }\n'
    (tmp_path / "kiln.toml").write_text(recipe_text)
    from torchkiln.workflows.recipe import load_recipe

    recipe = load_recipe(tmp_path / "kiln.toml")
    built = []

    def evaluate(candidate):
        built.append([n for n, _ in candidate.passes])
        return {"size_mb": float(len(candidate.passes)), "constraints": {}}

    study = tuning.run_study(recipe, tuning.settings(recipe), tuning.storage_url(recipe, None), evaluate, heard.append)
    assert sorted(map(tuple, built)) == [("cleanup",), ("cleanup", "quantize")]  # each option set built once
    repeats = [t for t in study.trials if "same_as" in t.user_attrs]
    assert len(repeats) == tuning.MAX_REPEATS and all(t.state.name == "FAIL" for t in repeats)
    assert tuning._counted(study) == 2 and any("the space may be exhausted" in h for h in heard)


def test_the_search_starts_from_the_recipe_and_never_returns_less_than_it(tmp_path):
    from torchkiln.workflows import tuning

    def metrics(candidate):  # dropping quantize is faster but 4x larger: not better than the recipe
        quantized = any(n == "quantize" for n, _ in candidate.passes)
        options = dict(candidate.passes[-1][1]) if quantized else {}
        slow = 2.0 + (0.5 if options.get("mode") == "weight_only" else 0.0) + options.get("min_macs", 0) / 1e6
        return {"size_mb": 1.0 if quantized else 4.0, "latency_ms": slow if quantized else 1.0, "constraints": {}}

    study, built, recipe = _fake_search(tmp_path, 6, sampler="tpe", metrics=metrics)
    table = tuning.rows(study, tuning.settings(recipe))
    first = table[0]
    assert first["warm_start"] == "recipe" and first["params"]["quantize"] is True
    assert first["params"]["quantize.mode"] == "dynamic" and first["params"]["quantize.min_macs"] == 0  # as written
    assert table[1]["warm_start"] == "recipe without quantize" and table[1]["params"] == {"quantize": False}
    chosen = tuning.best(study, tuning.settings(recipe), table)
    assert chosen is not None and chosen["size_mb"] <= first["size_mb"] and chosen["latency_ms"] <= first["latency_ms"]


@pytest.mark.parametrize(("trials", "queued"), [(8, 3), (2, 1)])
def test_the_warm_start_queues_the_recipe_each_pass_alone_and_without_at_most_half_the_budget(tmp_path, trials, queued):
    import optuna

    from torchkiln.workflows import tuning
    from torchkiln.workflows.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, MLP + f'\n[tune]\ntrials = {trials}\nobjectives = ["size_mb"]\n'
                                 'space = { "cleanup" = "optional", "quantize" = "optional" }\n'))  # fmt: skip
    study = optuna.create_study(directions=["minimize"])
    assert tuning.warm_start(study, recipe, tuning.settings(recipe)) == queued
    waiting = [(t.system_attrs["fixed_params"], t.user_attrs["warm_start"]) for t in study.get_trials(deepcopy=False)]
    expected = [({"cleanup": True, "quantize": True}, "recipe"),
                ({"cleanup": True, "quantize": False}, "recipe with cleanup alone"),
                ({"cleanup": False, "quantize": True}, "recipe with quantize alone")]  # fmt: skip
    assert waiting == expected[:queued]  # "without cleanup" is "quantize alone": queued once
    assert tuning.warm_start(study, recipe, tuning.settings(recipe)) == 0  # not a fresh study: nothing more


def test_latencies_within_the_timing_noise_are_a_tie_decided_by_size():
    """The digits search's front held fp32 at 0.8499 ms / 0.72 MB and int8 at 0.8559 ms / 0.23 MB:
    the clock's 0.7% is not a reason to hand back a 3x larger artifact."""
    from types import SimpleNamespace

    from torchkiln.workflows import tuning

    tune = SimpleNamespace(objectives=("latency_ms", "size_mb"))
    rows = [{"number": 0, "state": "COMPLETE", "feasible": True, "latency_ms": 0.8499, "size_mb": 0.7218},
            {"number": 1, "state": "COMPLETE", "feasible": True, "latency_ms": 0.8559, "size_mb": 0.2279},
            {"number": 2, "state": "COMPLETE", "feasible": True, "latency_ms": 0.95, "size_mb": 0.1}]  # fmt: skip
    study = SimpleNamespace(best_trials=[SimpleNamespace(number=n) for n in (0, 1, 2)])
    assert tuning.best(study, tune, rows)["number"] == 1  # type: ignore[arg-type,index]
    rows[1]["latency_ms"] = 0.95  # 12% slower: a real difference, the fastest wins
    assert tuning.best(study, tune, rows)["number"] == 0  # type: ignore[arg-type,index]


def test_a_storage_lost_mid_search_is_a_typed_error(tmp_path, monkeypatch):
    import optuna
    import sqlalchemy.exc

    from torchkiln.errors import StorageError

    def lost(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("SELECT", None, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(optuna.Study, "optimize", lost)
    with pytest.raises(StorageError, match="cannot use the study storage sqlite:.*server closed the connection"):
        _fake_search(tmp_path, 2)


def test_an_unmeasured_objective_is_a_failed_trial_not_an_endless_search(tmp_path):
    from torchkiln.workflows import tuning
    from torchkiln.workflows.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, MLP + '\n[tune]\ntrials = 2\nsampler = "random"\nobjectives = ["size_mb", "latency_ms"]\n'
                                 'space = { "quantize" = "optional" }\n'))  # fmt: skip
    metrics = {"size_mb": 1.0, "latency_ms": float("nan"), "constraints": {}}
    study = tuning.run_study(recipe, tuning.settings(recipe), tuning.storage_url(recipe, None), lambda _: metrics,
                             lambda _: None)  # fmt: skip
    rows = tuning.rows(study, tuning.settings(recipe))
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"] and all("latency_ms was not measured" in r["error"] for r in rows)
    assert tuning.best(study, tuning.settings(recipe), rows) is None  # nothing reported as best


def test_sizes_are_the_bytes_an_artifact_writes_on_every_backend(tmp_path):
    """The torch backend's report has no file size; a search objective and a size gate must still
    see its bytes (they saw 0 MB, so a search preferred every torch-backend trial)."""
    from conftest import compile_quietly

    from torchkiln import models
    from torchkiln.workflows.build import measures

    entry = models.get("mlp")
    for backend in ("torch", "onnxruntime"):
        compiled = compile_quietly(entry.build(), entry.example_inputs(batch=2), backend=backend)
        saved = compiled.save(tmp_path / backend)
        written = sum(p.stat().st_size for p in saved.iterdir())
        assert measures(compiled, {})["size_mb"] == pytest.approx(written / 1e6, rel=0.01) and written > 10_000


@pytest.mark.parametrize(
    ("storage", "message"),
    [("not a url", "is not a database URL"), ("sqlite:///{tmp}/notdb.db", "is not an SQLite database"),
     ("sqlite:////nonexistent/dir/x.db", "does not exist"),
     ("postgresql://user:secret@127.0.0.1:1/db",
      "cannot open the study storage postgresql://user:***@" if importlib.util.find_spec("psycopg")
      else "the postgresql driver 'psycopg' is not installed [at --storage] (hint: pip install 'psycopg[binary]'"),
     ("nosuchdb://user:secret@host/db", "no database called 'nosuchdb'")],
)  # fmt: skip
def test_a_bad_storage_is_a_config_error_before_any_work(tmp_path, capsys, storage, message):
    (tmp_path / "notdb.db").write_text("my notes, not a database")
    recipe = _recipe(tmp_path, MLP + '\n[tune]\ntrials = 1\n[tune.space]\n"quantize" = "optional"\n')
    assert main(["tune", str(recipe), "--storage", storage.format(tmp=tmp_path), "--no-cache", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "secret" not in err and "internal error" not in err
    assert (tmp_path / "notdb.db").read_text() == "my notes, not a database" and not (tmp_path / "tune").exists()


def test_a_refused_password_fails_at_once_without_retries(monkeypatch):
    """Only the SQLite schema race is retried (an authentication failure was retried 10 times)."""
    import optuna
    import sqlalchemy.exc

    from torchkiln.errors import ConfigError
    from torchkiln.workflows import tuning

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise sqlalchemy.exc.OperationalError("connect", None, Exception("password authentication failed for user"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", refuse)
    monkeypatch.setattr(tuning, "_check_driver", lambda parsed, shown: None)  # as if psycopg were installed
    with pytest.raises(ConfigError, match="password authentication failed") as info:
        tuning._storage("postgresql://user:secret@db.invalid/study")
    assert len(calls) == 1 and "secret" not in info.value.message
