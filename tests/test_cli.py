"""The kiln CLI, called through main(argv): files written, exit codes, one-line errors."""

from __future__ import annotations

import json
import textwrap

import pytest

import torchkiln
from torchkiln.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert torchkiln.__version__ in capsys.readouterr().out


def test_export_zoo_model(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "export", "resnet", "--dynamic-batch", "-o", str(out_dir))
    assert code == 0, err
    assert (out_dir / "model.onnx").is_file() and (out_dir / "manifest.json").is_file()
    assert "fold_batchnorm" in out and "BatchNorm2d -12" in out and "backend onnxruntime" in out
    assert "kiln: pass 2/2: fold_batchnorm" in err and f"wrote {out_dir}" in err
    loaded = torchkiln.load(out_dir)
    assert loaded.inputs[0].shape == ("batch", 3, 32, 32)


def test_export_factory_file_with_inputs_and_json(capsys, tmp_path):
    source = tmp_path / "my_model.py"
    source.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        class Tagger(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed, self.fc = nn.Embedding(50, 8), nn.Linear(8, 3)

            def forward(self, ids, weights):
                return self.fc(self.embed(ids)) * weights.unsqueeze(-1)

        def build():
            return Tagger()
    """)
    )
    out_dir = tmp_path / "out"
    code, out, err = run(
        capsys, "export", f"{source}:build", "--input", "ids=2x7:int64:50", "--input", "weights=2x7",
        "--backend", "torch", "--dynamic", "ids:1=seq", "--dynamic", "weights:1=seq", "--json", "--quiet", "-o", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    assert out == "" and err == ""  # --quiet wins over --json
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["inputs"][0] == {"name": "ids", "shape": [2, "seq"], "dtype": "int64"}
    code, out, _ = run(capsys, "export", f"{source}:build", "--input", "ids=2x7:int64:50", "--input", "weights=2x7",
                       "--backend", "torch", "--json", "-o", str(out_dir))  # fmt: skip
    assert code == 0 and json.loads(out)["model"] == "Tagger"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "resnet", "--passes", "cleanup,fuse_all", "-o", "{tmp}/o"], "unknown pass 'fuse_all'"),
        (["export", "resnet", "--passes", "cleanup:bogus=1", "-o", "{tmp}/o"], "unknown option 'bogus'"),
        (["export", "resnet", "--backend-option", "opset=5", "-o", "{tmp}/o"], "must be between 18"),
        (["export", "resnet", "--backend-option", "opset", "-o", "{tmp}/o"], "bad --backend-option"),
        (["export", "no_such_model", "-o", "{tmp}/o"], "unknown zoo model 'no_such_model'"),
        (["export", "resnet", "--input", "1x3xbig", "-o", "{tmp}/o"], "bad --input '1x3xbig'"),
        (["export", "resnet", "--input", "1x3x32x32:float99", "-o", "{tmp}/o"], "unknown dtype 'float99'"),
        (["export", "resnet", "--input", "1x4x32x32", "-o", "{tmp}/o"], "fails on the example inputs"),
        (["export", "resnet", "--dynamic", "x=batch", "-o", "{tmp}/o"], "bad --dynamic"),
        (["export", "{tmp}/missing.py:build", "--input", "1x4", "-o", "{tmp}/o"], "does not exist"),
        (
            ["export", "torchkiln.nothing_here:build", "--input", "1x4", "-o", "{tmp}/o"],
            "cannot import module",
        ),
        (["export", "torchkiln.models:ZOO", "--input", "1x4", "-o", "{tmp}/o"], "not a callable"),
        (
            ["export", "torchkiln.models:small_models", "--input", "1x4", "-o", "{tmp}/o"],
            "not a torch.nn.Module",
        ),
        (["export", "torch.nn:Identity", "-o", "{tmp}/o"], "--input is required"),
        (["inspect", "mlp", "--input", "1x65"], "fails on the example inputs"),
        (["passes", "nope"], "unknown pass 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    errors = [line for line in err.splitlines() if not line.startswith("kiln: ")]  # drop progress lines
    assert len(errors) == 1 and message in errors[0] and "error:" in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unwritable_output_is_exit_1(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "export", "mlp", "--quiet", "-o", str(blocker / "out"))
    assert code == 1 and "cannot write to" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(torchkiln.ConfigError):
        main(["--debug", "export", "nope", "-o", str(tmp_path / "o")])


def test_passes_lists_options(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0 and "cleanup:" in out and "max_constant_bytes (int, default 65536)" in out
    code, out, _ = run(capsys, "passes", "--json")
    data = json.loads(out)
    assert {"cleanup", "fold_batchnorm"} <= set(data)
    assert data["cleanup"]["options"][0]["name"] == "remove_noops"
    code, out, _ = run(capsys, "passes", "fold_batchnorm")
    assert "W' = W * s" in out  # the full docstring with the math


def test_inspect(capsys):
    code, out, _ = run(capsys, "inspect", "resnet", "--nodes")
    assert code == 0 and "12  BatchNorm2d" in out and "layer1_0_conv1" in out
    code, out, _ = run(capsys, "inspect", "text_encoder", "--json")
    data = json.loads(out)
    assert data["inputs"][0]["dtype"] == "int64" and data["ops"]["Linear"] == 13


def test_models(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "resnet50" in out and "input_ids=1x16:int64" in out
