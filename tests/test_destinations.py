"""One destination policy for every writer (torchkiln.compiler.files): a path is replaced only if it
is missing, empty, or ours of the same kind (our marker inside, never a file name a user could
have), every destination is checked before the work, and a failure leaves each one as it was."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from torchkiln.cli import main
from torchkiln.compiler import files
from torchkiln.errors import ArtifactError

PACKAGE = Path(__file__).resolve().parents[1] / "torchkiln"
MLP_TUNE = ('[model]\nsource = "mlp"\n\n[[passes]]\nname = "cleanup"\n\n[[passes]]\nname = "quantize"\n'
            'options = { mode = "dynamic" }\n\n[backend]\nname = "torch"\n\n[tune]\ntrials = 2\n'
            '[tune.space]\n"quantize" = "optional"\n')  # fmt: skip

#: calls that remove, rename or replace a path: only files.py may make them
REPLACING = {("shutil", "rmtree"), ("shutil", "move"), ("os", "rename"), ("os", "replace"), ("os", "renames"),
             ("os", "rmdir"), ("os", "removedirs"), ("np", "savez"), ("np", "save")}  # fmt: skip
REPLACING_METHODS = {"rename", "rmdir", "savefig"}


def _replacing_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        if (owner, node.func.attr) in REPLACING or node.func.attr in REPLACING_METHODS or (
            node.func.attr == "replace" and len(node.args) == 1 and owner != "dataclasses"  # Path.replace(target)
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node.func)}")
    return found


def test_only_the_destination_module_replaces_paths():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "files.py" and path.parent.name == "compiler":
            continue
        calls = _replacing_calls(ast.parse(path.read_text()))
        # a figure is saved to the staging path atomic_file hands out (plots.save_figure)
        calls = [c for c in calls if not (path.name == "plots.py" and "savefig" in c)]
        calls = [c for c in calls if not (path.name == "pipeline.py" and "np.savez" in c)]
        if calls:
            offenders[str(path.relative_to(PACKAGE))] = calls
    assert not offenders, offenders


def test_the_walk_finds_what_it_looks_for():
    assert _replacing_calls(ast.parse("import shutil\nshutil.rmtree(p)\np.rename(q)\np.replace(q)")) == [
        "line 2: shutil.rmtree", "line 3: p.rename", "line 4: p.replace"]  # fmt: skip


def _user_directory(path: Path, *names: str) -> Path:
    path.mkdir()
    for name in names:
        (path / name).write_text("mine")
    return path


def test_a_file_name_never_makes_a_directory_ours(tmp_path):
    mine = _user_directory(tmp_path / "results", "trials.json", "partition.json", "manifest.json", "notes.txt")
    for kind in files.MARKERS:
        with pytest.raises(ArtifactError, match="refusing to replace it"):
            files.check_destination(mine, kind)
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.json", "notes.txt", "partition.json", "trials.json"]


def test_ours_of_another_kind_is_not_replaced(tmp_path):
    with files.atomic_directory(tmp_path / "study", "tune") as staging:
        files.write_marker(staging, "tune")
    assert files.is_ours(tmp_path / "study", "tune") and not files.is_ours(tmp_path / "study", "artifact")
    with pytest.raises(ArtifactError):
        files.check_destination(tmp_path / "study", "artifact")
    with files.atomic_directory(tmp_path / "study", "tune") as staging:  # the same kind: replaced
        files.write_marker(staging, "tune", round=2)


def test_kiln_tune_refuses_a_users_directory_holding_a_trials_json(tmp_path, capsys):
    recipe = tmp_path / "kiln.toml"
    recipe.write_text(MLP_TUNE)
    mine = _user_directory(tmp_path / "mine", "trials.json", "thesis.tex")
    assert main(["tune", str(recipe), "-o", str(mine), "--no-cache"]) == 2  # the destination: a usage error
    assert "refusing to replace" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex", "trials.json"]
    assert not (tmp_path / "tune.db").exists()  # refused before the study was made


def test_kiln_build_checks_the_partition_destination_before_writing_the_build(tmp_path, capsys):
    recipe = tmp_path / "kiln.toml"
    recipe.write_text('[model]\nsource = "mlp"\n\n[[passes]]\nname = "cleanup"\n\n[backend]\nname = "torch"\n\n'
                      '[partition]\nstages = 2\nbalance = "params"\n')  # fmt: skip
    mine = _user_directory(tmp_path / "build.partition", "keep.txt")
    assert main(["build", str(recipe), "--no-cache"]) == 2
    assert "build.partition" in capsys.readouterr().err
    assert not (tmp_path / "build").exists()  # the build was not written, then found unpartitionable
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]


MODEL_PY = "import torch\n\ndef model():\n    torch.manual_seed(0)\n    return torch.nn.Linear(4, 2).eval()\n"


def test_a_build_into_the_artifact_holding_its_recipe_and_model_is_refused_before_work(tmp_path, capsys):
    """The user put kiln.toml and model.py into an earlier artifact and built into it again."""
    build = tmp_path / "build"
    recipe = tmp_path / "kiln.toml"
    recipe.write_text('[model]\nsource = "model.py:model"\ninputs = [{ name = "input", shape = [1, 4] }]\n\n'
                      '[[passes]]\nname = "cleanup"\n\n[backend]\nname = "torch"\n')  # fmt: skip
    (tmp_path / "model.py").write_text(MODEL_PY)
    assert main(["build", str(recipe), "-o", str(build), "--no-cache"]) == 0  # an artifact of ours
    for name in ("kiln.toml", "model.py"):
        (build / name).write_text((tmp_path / name).read_text())
    before = sorted(p.name for p in build.iterdir())
    assert main(["build", str(build / "kiln.toml"), "-o", str(build), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "holds the recipe" in err and "which this run reads" in err
    assert sorted(p.name for p in build.iterdir()) == before  # nothing deleted, nothing rewritten
    # the model's source alone inside the destination is refused too, named by its key
    (build / "kiln.toml").unlink()
    recipe.write_text(recipe.read_text().replace("model.py:model", "build/model.py:model"))
    assert main(["build", str(recipe), "-o", str(build), "--no-cache"]) == 2
    assert "[model] source" in capsys.readouterr().err
    assert (build / "model.py").exists()


def test_kiln_export_refuses_a_destination_holding_its_model_source(tmp_path, capsys):
    artifact = tmp_path / "artifact"
    source = tmp_path / "model.py"
    source.write_text(MODEL_PY)
    assert main(["export", f"{source}:model", "--input", "input=1x4", "--backend", "torch", "-o", str(artifact)]) == 0
    (artifact / "model.py").write_text(MODEL_PY)
    assert main(["export", f"{artifact / 'model.py'}:model", "--input", "input=1x4", "--backend", "torch",
                 "-o", str(artifact)]) == 2  # fmt: skip
    assert "holds the model" in capsys.readouterr().err
    assert (artifact / "model.py").read_text() == MODEL_PY


def test_a_file_destination_that_is_an_input_is_refused(tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros(3))
    with pytest.raises(ArtifactError, match="which this run reads"):
        files.check_file_destination(data, "npz", [("the inputs", data)])


def test_an_output_file_is_replaced_only_if_we_wrote_it(tmp_path):
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, a=np.zeros(3))
    with pytest.raises(ArtifactError, match="did not write"):
        files.check_file_destination(theirs, "npz")
    with pytest.raises(ArtifactError, match=r"must be a \.npz"):
        files.check_file_destination(tmp_path / "out.txt", "npz")
    ours = tmp_path / "ours.npz"
    with files.atomic_file(ours, "npz") as partial:
        np.savez(partial, **files.mark_npz({"output_0": np.ones(2)}))
    files.check_file_destination(ours, "npz")  # ours: may be replaced
    assert list(np.load(ours))[:1] == ["output_0"]


def test_a_failed_file_write_leaves_the_destination_and_no_partial(tmp_path):
    ours = tmp_path / "ours.npz"
    with files.atomic_file(ours, "npz") as partial:
        np.savez(partial, **files.mark_npz({"output_0": np.ones(2)}))
    before = ours.read_bytes()
    with pytest.raises(RuntimeError), files.atomic_file(ours, "npz") as partial:
        np.savez(partial, **files.mark_npz({"output_0": np.zeros(2)}))
        raise RuntimeError("the work failed")
    assert ours.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ours.npz"]


def test_kiln_bench_refuses_to_overwrite_a_users_png_before_timing(tmp_path, capsys):
    picture = tmp_path / "holiday.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"mine")
    assert main(["bench", "mlp", "--plot", str(picture), "--runs", "1"]) != 0
    assert "did not write" in capsys.readouterr().err and picture.read_bytes().endswith(b"mine")


def test_a_plot_we_wrote_carries_our_marker_and_is_replaced(tmp_path):
    pytest.importorskip("matplotlib")
    from torchkiln.workflows.plots import latency_plot

    path = tmp_path / "latency.png"
    assert latency_plot(path, {"torch": [(1, 10.0), (2, 18.0)]}) is None
    assert files.check_file_destination(path, "png") == path
    assert latency_plot(path, {"torch": [(1, 11.0), (2, 19.0)]}) is None


def test_a_destination_that_may_not_be_written_is_a_usage_error_exit_2(tmp_path, capsys, monkeypatch):
    """`-o .` and `-o` a directory that is not ours: the user's configuration (exit 2, as README says),
    refused before any work; a Python caller still catches it as an ArtifactError."""
    from torchkiln.errors import ArtifactError, ConfigError, DestinationError

    monkeypatch.chdir(tmp_path)
    mine = _user_directory(tmp_path / "mine", "notes.txt")
    assert main(["export", "mlp", "-o", "."]) == 2
    assert "it is the current directory" in capsys.readouterr().err
    assert main(["export", "mlp", "-o", str(mine)]) == 2
    assert "not a torchkiln artifact" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(DestinationError) as caught:
        files.check_destination(mine, "artifact")
    assert isinstance(caught.value, ArtifactError) and isinstance(caught.value, ConfigError)
