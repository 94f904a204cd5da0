"""compile() / CompiledModel / load(): structures, verification, saving, and every bad input."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import Perturb, compile_quietly
from torch import nn

import torchkiln
from torchkiln import Tolerance, models
from torchkiln.errors import VerificationError

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
    assert manifest["inputs"] == [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64",
                                   "range": [0, 1000], "range_source": "embedding 'embed' (1000 rows)"}]  # fmt: skip
    assert {"python", "torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert set(manifest["files"]) == {"model.onnx"} and len(manifest["files"]["model.onnx"]) == 64
    assert manifest["backend_options"]["opset"] == 23


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


def test_verification_error_names_tolerance_and_error():
    # Perturb promises nothing, so only an explicit tolerance holds the artifact to eager
    with pytest.raises(VerificationError) as info:
        compile_quietly(
            models.build("mlp"), torch.randn(1, 64), passes=[Perturb()], backend="torch", tolerance=Tolerance()
        )
    message = str(info.value)
    assert "the torch artifact differs from the eager model" in message
    assert "max abs error" in message and "allowed by the tolerance (atol=1e-05 + rtol=0.0001" in message


def test_without_a_promise_the_artifact_is_held_to_the_rewritten_graph(monkeypatch):
    compiled = compile_quietly(models.build("mlp"), torch.randn(1, 64), passes=[Perturb()], backend="torch")
    assert compiled.report.artifact.max_abs_error > 1e-3  # measured against eager, not enforced
    assert "against the rewritten graph" in compiled.report.artifact.tolerance
    from torchkiln.backends.torch_backend import TorchArtifact

    original = TorchArtifact.run
    monkeypatch.setattr(TorchArtifact, "run", lambda self, inputs: [o + 1e-2 for o in original(self, inputs)])
    with pytest.raises(VerificationError, match="differs from the rewritten graph"):
        compile_quietly(models.build("mlp"), torch.randn(1, 64), passes=[Perturb()], backend="torch")


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


class Options(nn.Module):
    """A forward with non-tensor arguments, as Hugging Face models have (use_cache, return_dict)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale_output=True, scale=1.0, mode="plain", extra=None):
        out = self.fc(x)
        if scale_output:
            out = out * scale
        if mode == "shifted":
            out = out + 1
        return out if extra is None else out + extra


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_non_tensor_example_inputs_are_constants_of_the_artifact(frontend, backend, tmp_path):
    from torchkiln.errors import InputError

    model = Options().eval()
    constants = {"scale_output": False, "scale": 3.0, "mode": "shifted"}
    compiled = compile_quietly(
        model, {"x": torch.randn(2, 4), **constants}, frontend=frontend, backend=backend, dynamic_axes="batch"
    )
    assert "constants baked into the graph: scale_output=False, scale=3.0, mode='shifted'" in compiled.report.notes
    loaded = torchkiln.load(compiled.save(tmp_path / "a"))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["constants"] == constants and loaded.constants == constants
    x = torch.randn(3, 4)
    expected = model(x, **constants)
    for artifact in (compiled, loaded):
        torch.testing.assert_close(artifact(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(artifact(x=x, mode="shifted", scale_output=False), expected, atol=1e-5, rtol=1e-4)
        for other in ({"scale_output": True}, {"mode": "plain"}, {"scale": 3}):  # 3 is an int, not 3.0
            with pytest.raises(InputError, match=f"'{next(iter(other))}' was compiled as the constant"):
                artifact(x, **other)


def test_constants_reach_calibration_and_held_back_checks():
    model = Options().eval()
    batches = [{"x": torch.randn(4, 4), "mode": "shifted"} for _ in range(8)]
    compiled = compile_quietly(
        model, {"x": torch.randn(4, 4), "mode": "shifted"}, passes="quantize", calibration_data=batches
    )
    record = compiled.report.artifact
    assert record.held_back_batches == 1 and record.held_back_cosine > 0.99
    from torchkiln.errors import InputError

    with pytest.raises(InputError, match="calibration batch 0: input 'mode' was compiled as the constant"):
        compile_quietly(
            model, {"x": torch.randn(4, 4), "mode": "shifted"}, passes="quantize",
            calibration_data=[{"x": torch.randn(4, 4), "mode": "plain"}] * 2,
        )  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_model_left_in_training_mode_compiles_its_eval_copy_and_says_so(backend):
    """It failed with 'the <backend> artifact differs ... compare the backends' (dropout drew fresh
    masks in the eager reference), even on the exact torch backend."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    x = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match=r"training mode; compiled its eval\(\) copy .*1 \(BatchNorm1d\), 2 \(Dropout\)"):
        compiled = compile_quietly(model, x, backend=backend)
    assert model.training and all(m.training for m in model.modules())  # the user's model is left as it was
    statistics = bn.running_mean.clone()
    torch.testing.assert_close(compiled(x), model.eval()(x), atol=1e-5, rtol=1e-4)
    assert torch.equal(bn.running_mean, statistics)
    assert compiled.report.table().splitlines()[0].endswith("from its eval() copy: the model was in training mode")
    assert "2 mode-dependent layer(s)" in compiled.report.eval_copy


def test_a_model_in_eval_mode_compiles_without_the_note():
    model, x = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.5)).eval(), torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = compile_quietly(model, x, backend="torch")
    assert compiled.report.eval_copy == "" and "training mode" not in compiled.report.table()


def test_a_tolerance_of_zero_demands_bit_exact_outputs():
    """atol=0, rtol=0 divided by zero inside the first pass's check (a PassError wrapping ZeroDivisionError)."""
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), torch.randn(2, 4)
    exact = compile_quietly(model, x, passes=["cleanup"], backend="torch", tolerance=Tolerance(atol=0, rtol=0))
    assert torch.equal(exact(x), model(x))
    from torchkiln.compiler.verify import compare

    y = model(x).detach()
    assert compare([y], [y.clone()], Tolerance(atol=0, rtol=0)).within()
    assert not compare([y.nextafter(y + 1)], [y], Tolerance(atol=0, rtol=0)).within()  # one ulp is an error


@pytest.mark.parametrize("stages", [2.0, True, "2", 0])
def test_partition_stages_must_be_an_integer(stages):
    from torchkiln.errors import ConfigError

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(ConfigError, match="stages must be an integer >= 1"):
        torchkiln.partition(model, {"input": torch.randn(2, 4)}, stages=stages)
