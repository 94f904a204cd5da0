"""The ``openvino`` backend: OpenVINO IR from the verified ONNX, exact at f32, int8 kernels from QDQ,
compressed weights from weight-only, and loading held to the same rules as every backend."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import compile_quietly, count_runs, generates_like, tiny_llama
from torch import nn

import torchkiln
from torchkiln import models
from torchkiln.backends import openvino_backend
from torchkiln.cli import main
from torchkiln.compiler.files import sha256
from torchkiln.errors import ArtifactError, BackendError, ConfigError, VerificationError

pytest.importorskip("openvino", reason="the openvino backend is an optional extra (pip install 'torchkiln[openvino]')")

MLP = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    compiled = compile_quietly(MLP, torch.randn(2, 4), backend="openvino", dynamic_axes="batch")
    return compiled.save(tmp_path_factory.mktemp("openvino") / "mlp")


class Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def copy_of(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def rehash(directory: Path, name: str) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = sha256(directory / name)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_float_model_is_exact_at_other_batches_and_round_trips(saved):
    loaded = torchkiln.load(saved)
    assert loaded.backend == "openvino"
    assert sorted(json.loads((saved / "manifest.json").read_text())["files"]) == ["model.bin", "model.xml"]
    for batch in (1, 7):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(loaded(x), MLP(x), atol=1e-5, rtol=1e-4)
    notes = loaded.report.artifact.notes
    assert any(n.startswith("built on OpenVINO") and "precision f32" in n for n in notes), notes


def test_the_build_machine_is_recorded_in_the_ir_not_read_from_the_loading_one(saved, tmp_path, monkeypatch):
    assert "torchkiln" in (saved / "model.xml").read_text()  # the IR's rt_info holds it
    monkeypatch.setattr(openvino_backend, "cpu_model", lambda: "another CPU")
    notes = torchkiln.load(saved).artifact.notes()
    assert notes[0].startswith("built on OpenVINO") and "another CPU" not in notes[0], notes


def test_static_int8_runs_as_fake_quantize_and_weight_only_as_compressed_weights():
    entry = models.get("resnet")
    model, x = entry.build().eval(), entry.example_inputs()
    calibration = [torch.randn(1, 3, 32, 32) for _ in range(8)]
    int8 = compile_quietly(model, x, passes="cleanup,fold_batchnorm,quantize", backend="openvino",
                           calibration_data=calibration)  # fmt: skip
    assert any("FakeQuantize op(s)" in n for n in int8.report.artifact.notes)
    assert int8.report.artifact.cosine > 0.999
    dynamic = compile_quietly(model, x, passes="cleanup,quantize:mode=dynamic", backend="openvino")
    assert any("1 dynamic int8 layer(s) as compressed int8 weights" in n for n in dynamic.report.artifact.notes)
    assert any(n.startswith("weight-compressed") for n in dynamic.report.artifact.notes)
    with tempfile.TemporaryDirectory() as tmp:  # the IR records it: a loaded (or cached) artifact says it too
        assert any("1 dynamic int8 layer(s)" in n for n in torchkiln.load(dynamic.save(Path(tmp) / "d")).artifact.notes())
    weight_only = compile_quietly(model, x, passes="cleanup,quantize:mode=weight_only", backend="openvino")
    assert any(n.startswith("weight-compressed") for n in weight_only.report.artifact.notes)
    assert weight_only.report.artifact.cosine > 0.99


def test_bf16_is_lossy_and_needs_a_tolerance_that_allows_it():
    entry = models.get("mlp")
    model, x = entry.build().eval(), entry.example_inputs()
    flags = torchkiln.compiler.machine.cpu_flags() or frozenset()
    if not flags & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("this CPU has no bf16 instructions: OpenVINO computes in f32 whatever the hint")
    with pytest.raises(VerificationError):
        compile_quietly(model, x, backend="openvino", backend_options={"precision": "bf16"})
    loose = compile_quietly(model, x, backend="openvino", backend_options={"precision": "bf16"},
                            tolerance=torchkiln.Tolerance(min_cosine=0.99))  # fmt: skip
    assert 0.99 < loose.report.artifact.cosine < 1.0


def test_options_are_validated():
    cases = (({"threads": -1}, "threads"), ({"precision": "int8"}, "precision"), ({"stream": 2}, "stream"),
             ({"dynamic_quantization_group_size": -32}, "dynamic_quantization_group_size"))  # fmt: skip
    for options, key in cases:
        with pytest.raises(ConfigError, match=key):
            compile_quietly(MLP, torch.randn(2, 4), backend="openvino", backend_options=options)


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendError, match=r"torchkiln\[openvino\]"):
        compile_quietly(MLP, torch.randn(2, 4), backend="openvino")


def test_an_op_outside_the_standard_opsets_is_refused(saved, tmp_path):
    directory = copy_of(saved, tmp_path / "custom")
    xml = (directory / "model.xml").read_text()
    assert 'type="ReLU" version="opset1"' in xml
    (directory / "model.xml").write_text(xml.replace('type="ReLU" version="opset1"', 'type="ReLU" version="extension"', 1))
    rehash(directory, "model.xml")
    with pytest.raises(ArtifactError, match="not one of OpenVINO's standard opsets|cannot read model.xml"):
        torchkiln.load(directory)


def test_an_ir_of_another_model_is_refused(saved, tmp_path):
    other = compile_quietly(Features().eval(), {"features": torch.randn(2, 4)}, backend="openvino")
    donor = other.save(tmp_path / "other")
    directory = copy_of(saved, tmp_path / "swapped")
    for name in ("model.xml", "model.bin"):
        (directory / name).write_bytes((donor / name).read_bytes())
        rehash(directory, name)
    with pytest.raises(ArtifactError, match=r"takes \['features'\].*the manifest declares \['input'\]"):
        torchkiln.load(directory)


def test_a_truncated_weights_file_is_an_artifact_error(saved, tmp_path):
    directory = copy_of(saved, tmp_path / "truncated")
    (directory / "model.bin").write_bytes((directory / "model.bin").read_bytes()[:10])
    rehash(directory, "model.bin")
    with pytest.raises(ArtifactError):
        torchkiln.load(directory)(torch.randn(2, 4))


def test_loading_ignores_the_cache_dir_it_was_built_with(tmp_path):
    cache = tmp_path / "ov-cache"
    compiled = compile_quietly(MLP, torch.randn(2, 4), backend="openvino", backend_options={"cache_dir": str(cache)})
    directory = compiled.save(tmp_path / "artifact")
    before = sorted(p.name for p in cache.rglob("*")) if cache.exists() else []
    torchkiln.load(directory)(torch.randn(2, 4))
    assert (sorted(p.name for p in cache.rglob("*")) if cache.exists() else []) == before


def test_auto_and_kiln_bench_offer_openvino(tmp_path, capsys):
    entry = models.get("mlp")
    compiled = compile_quietly(entry.build(), entry.example_inputs(), backend="auto",
                               backend_options={"candidates": "openvino,onnxruntime", "runs": 4})  # fmt: skip
    by_label = {c.label: c for c in compiled.report.candidates}
    assert set(by_label) == {"openvino", "onnxruntime"}
    for record in by_label.values():
        assert record.verdict in ("chosen", "slower") and record.latency_spread_ms is not None
        low, high = record.latency_spread_ms
        assert low <= record.latency_ms <= high
    assert "p10" in compiled.report.table()
    capsys.readouterr()
    assert main(["bench", "mlp", "--runtimes", "openvino-fp32,ort-fp32", "--runs", "5", "--json", "--quiet"]) == 0
    rows = {row["runtime"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["openvino-fp32"]["latency"]["p50"] > 0 and rows["openvino-fp32"]["size_mb"], rows


@pytest.fixture(scope="module")
def llama():
    """A Llama with grouped heads compiled with its cache from one prompt (batch 1) on OpenVINO; opset
    18 by default (OpenVINO 2026.4 could not compile opset 23's Attention over such a cache)."""
    pytest.importorskip("transformers")
    lm = tiny_llama()
    prompt = torch.randint(3, 128, (1, 6))
    return lm, compile_quietly(lm, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, backend="openvino")


def stateful_steps(monkeypatch) -> list[int]:
    """Counts the steps run on OpenVINO's stateful form (the cache kept inside OpenVINO)."""
    return count_runs(monkeypatch, openvino_backend._StatefulSession)


def test_a_causal_lm_generates_like_transformers_with_its_cache_kept_inside_openvino(llama, monkeypatch):
    """Batch 2, then a left-padded batch, then one prompt: each generation starts from its own empty
    states (a batch of another size after it, too), every step on the stateful form."""
    lm, compiled = llama
    steps = stateful_steps(monkeypatch)
    generates_like(lm, compiled)
    assert len(steps) == 3 * 5  # the prompt and four decode steps, three times


def test_a_loaded_lm_keeps_its_cache_inside_openvino_and_the_option_turns_it_off(llama, tmp_path, monkeypatch):
    lm, compiled = llama
    ids = torch.randint(3, 128, (2, 5))
    expected = compiled.generate(ids, max_new_tokens=4)
    steps = stateful_steps(monkeypatch)
    loaded = torchkiln.load(compiled.save(tmp_path / "lm"))
    assert torch.equal(loaded.generate(ids, max_new_tokens=4), expected) and len(steps) == 4
    options = json.loads((tmp_path / "lm" / "manifest.json").read_text())["backend_options"]
    assert options["stateful_cache"] is True
    passed = torchkiln.load(tmp_path / "lm")
    passed.artifact.options = openvino_backend.OpenVinoOptions.from_mapping({**options, "stateful_cache": False})
    assert torch.equal(passed.generate(ids, max_new_tokens=4), expected) and len(steps) == 4  # cache passed in and out


def test_cache_pairs_that_do_not_fit_the_ir_are_a_clear_error(saved):
    artifact = torchkiln.load(saved).artifact
    with pytest.raises(BackendError, match="do not fit"):
        artifact.cache_session([(0, 5)], [torch.zeros(1)], 8)
