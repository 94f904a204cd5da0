"""compile() / CompiledModel / load(): structures, verification, saving, and every bad input."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import compile_quietly
from torch import nn

import torchkiln
from torchkiln import models
from torchkiln.compiler.passes import Pass, PassResult
from torchkiln.errors import ArtifactError, ConfigError, InputError, VerificationError

BACKENDS = ["torch", "onnx", "onnxruntime"]


class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, x, y):
        return {"sum": self.a(x) + self.b(y), "parts": [self.a(x), (self.b(y),)]}


def assert_same_structure(actual, expected):
    assert type(actual) is type(expected)
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same_structure(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same_structure(a, e)
    else:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_keep_their_structure_through_save_and_load(backend, tmp_path):
    model = Structured().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    compiled = compile_quietly(model, (x, y), backend=backend, dynamic_axes="batch")
    x3, y3 = torch.randn(3, 4), torch.randn(3, 5)
    expected = model(x3, y3)
    assert_same_structure(compiled(x3, y3), expected)
    loaded = torchkiln.load(compiled.save(tmp_path / "artifact"))
    assert_same_structure(loaded(x3, y=y3), expected)
    assert loaded.backend == backend and loaded.passes == ["cleanup", "fold_batchnorm"]
    assert loaded.report.to_dict() == compiled.report.to_dict()


def test_manifest_records_specs_versions_and_checksums(tmp_path):
    entry = models.get("text_encoder")
    compiled = compile_quietly(entry.build(), entry.example_inputs(), dynamic_axes=entry.dynamic_axes)
    manifest = json.loads((compiled.save(tmp_path / "a") / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"}]
    assert {"python", "torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert set(manifest["files"]) == {"model.onnx"} and len(manifest["files"]["model.onnx"]) == 64
    assert manifest["backend_options"]["opset"] == 18


def test_user_model_is_unchanged_by_compile():
    model = models.build("resnet")
    before = copy.deepcopy(model.state_dict())
    compile_quietly(model, torch.randn(1, 3, 32, 32), backend="torch")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 12


def test_report_has_passes_sizes_errors_and_latency():
    compiled = torchkiln.compile(models.build("mlp"), torch.randn(1, 64), latency_runs=3)
    report = compiled.report
    assert [p.name for p in report.passes] == ["cleanup", "fold_batchnorm"]
    art = report.artifact
    assert art.file_bytes > 0 and art.eager_ms > 0 and art.artifact_ms > 0
    assert art.max_abs_error <= 1e-5 and "rtol=0.0001" in art.tolerance
    assert "latency" in report.table()


class Perturb(Pass):
    """A lossy pass: the manager measures it; the artifact then differs from eager."""

    name = "test_perturb"
    lossless = False

    def run(self, program):
        with torch.no_grad():
            for p in program.graph_module.parameters():
                p.add_(0.05)
        return PassResult(modified=True)


def test_verification_error_names_tolerance_and_error():
    with pytest.raises(VerificationError) as info:
        compile_quietly(models.build("mlp"), torch.randn(1, 64), passes=[Perturb()], backend="torch")
    message = str(info.value)
    assert "the torch artifact differs from the eager model" in message
    assert "max abs error" in message and "allowed by the tolerance (atol=1e-05 + rtol=0.0001" in message


def test_verify_false_reports_instead():
    compiled = compile_quietly(
        models.build("mlp"), torch.randn(1, 64), passes=[Perturb()], backend="torch", verify=False
    )
    assert compiled.report.artifact.max_abs_error > 1e-3


def test_looser_tolerance_accepts():
    tolerance = torchkiln.Tolerance(atol=1e3, rtol=0.0)
    compiled = compile_quietly(
        models.build("mlp"), torch.randn(1, 64), passes=[Perturb()], backend="torch", tolerance=tolerance
    )
    assert compiled.report.artifact.tolerance.startswith("atol=1000")


@pytest.fixture(scope="module")
def structured():
    return compile_quietly(Structured().eval(), (torch.randn(2, 4), torch.randn(2, 5)), backend="torch")


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((torch.randn(2, 4),), {}, "missing input"),
        ((torch.randn(2, 4), torch.randn(2, 5), torch.randn(1)), {}, "at most 2 positional"),
        ((torch.randn(2, 4),), {"z": torch.randn(2, 5)}, "unexpected input 'z'"),
        ((torch.randn(2, 4), torch.randn(2, 5)), {"x": torch.randn(2, 4)}, "given both"),
        ((torch.randn(2, 4), torch.randn(3, 5)), {}, r"'y' has shape \[3, 5\], expected \[2, 5\]"),
        ((torch.randn(2, 4), torch.randn(2, 5, 1)), {}, "has shape"),
        ((torch.randn(2, 4).double(), torch.randn(2, 5)), {}, "dtype float64, expected float32"),
        (([[1.0] * 4] * 2, torch.randn(2, 5)), {}, "must be a torch.Tensor"),
    ],
)
def test_bad_call_inputs(structured, args, kwargs, message):
    with pytest.raises(InputError, match=message):
        structured(*args, **kwargs)


def test_static_shape_error_suggests_dynamic_axes(structured):
    with pytest.raises(InputError) as info:
        structured(torch.randn(5, 4), torch.randn(5, 5))
    assert "dynamic_axes" in info.value.hint


@pytest.fixture
def saved(tmp_path):
    compiled = compile_quietly(nn.Linear(4, 2), torch.randn(1, 4))
    return compiled, compiled.save(tmp_path / "artifact")


def _edit_manifest(directory, **changes):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "unreadable or corrupt"),
        (lambda d: (d / "manifest.json").write_text("[]"), "not a torchkiln manifest"),
        (lambda d: _edit_manifest(d, format_version=99), "format version 99 is not supported"),
        (lambda d: _edit_manifest(d, passes=None, report=None) or _drop_key(d, "inputs"), "lacks inputs"),
        (lambda d: (d / "model.onnx").unlink(), "model.onnx is missing"),
        (lambda d: _truncate(d / "model.onnx"), "does not match its manifest checksum"),
        (lambda d: _edit_manifest(d, backend="tvm"), "invalid: unknown backend 'tvm'"),
        (lambda d: _edit_manifest(d, backend_options={"opset": "x"}), "invalid"),
        (lambda d: _edit_manifest(d, out_spec="garbage"), "invalid"),
    ],
)
def test_corrupt_artifact_directory(saved, corrupt, message):
    _, directory = saved
    corrupt(directory)
    with pytest.raises(ArtifactError, match=message):
        torchkiln.load(directory)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_key(directory, key):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest[key]
    path.write_text(json.dumps(manifest))


def test_corrupt_model_with_matching_checksum_is_an_artifact_error(saved):
    from torchkiln.compiler.files import sha256

    _, directory = saved
    (directory / "model.onnx").write_bytes(b"not an onnx model")
    _edit_manifest(directory, files={"model.onnx": sha256(directory / "model.onnx")})
    with pytest.raises(ArtifactError, match="cannot load model.onnx"):
        torchkiln.load(directory)


def test_load_of_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="is not a directory"):
        torchkiln.load(tmp_path / "nope")


def test_save_into_unwritable_place_leaves_nothing(saved, tmp_path):
    compiled, _ = saved
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="cannot write to"):
        compiled.save(blocker / "artifact")
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        compiled.save(blocker)
    assert blocker.read_text() == "x"


def test_failed_save_keeps_the_previous_artifact(saved, monkeypatch):
    compiled, directory = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def half_write(target):
        (target / "model.onnx").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(compiled.artifact, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        compiled.save(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(os.listdir(directory.parent)) == ["artifact"]  # no staging directory left
    torchkiln.load(directory)


def test_resave_replaces_atomically(saved):
    compiled, directory = saved
    (directory / "stale.txt").write_text("old")
    compiled.save(directory)
    assert not (directory / "stale.txt").exists()
    assert sorted(os.listdir(directory.parent)) == ["artifact"]


def test_unknown_pass_fails_before_any_work():
    with pytest.raises(ConfigError, match="unknown pass 'fuse_everything'"):
        compile_quietly(nn.Linear(4, 2), torch.randn(1, 4), passes="cleanup,fuse_everything")


class NamedOut(nn.Module):
    Out = __import__("collections").namedtuple("Out", "logits features")

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.Out(self.fc(x), x)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_namedtuple_output_is_kept_and_saved_as_a_tuple(frontend, tmp_path):
    model = NamedOut().eval()
    compiled = compile_quietly(model, torch.randn(1, 4), backend="torch", frontend=frontend)
    x = torch.randn(1, 4)
    out = compiled(x)
    assert type(out) is NamedOut.Out
    torch.testing.assert_close(out.logits, model(x).logits)
    loaded = torchkiln.load(compiled.save(tmp_path / "a"))
    again = loaded(x)
    assert type(again) is tuple and len(again) == 2  # the class cannot be named in the manifest
    torch.testing.assert_close(again[0], model(x).logits)
