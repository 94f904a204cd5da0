"""kiln tune: the [tune] table's checks, a search on the digits recipe, resuming, two workers."""

from __future__ import annotations

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
    ],
)
def test_a_malformed_tune_table_is_a_clear_error(tmp_path, capsys, tune, named):
    recipe = _recipe(tmp_path, MLP + "\n[tune]\n" + tune + "\n")
    assert main(["tune", str(recipe), "--no-cache", "--quiet"]) == 2
    assert named in capsys.readouterr().err


def _tune(recipe: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torchkiln.cli", "tune", str(recipe), "--no-cache", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | (env or {}))  # type: ignore[return-value]  # fmt: skip


def _trials(recipe: Path) -> list[dict]:
    return json.loads((recipe.parent / "tune" / "trials.json").read_text())


def test_a_stopped_study_resumes_without_redoing_finished_trials(tmp_path):
    text = MLP + '\n[tune]\ntrials = 2\nobjectives = ["size_mb"]\nsampler = "random"\nspace = { "quantize" = "optional", "quantize.mode" = ["dynamic", "weight_only"] }\n'
    recipe = _recipe(tmp_path, text)
    assert main(["tune", str(recipe), "--no-cache", "--quiet"]) in (0, 1)
    first = _trials(recipe)
    assert [t["number"] for t in first] == [0, 1]
    recipe.write_text(text.replace("trials = 2", "trials = 4"))  # a larger budget: the same study
    done = _tune(recipe)
    _, err = done.communicate(timeout=600)
    assert done.returncode in (0, 1), err[-2000:]
    again = _trials(recipe)
    assert [t["number"] for t in again] == [0, 1, 2, 3]
    assert again[:2] == first  # unchanged, not redone
    assert "trial 0:" not in err and "trial 1:" not in err and "trial 2:" in err


def test_two_workers_share_one_sqlite_study_and_its_budget(tmp_path):
    recipe = _recipe(tmp_path, MLP + '\n[tune]\ntrials = 6\nobjectives = ["size_mb", "latency_ms"]\nspace = { "quantize" = "optional", "quantize.mode" = ["dynamic", "weight_only"], "quantize.min_macs" = [0, 4096] }\n')
    workers = [_tune(recipe, "--quiet", env={"TORCHKILN_TUNE_WORKER": "1"}) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode in (0, 1), err[-2000:]
    trials = _trials(recipe)
    assert 6 <= len(trials) <= 7  # the budget, overshot at most by the other worker's last trial
    evaluated = [json.dumps(t["params"], sort_keys=True) for t in trials if t["same_as"] is None and t["state"] == "COMPLETE"]
    assert len(evaluated) == len(set(evaluated))  # no options built twice


@pytest.mark.slow  # ~2-4 min: three builds of the search, then best.toml built twice, each training the CNN
def test_the_digits_search_meets_the_gates_and_best_toml_rebuilds_it(tmp_path):
    shutil.copy(DIGITS / "digits.py", tmp_path / "digits.py")
    text = (DIGITS / "kiln.toml").read_text()
    recipe = _recipe(tmp_path, text + '\n[tune]\ntrials = 8\nobjectives = ["accuracy_drop", "size_mb"]\n'
                     'space = { "quantize" = "optional", "quantize.calibrator" = ["minmax", "percentile"] }\n')  # fmt: skip
    assert main(["tune", str(recipe), "--no-cache", "--quiet"]) == 0
    trials = _trials(recipe)
    assert len(trials) == 8
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
