"""``kiln compare`` / ``compare_artifact``: a deliberately broken layer is found and named, a
faithful artifact passes (fp32 and int8), folded BatchNorms and reused modules are paired right."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.conftest import SWEEP_ZOO, compile_quietly
from torchkiln import Tolerance, models
from torchkiln.cli import main
from torchkiln.workflows.compare import compare_artifact


def zoo(name: str):
    entry = models.get(name)
    return entry.build().eval(), entry.example_inputs(), entry


def broken(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """A copy of ``model`` with one layer's weights scaled by 1.5: what a bad rewrite looks like."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        copy_.get_submodule(layer).weight.mul_(1.5)
    return copy_


def test_a_broken_layer_is_found_and_named():
    model, inputs, entry = zoo("resnet")
    artifact = compile_quietly(broken(model, "layer2.0.conv2"), inputs, dynamic_axes=entry.dynamic_axes)
    result = compare_artifact(model, artifact, inputs)
    assert not result.passed
    first = result.first_failure
    assert first.module == "layer2.0.conv2" and first.fused == ["layer2.0.bn2"] and first.onnx_node == "layer2.0.conv2/Conv"
    assert "first layer over the tolerance: layer2.0.conv2 (+ layer2.0.bn2)" in result.summary()
    # Everything before it agrees, including modules called twice and folded BatchNorms.
    before = result.layers[: result.layers.index(first)]
    assert before and all(layer.passed for layer in before)
    assert any(layer.module == "layer1.0.relu" and layer.call == 1 for layer in before)
    assert "layer1.0.bn1" in result.unmapped


def test_a_faithful_artifact_passes_every_module():
    model, inputs, entry = zoo("resnet")
    result = compare_artifact(model, compile_quietly(model, inputs), inputs)
    assert result.passed and result.first_failure is None
    assert len(result.layers) >= 30 and all(layer.passed for layer in result.layers)


@pytest.mark.parametrize("name", SWEEP_ZOO)
def test_every_zoo_model_agrees_module_by_module(name):
    # A folded BN whose successor has another shape (mobilenet's last conv before the pooling)
    # once crashed the pairing; every module output that maps must agree for a faithful artifact.
    model, inputs, entry = zoo(name)
    artifact = compile_quietly(model, inputs, dynamic_axes=entry.dynamic_axes)
    result = compare_artifact(model, artifact, inputs)
    assert result.passed, result.summary()
    assert any(layer.passed for layer in result.layers)


def test_an_int8_artifact_is_judged_by_cosine_and_a_broken_layer_still_shows():
    model, inputs, entry = zoo("digits_cnn")
    calibration = [entry.example_inputs(seed=s) for s in range(8)]
    passes = "cleanup,fold_batchnorm,quantize"
    good = compile_quietly(model, inputs, passes=passes, calibration_data=calibration)
    assert compare_artifact(model, good, inputs, Tolerance(min_cosine=0.99)).passed
    by_default = compare_artifact(model, good, inputs)  # the artifact's own promise, from its report
    assert by_default.passed and by_default.tolerance == Tolerance(min_cosine=0.99)
    assert not compare_artifact(model, good, inputs, Tolerance()).passed  # int8 is not within fp32 bounds
    bad = compile_quietly(broken(model, "features.3.0"), inputs, passes=passes, calibration_data=calibration)
    result = compare_artifact(model, bad, inputs, Tolerance(min_cosine=0.99))
    assert result.first_failure.module == "features.3.0"


def test_the_cli_names_the_layer_and_exits_1(tmp_path, capsys):
    model, inputs, entry = zoo("resnet")
    compile_quietly(broken(model, "layer3.0.conv1"), inputs).save(tmp_path / "bad")
    compile_quietly(model, inputs).save(tmp_path / "good")
    assert main(["compare", "resnet", str(tmp_path / "bad")]) == 1
    assert "first layer over the tolerance: layer3.0.conv1 (+ layer3.0.bn1)" in capsys.readouterr().out
    assert main(["compare", "resnet", str(tmp_path / "good"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["first_failure"] is None and report["layers"]


def test_the_cli_compares_an_int8_artifact_at_its_promise_by_default(tmp_path, capsys):
    model, inputs, entry = zoo("digits_cnn")
    calibration = [entry.example_inputs(seed=s) for s in range(8)]
    compile_quietly(model, inputs, passes="cleanup,quantize", calibration_data=calibration).save(tmp_path / "q")
    assert main(["compare", "digits_cnn", str(tmp_path / "q"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tolerance"] == "cosine similarity >= 0.99"
    assert main(["compare", "digits_cnn", str(tmp_path / "q"), "--atol", "1e-5"]) == 1  # asked for fp32 bounds


def test_a_tolerance_reads_back_what_it_wrote():
    from torchkiln.errors import ConfigError

    for tolerance in (Tolerance(), Tolerance(min_cosine=0.99), Tolerance(atol=0.5, rtol=2e-3)):
        assert Tolerance.parse(str(tolerance)) == tolerance
    with pytest.raises(ConfigError, match="not a tolerance"):
        Tolerance.parse("close enough")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min-cosine", "0.9", "--atol", "1"], "either --min-cosine or --atol/--rtol"),
        (["--weights", "missing.pt"], "cannot load weights"),
    ],
)
def test_cli_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    model, inputs, _ = zoo("mlp")
    compile_quietly(model, inputs).save(tmp_path / "a")
    assert main(["compare", "mlp", str(tmp_path / "a"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_torch_artifact_is_refused_with_a_clear_error(tmp_path, capsys):
    model, inputs, _ = zoo("mlp")
    compile_quietly(model, inputs, backend="torch").save(tmp_path / "a")
    assert main(["compare", "mlp", str(tmp_path / "a")]) == 2
    assert "compare needs an ONNX artifact; this one is 'torch'" in capsys.readouterr().err
