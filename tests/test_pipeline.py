"""Partitions into pipeline stages, and the pipeline runtime under torchrun (2 local processes, gloo)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compile_quietly
from torch import nn

import torchkiln
from torchkiln import models
from torchkiln.cli import main
from torchkiln.compiler.files import mark_npz
from torchkiln.driver.partition import Boundary
from torchkiln.errors import ArtifactError, ConfigError, PipelineError
from torchkiln.workflows.pipeline import check_boundary

pytestmark = pytest.mark.xdist_group("pipeline")  # the torchrun cases share the two cores' ports and time


def _partition(name: str, balance: str = "params", **kwargs):
    entry = models.get(name)
    return entry, torchkiln.partition(entry.build(), entry.example_inputs(batch=2), stages=2, balance=balance, **kwargs)


@pytest.mark.parametrize("name", ["resnet", "text_encoder"])
def test_two_stages_compose_to_the_whole_program_and_balance_parameters(name):
    entry, part = _partition(name)
    assert len(part.stages) == 2 and part.max_abs_error is not None and part.max_abs_error <= 1e-5
    first, second = part.records
    assert first.boundary and all(b.bytes > 0 and b.shape[0] == 2 for b in first.boundary)
    assert second.inputs == [b.name for b in first.boundary]  # what crosses is exactly what is sent
    costs = [r.cost for r in part.records]
    assert max(costs) <= 1.25 * (sum(costs) / len(costs))  # parameters split evenly
    inputs = entry.example_inputs(batch=3, seed=4)
    torch.testing.assert_close(part(**inputs)[0], entry.build()(**inputs), atol=1e-5, rtol=1e-4)
    assert "stage" in part.table() and "sends" in part.table()


def test_bad_settings_are_clear_errors():
    entry = models.get("mlp")
    with pytest.raises(ConfigError, match="balance"):
        torchkiln.partition(entry.build(), entry.example_inputs(), balance="flops")
    with pytest.raises(ConfigError, match="stages"):
        torchkiln.partition(entry.build(), entry.example_inputs(), stages=500)


def test_save_load_and_refusing_a_directory_that_is_not_ours(tmp_path):
    entry, part = _partition("resnet", balance="memory")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError):
        part.save(mine)
    assert (mine / "notes.txt").read_text() == "keep"
    saved = part.save(tmp_path / "part")
    again = torchkiln.load_partition(saved)
    inputs = entry.example_inputs(batch=2, seed=9)
    torch.testing.assert_close(again(**inputs)[0], part(**inputs)[0])
    assert json.loads((saved / "partition.json").read_text())["balance"] == "memory"


def _torchrun(tmp_path, directory, inputs, timeout_s=60, microbatches=4):
    np.savez(tmp_path / "in.npz", **{k: v.numpy() for k, v in inputs.items()})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "torchkiln.cli", "pipeline", str(directory), "--inputs", str(tmp_path / "in.npz"),
               "--microbatches", str(microbatches), "-o", str(tmp_path / "out.npz"), "--timeout", str(timeout_s)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["resnet", pytest.param("text_encoder", marks=pytest.mark.slow)])
def test_the_pipeline_over_two_ranks_returns_the_single_artifacts_outputs(tmp_path, name):
    entry, part = _partition(name, balance="latency")
    directory = part.save(tmp_path / "part")
    inputs = entry.example_inputs(batch=8, seed=11)
    done = _torchrun(tmp_path, directory, inputs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 1] micro-batch 4/4" in done.stderr and "[rank 0] micro-batch 4/4" in done.stderr
    single = compile_quietly(entry.build(), entry.example_inputs(batch=2), backend="torch", dynamic_axes="batch")
    got = torch.from_numpy(np.load(tmp_path / "out.npz")["output_0"])
    torch.testing.assert_close(got, single(**inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # ~25 s under torchrun in CI; the pipeline's other torchrun runs stay in CI
def test_a_rank_that_fails_ends_the_run_with_its_error(tmp_path):
    entry, part = _partition("resnet")
    directory = part.save(tmp_path / "part")
    (directory / "stage1" / "manifest.json").write_text("{ not json")  # rank 1 cannot load its stage
    start = time.monotonic()
    done = _torchrun(tmp_path, directory, entry.example_inputs(batch=8), timeout_s=20)
    assert done.returncode != 0
    assert "[rank 1] error:" in done.stderr and "manifest.json" in done.stderr
    assert time.monotonic() - start < 120  # no hang: the failing rank's exit stops the group
    assert not (tmp_path / "out.npz").exists()


def test_kiln_partition_writes_the_stages(tmp_path, capsys):
    assert main(["partition", "resnet", "--stages", "2", "--balance", "params", "-o", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "partition.json").exists() and (tmp_path / "p" / "stage1" / "manifest.json").exists()
    out, err = capsys.readouterr()
    assert "balance=params" in out
    phases = ["tracing and optimizing", "costing", "choosing 2 stages", "compiling stage 1/2", "compiling stage 2/2",
              "verifying the stages", "timing each stage"]  # fmt: skip
    positions = [err.find(f"kiln: {phase}") for phase in phases]  # each long phase says so, in order
    assert -1 not in positions and positions == sorted(positions), err


CALIBRATE = """
import sys, torch, torchkiln
from torchkiln import models
from torchkiln.compiler.quant_ops import QUANTIZE
entry = models.get("resnet")
batches = [entry.example_inputs(batch=2, seed=100 + i) for i in range(7)]  # odd: a partial last step
compiled = torchkiln.compile(entry.build(), entry.example_inputs(batch=2), backend="torch", latency_runs=0,
                             passes="cleanup,fold_batchnorm,quantize:calibrator=" + sys.argv[2], calibration_data=batches)
params = [(n.name, float(n.args[1]), int(n.args[2])) for n in compiled.artifact.module.graph.nodes if n.target == QUANTIZE]
rank = int(__import__("os").environ.get("RANK", "0"))
torch.save(params, sys.argv[1] + f"/params{rank}.pt")
"""


@pytest.mark.parametrize("calibrator", ["entropy", pytest.param("minmax", marks=pytest.mark.slow)])
def test_two_rank_calibration_gives_exactly_the_single_process_parameters(tmp_path, calibrator):
    script = tmp_path / "calibrate.py"
    script.write_text(CALIBRATE)
    single = subprocess.run([sys.executable, str(script), str(tmp_path), calibrator], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = torch.load(tmp_path / "params0.pt")
    (tmp_path / "params0.pt").unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path), calibrator]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"params{r}.pt") for r in (0, 1)]
    assert len(expected) > 10
    assert ranks[0] == expected and ranks[1] == expected  # bit for bit: scales and zero points


WEIGHT_METHOD = """
import os, sys, torch, torchkiln
from torchkiln import models
entry = models.get("mlp")
batches = [entry.example_inputs(batch=16, seed=100 + i) for i in range(9)]  # 8 calibrate: 128 rows (>= 128 inputs, <= AWQ's sample)
compiled = torchkiln.compile(entry.build(), entry.example_inputs(batch=16), backend="torch", latency_runs=0, verify=False,
                             passes="cleanup,fold_batchnorm,quantize:mode=weight_only,bits=4,method=" + sys.argv[2],
                             calibration_data=batches)
module = compiled.artifact.module
stored = {n.target: getattr(module, n.target).detach().clone() for n in module.graph.nodes if n.op == "get_attr"}
torch.save((stored, compiled.report.passes[-1].notes), sys.argv[1] + f"/weights{os.environ.get('RANK', '0')}.pt")
"""


@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow)])
def test_two_ranks_choose_the_single_process_weights(tmp_path, method):
    """GPTQ's Hessians and AWQ's statistics and search errors summed over a torchrun group: every
    rank stores the single process's integers (scales equal to float rounding)."""
    script = tmp_path / "weights.py"
    script.write_text(WEIGHT_METHOD)
    single = subprocess.run([sys.executable, str(script), str(tmp_path), method], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    expected, notes = torch.load(tmp_path / "weights0.pt")
    (tmp_path / "weights0.pt").unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path), method]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(("GPTQ" if method == "gptq" else "AWQ") + " " in note and "on 3 of 3 layer(s)" in note for note in notes)
    for rank in (0, 1):
        stored, rank_notes = torch.load(tmp_path / f"weights{rank}.pt")
        assert rank_notes == notes and stored.keys() == expected.keys()
        for name, tensor in expected.items():
            if tensor.dtype == torch.uint8:  # packed codes
                assert torch.equal(stored[name], tensor), name
            else:
                torch.testing.assert_close(stored[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow  # ~40 s: the digits CNN trained and built three times
def test_a_recipe_built_by_two_ranks_evaluates_like_one_process_and_rank_0_writes(tmp_path):
    """kiln build under torchrun: data-parallel calibration and evaluation, one artifact written."""
    recipe = Path(__file__).resolve().parents[1] / "examples" / "digits" / "kiln.toml"
    single = subprocess.run([sys.executable, "-m", "torchkiln.cli", "build", str(recipe), "-o", str(tmp_path / "one"),
                             "--no-cache", "--quiet"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "torchkiln.cli", "build", str(recipe), "-o", str(tmp_path / "two"), "--no-cache"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kiln [rank 1]: " in done.stderr and "kiln [rank 0]: " in done.stderr
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert two["evaluation"] == one["evaluation"]  # eager and artifact accuracy, batch count: identical
    assert [p["stats"] for p in two["passes"]] == [p["stats"] for p in one["passes"]]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two"]  # no second write


def test_a_recipe_partition_table_writes_the_stages_beside_the_build(tmp_path, capsys):
    recipe = tmp_path / "kiln.toml"
    recipe.write_text('[model]\nsource = "resnet"\n\n[[passes]]\nname = "fold_batchnorm"\n\n[backend]\nname = "torch"\n\n'
                      '[partition]\nstages = 2\nbalance = "params"\n')  # fmt: skip
    assert main(["build", str(recipe), "-o", str(tmp_path / "build"), "--no-cache", "--quiet"]) == 0
    data = json.loads((tmp_path / "build.partition" / "partition.json").read_text())
    assert len(data["stages"]) == 2 and data["balance"] == "params"
    assert (tmp_path / "build.partition" / "stage1" / "manifest.json").exists()
    recipe.write_text(recipe.read_text().replace("stages = 2", "stages = 0"))
    assert main(["build", str(recipe), "-o", str(tmp_path / "build"), "--no-cache", "--quiet"]) == 2
    assert "partition" in capsys.readouterr().err


INT8_RECIPE = """[model]
source = "resnet"

[[passes]]
name = "fold_batchnorm"

[[passes]]
name = "quantize"

[calibration]
source = "batches.py:batches"

[backend]
name = "torch"

[partition]
stages = 2
balance = "latency"
"""


def test_a_recipe_with_a_partition_builds_under_torchrun_and_rank_0_writes(tmp_path):
    """Every rank calibrates the build and the partition together (data-parallel); rank 0 writes both."""
    (tmp_path / "kiln.toml").write_text(INT8_RECIPE)
    (tmp_path / "batches.py").write_text("from torchkiln import models\n\ndef batches():\n"
                                         "    return [models.get('resnet').example_inputs(batch=2, seed=s) for s in range(5)]\n")  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "torchkiln.cli", "build", str(tmp_path / "kiln.toml"), "-o", str(tmp_path / "build"), "--no-cache",
               "--quiet"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("build")) == ["build", "build.partition"]
    part = torchkiln.load_partition(tmp_path / "build.partition")
    whole = torchkiln.load(tmp_path / "build")
    inputs = models.get("resnet").example_inputs(batch=3, seed=7)
    torch.testing.assert_close(part(**inputs)[0], whole(**inputs), atol=1e-4, rtol=1e-3)


def test_progress_bars_name_the_rank_under_torchrun(monkeypatch):
    from torchkiln.compiler.calibration import rank_prefixed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_prefixed("calibrating") == "calibrating"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert rank_prefixed("calibrating") == "[rank 1] calibrating"


def _swap_in(source: Path, target: Path) -> None:
    shutil.rmtree(target)
    shutil.copytree(source, target)


BINDING_CASES = {
    "stage-from-another-partition": lambda d, other: _swap_in(other / "stage1", d / "stage1"),
    "stage-is-a-link": lambda d, other: (shutil.rmtree(d / "stage1"), (d / "stage1").symlink_to(other / "stage1")),
    "stage-missing": lambda d, other: shutil.rmtree(d / "stage0"),
    "stage-manifest-edited": lambda d, other: (d / "stage0" / "manifest.json").write_text(
        (d / "stage0" / "manifest.json").read_text().replace('"model"', '"model" ', 1)),
    "old-format": lambda d, other: (d / "partition.json").write_text(
        json.dumps({**json.loads((d / "partition.json").read_text()), "format": 1})),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BINDING_CASES))
def test_a_changed_swapped_linked_or_missing_stage_is_refused(tmp_path, case):
    """partition.json binds each stage's manifest digest: another model's stage (it ran and reported
    the stored error before), a link or a missing stage is an ArtifactError."""
    _, part = _partition("mlp")
    directory = part.save(tmp_path / "part")
    other = torchkiln.partition(models.build("mlp", seed=3), models.get("mlp").example_inputs(batch=2), stages=2,
                                balance="params").save(tmp_path / "other")  # fmt: skip
    BINDING_CASES[case](directory, other)
    with pytest.raises(ArtifactError, match="stage|partition"):
        torchkiln.load_partition(directory)


def test_the_boundary_check_names_the_tensor_and_the_schema():
    spec = Boundary("relu", [2, 16], "float32", 128)
    check_boundary(spec, 2, [7, 16], "float32", "to send")  # another batch: fine
    for ndim, sizes, dtype in ((3, [2, 16, 1], "float32"), (2, [2, 17], "float32"), (2, [2, 16], "float64")):
        with pytest.raises(PipelineError, match="'relu' to send .* binds float32\\[batch, 16\\]"):
            check_boundary(spec, ndim, sizes, dtype, "to send")
    with pytest.raises(PipelineError, match="GiB"):
        check_boundary(spec, 2, [1 << 40, 16], "float32", "from rank 0")


def test_a_boundary_that_breaks_the_schema_ends_every_rank_with_a_typed_error(tmp_path):
    """A rank sends a tensor of another rank than partition.json binds for it: the sender refuses
    it and tells rank 1 (gloo aborted rank 1 with SIGABRT before)."""
    entry, part = _partition("resnet")
    directory = part.save(tmp_path / "part")
    data = json.loads((directory / "partition.json").read_text())
    data["stages"][0]["boundary"][0]["shape"].append(1)
    (directory / "partition.json").write_text(json.dumps(data))
    done = _torchrun(tmp_path, directory, entry.example_inputs(batch=8), timeout_s=20)
    assert done.returncode != 0 and "SIGABRT" not in done.stderr and "EnforceNotMet" not in done.stderr
    assert "[rank 0] error: boundary tensor" in done.stderr, done.stderr[-2000:]
    assert "[rank 1] error: rank 0 failed" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out.npz").exists()


def test_pipeline_inputs_are_checked_against_the_partition_before_they_are_read(tmp_path, capsys):
    entry, part = _partition("resnet")
    directory = part.save(tmp_path / "part")
    inputs = entry.example_inputs(batch=4)
    wrong = {"x": inputs["x"][:, :, :16]}  # another image size
    done = _torchrun(tmp_path, directory, wrong, timeout_s=20)
    assert done.returncode != 0 and "[rank 0] error:" in done.stderr and "the partition takes float32" in done.stderr
    mine = tmp_path / "out.npz"
    np.savez(mine, keep=np.ones(1))
    np.savez(tmp_path / "in.npz", **{k: v.numpy() for k, v in inputs.items()})
    # refused on every rank before the group is joined: no torchrun needed to see it
    assert main(["pipeline", str(directory), "--inputs", str(tmp_path / "in.npz"), "-o", str(mine)]) == 2
    assert "[rank 0] error:" in capsys.readouterr().err and list(np.load(mine)) == ["keep"]
    # nor the file it reads, even one it wrote itself (an earlier run's outputs fed back in)
    marked = tmp_path / "marked.npz"
    np.savez(marked, **mark_npz({k: v.numpy() for k, v in inputs.items()}))
    before = marked.read_bytes()
    assert main(["pipeline", str(directory), "--inputs", str(marked), "-o", str(marked)]) == 2
    assert "--inputs" in capsys.readouterr().err and marked.read_bytes() == before


def test_a_model_whose_input_is_called_input_partitions(tmp_path):
    """fx renames a placeholder that shadows a builtin (input -> input_1); stages and calls use the
    input's name (a KeyError before, found by the format fuzzer)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    part = torchkiln.partition(model, {"input": torch.randn(2, 4)}, stages=2, balance="params")
    x = torch.randn(5, 4)
    torch.testing.assert_close(torchkiln.load_partition(part.save(tmp_path / "p"))(input=x)[0], model(x))
