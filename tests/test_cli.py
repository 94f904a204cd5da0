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
    assert manifest["inputs"][0] == {"name": "ids", "shape": [2, "seq"], "dtype": "int64", "range": [0, 50],
                                     "range_source": "embedding 'embed' (50 rows)"}  # fmt: skip
    code, out, _ = run(capsys, "export", f"{source}:build", "--input", "ids=2x7:int64:50", "--input", "weights=2x7",
                       "--backend", "torch", "--json", "-o", str(out_dir))  # fmt: skip
    assert code == 0 and json.loads(out)["model"] == "Tagger"


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


def test_export_help_lists_backend_options(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "opset (int, default 23)" in out and "opset (int, default 18)" in out and "providers (list of str" in out
    assert "device (str, default 'cpu')" in out and "  tensorrt:" in out and "precision (list of str" in out


@pytest.mark.parametrize("command", [["partition", "mlp", "-o", "parts"], ["export", "mlp", "-o", "out"], ["inspect", "mlp"]])
def test_a_seed_past_64_bits_exits_2(command, capsys, tmp_path, monkeypatch):
    """Found by the API fuzzer: kiln partition --seed 2**70 was an internal error (Overflow when unpacking long long)."""
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--seed", str(2**70)]) == 2
    assert "--seed" in capsys.readouterr().err


def test_an_input_the_allocator_refuses_exits_2(capsys, monkeypatch):
    """Within the memory budget yet refused by the allocator (a ulimit, fragmentation): torch's
    'RuntimeError: [enforce fail at alloc_cpu.cpp]' was an internal error; now it names the input."""
    import torch

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. you tried to allocate 4000000000 bytes")

    monkeypatch.setattr(torch, "randn", refuse)
    assert main(["inspect", "mlp", "--input", "1000000000"]) == 2
    assert "cannot allocate input 'x' (3.73 GiB)" in capsys.readouterr().err


LONG = "a" * 300  # longer than any file name may be: Path.exists() raises ENAMETOOLONG


@pytest.mark.parametrize("argv", [["bench", LONG], ["export", LONG, "-o", "out"], ["inspect", LONG],
                                  ["export", f"{LONG}.py:build", "-o", "out"], ["export", "mlp", "-o", "out", "--calibration", LONG],
                                  ["partition", LONG, "-o", "parts"]])  # fmt: skip
def test_a_name_too_long_for_a_file_is_a_usage_error(argv, capsys, tmp_path, monkeypatch):
    """Found by the API fuzzer: 'internal error: OSError: [Errno 36] File name too long'."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and "aaaa" in err
