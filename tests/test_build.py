"""``kiln build`` and kiln.toml recipes: the example builds and passes its gates, a missed gate
exits 1 and leaves the output alone, a malformed recipe exits 2 naming the line and key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from torchkiln.cli import main
from torchkiln.errors import ConfigError
from torchkiln.workflows.recipe import load_recipe

EXAMPLE = Path(__file__).parent.parent / "examples" / "digits" / "kiln.toml"

MLP = """
[model]
source = "mlp"

[[passes]]
name = "fold_batchnorm"

[backend]
name = "torch"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kiln.toml"
    path.write_text(text)
    return path


@pytest.mark.slow  # ~30 s (trains the CNN): CI builds the same recipe as README's example (tests/test_docs.py)
def test_the_example_recipe_builds_and_passes_its_gates(tmp_path, capsys):
    assert main(["build", str(EXAMPLE), "-o", str(tmp_path / "out"), "--json"]) == 0
    printed, progress = capsys.readouterr()
    report = json.loads(printed)
    # the model factory trains here: its phase is named before and timed after, not silent
    assert "kiln: loading the model digits.py:model" in progress and re.search(r"kiln: loaded the model in [\d.]+ s", progress)
    assert report["evaluation"]["metric"] == "top1" and report["evaluation"]["drop"] <= 0.5
    assert [g["gate"] for g in report["gates"]] == ["max_accuracy_drop", "max_size_mb"]
    assert all(g["passed"] for g in report["gates"])
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"manifest.json", "model.onnx", "report.json", "report.md", "accuracy.png"}
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == "accuracy.png"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["passes"][2]["name"] == "quantize" and len(manifest["input_hashes"]["recipe"]) == 64
    assert "# Build report: kiln.toml" in (out / "report.md").read_text()
    assert "![top1 vs size and latency](accuracy.png)" in (out / "report.md").read_text()
    assert set(manifest["input_hashes"]) == {"recipe", "model", "calibration"}


def test_a_missed_gate_exits_1_and_keeps_the_previous_build(tmp_path, capsys):
    recipe = write(tmp_path, MLP)
    assert main(["build", str(recipe), "--quiet"]) == 0
    before = (tmp_path / "build" / "manifest.json").read_bytes()
    write(tmp_path, MLP.replace('name = "torch"', 'name = "onnxruntime"') + "\n[gate]\nmax_size_mb = 0.001\n")
    assert main(["build", str(recipe), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 gate(s) missed: max_size_mb" in err and "was not changed" in err
    assert (tmp_path / "build" / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[modle]\nsource = 'mlp'\n", ":1: [modle]: unknown table"),
        ("[model]\nsource = 'mlp'\nweight = 'w.pt'\n", ":3: [model] weight: unknown key 'weight' in model"),
        ("[model]\nsource = 3\n", ":2: [model] source: model.source must be str, got 3"),
        ("[backend]\nname = 'onnxruntime'\n", "the [model] table is missing"),
        ("[model]\nsource = 'mlp'\nweights = 'missing.pt'\n", "cannot load weights"),
        ("[model]\nsource = 'mlp'\n[[passes]]\nname = 'fold'\n", "unknown pass 'fold'"),
        ("[model]\nsource = 'mlp'\n[[passes]]\noptions = {}\n", "passes[0] needs name"),
        ("[model]\nsource = 'mlp'\n[backend]\nname = 'onnxruntime'\noptions = { threads = 2 }\n", "unknown option 'threads'"),
        ("[model]\nsource = 'mlp'\n[gate]\nmax_accuracy_drop = 1.0\n", "needs an [evaluation] table"),
        ("[model]\nsource = 'mlp'\ninputs = [{ name = 'x', shape = [0, 64] }]\n", "shape must be positive integers"),
        ("[model\nsource = 'mlp'\n", "not valid TOML"),
        ("[model]\nsource = 'torch.nn:Identity'\n", "[model] inputs is required"),
    ],
)
def test_malformed_recipes_exit_2_naming_the_key(tmp_path, capsys, text, message):
    recipe = write(tmp_path, text)
    assert main(["build", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "build").exists()


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.toml")


def test_recipe_fields(tmp_path):
    recipe = load_recipe(
        write(
            tmp_path,
            MLP + '\n[[passes]]\nname = "quantize"\noptions = { calibrator = "mse", ignore = ["a", "b"] }\n'
            '[verify]\nmin_cosine = 0.98\n',
        )
    )
    assert recipe.model == "mlp" and recipe.backend == "torch"
    assert recipe.passes == (("fold_batchnorm", {}), ("quantize", {"calibrator": "mse", "ignore": ["a", "b"]}))
    assert recipe.verify == {"min_cosine": 0.98} and recipe.gate == {}


def test_two_builds_of_a_recipe_are_byte_identical(tmp_path):
    recipe = write(tmp_path, MLP.replace('name = "torch"', 'name = "onnxruntime"'))
    assert main(["build", str(recipe), "-o", str(tmp_path / "a"), "--quiet", "--no-cache"]) == 0
    assert main(["build", str(recipe), "-o", str(tmp_path / "b"), "--quiet", "--no-cache"]) == 0
    first, second = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert first["files"] == second["files"] and (tmp_path / "a" / "model.onnx").read_bytes() == (
        tmp_path / "b" / "model.onnx"
    ).read_bytes()


# The cache tests build the MLP (Linear + BatchNorm1d): what they check does not depend on the model's size
CACHED = """
[model]
source = "mlp"

[[passes]]
name = "cleanup"

[[passes]]
name = "fold_batchnorm"

[backend]
name = "onnxruntime"
"""


def build_report(tmp_path: Path, recipe: Path, out: str, *flags: str) -> dict:
    assert main(["build", str(recipe), "-o", str(tmp_path / out), "--quiet", "--cache-dir", str(tmp_path / "cache"), *flags]) == 0
    return json.loads((tmp_path / out / "report.json").read_text())


def test_a_rebuild_hits_the_cache_and_gives_the_same_bytes(tmp_path):
    recipe = write(tmp_path, CACHED)
    first = build_report(tmp_path, recipe, "a")
    second = build_report(tmp_path, recipe, "b")
    assert [v.split()[0] for v in first["cache"].values()] == ["miss", "miss"]
    assert [v.split()[0] for v in second["cache"].values()] == ["hit", "hit"]
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert second["passes"] == first["passes"]  # the cached pass records come back with the graph
    assert "cache: optimize hit" in (tmp_path / "b" / "report.md").read_text()


def test_changing_only_backend_options_reuses_the_optimized_graph(tmp_path):
    recipe = write(tmp_path, CACHED)
    build_report(tmp_path, recipe, "a")
    write(tmp_path, CACHED + "options = { opset = 20 }\n")
    report = build_report(tmp_path, recipe, "b")
    assert report["cache"]["optimize"].startswith("hit") and report["cache"]["lower"].startswith("miss")
    fresh = build_report(tmp_path, recipe, "c", "--no-cache")
    assert fresh["cache"] == {}
    # Lowered from the cached graph or from a fresh trace: the same bytes.
    assert (tmp_path / "b" / "model.onnx").read_bytes() == (tmp_path / "c" / "model.onnx").read_bytes()


def test_changed_weights_miss_the_cache(tmp_path):
    import torch

    from torchkiln import models

    recipe = write(tmp_path, CACHED.replace('source = "mlp"', 'source = "mlp"\nweights = "w.pt"'))
    model = models.get("mlp").build()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    build_report(tmp_path, recipe, "a")
    with torch.no_grad():
        next(model.parameters()).mul_(2)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    report = build_report(tmp_path, recipe, "b")
    assert report["cache"]["optimize"].startswith("miss")


def test_a_corrupt_cache_entry_is_a_miss_and_is_rewritten(tmp_path):
    recipe = write(tmp_path, CACHED)
    build_report(tmp_path, recipe, "a")
    (entry,) = (tmp_path / "cache" / "optimize").iterdir()
    (entry / "program.json").write_bytes(b"truncated")
    report = build_report(tmp_path, recipe, "b")
    assert report["cache"]["optimize"].startswith("miss")
    assert build_report(tmp_path, recipe, "c")["cache"]["optimize"].startswith("hit")
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "c" / "model.onnx").read_bytes()


def test_no_cache_writes_no_cache(tmp_path):
    recipe = write(tmp_path, MLP)
    assert main(["build", str(recipe), "--quiet", "--no-cache", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert not (tmp_path / "cache").exists()


TOY = """import torch

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()

def validation():  # the eager model's own labels: its top-1 is 100
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return [(x, model()(x).argmax(-1))]
"""


def test_a_missed_accuracy_gate_exits_1_with_a_summary(tmp_path, capsys):
    # 90 % of every layer's weights zeroed: top-1 collapses.
    (tmp_path / "toy.py").write_text(TOY)
    recipe = write(tmp_path, '[model]\nsource = "toy.py:model"\ninputs = [{ name = "input", shape = [8, 16], dynamic = { 0 = "batch" } }]\n\n'
                   '[[passes]]\nname = "prune"\noptions = { ratio = 0.9 }\n\n[evaluation]\nsource = "toy.py:validation"\n\n'
                   '[backend]\nname = "torch"\n\n[gate]\nmax_accuracy_drop = 0.5\n')  # fmt: skip
    assert main(["build", str(recipe), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "gate(s) missed: max_accuracy_drop:" in err and not (tmp_path / "out").exists()


TRAINING = """import torch

def batches():  # (inputs, labels) for the zoo MLP (64 features, 10 classes)
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
"""


def test_a_training_table_feeds_distill_and_its_batches_are_hashed(tmp_path):
    (tmp_path / "data.py").write_text(TRAINING)
    text = MLP.replace('[backend]', '[[passes]]\nname = "prune"\noptions = { structured = true, ratio = 0.5 }\n\n'
                       '[[passes]]\nname = "distill"\noptions = { epochs = 1 }\n\n'
                       '[training]\nsource = "data.py:batches"\nvalidation = "data.py:batches"\n\n[backend]')  # fmt: skip
    assert main(["build", str(write(tmp_path, text)), "-o", str(tmp_path / "out"), "--no-cache", "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    distill = [p for p in report["passes"] if p["name"] == "distill"]
    assert distill and distill[0]["modified"]
    hashes = json.loads((tmp_path / "out" / "manifest.json").read_text())["input_hashes"]
    assert {"training", "validation"} <= set(hashes)


def test_distill_without_a_training_table_is_a_recipe_error(tmp_path):
    text = MLP.replace('[backend]', '[[passes]]\nname = "distill"\n\n[backend]')
    with pytest.raises(ConfigError, match=r"\[training\].*distill pass trains"):
        load_recipe(write(tmp_path, text))


def test_an_endless_calibration_generator_is_read_only_as_far_as_asked(tmp_path):
    """[calibration] batches = 3 of a generator that never ends (it was materialised whole first)."""
    (tmp_path / "data.py").write_text(
        "import itertools, torch\n"
        "read = []\n"
        "def endless():\n"
        "    for i in itertools.count():\n"
        "        read.append(i)\n"
        "        yield torch.randn(2, 64, generator=torch.Generator().manual_seed(i))\n"
    )  # fmt: skip
    recipe = write(tmp_path, MLP.replace('name = "fold_batchnorm"', 'name = "fold_batchnorm"\n\n[[passes]]\nname = "quantize"')
                   + '\n[calibration]\nsource = "data.py:endless"\nbatches = 3\n')  # fmt: skip
    assert main(["build", str(recipe), "--no-cache", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "build" / "manifest.json").read_text())
    assert "calibration" in manifest["input_hashes"]


def test_a_source_without_a_count_that_never_ends_is_refused(monkeypatch):
    import itertools

    from torchkiln.compiler import calibration
    from torchkiln.errors import InputError

    monkeypatch.setattr(calibration, "MAX_BATCHES", 50)
    with pytest.raises(InputError, match="more than 50 batches"):
        calibration.take(itertools.repeat(1), None, "calibration_data")
    assert calibration.take(itertools.repeat(1), 7, "calibration_data") == [1] * 7
