"""GPU deployment: TensorRT engine profiles and compatibility records (pure, tested everywhere),
the torch backend's placement options, clear errors without a GPU / TensorRT, and — on a machine
with them — engines and CUDA graphs checked against eager. GPU tests skip with the reason."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import torchkiln
from tests.conftest import compile_quietly
from torchkiln import models
from torchkiln.backends.tensorrt_profiles import (
    check_compatible,
    check_shape,
    device_record,
    parse_ranges,
    profile_shapes,
)
from torchkiln.compiler.program import TensorSpec
from torchkiln.errors import ArtifactError, BackendError, ConfigError

HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_tensorrt = pytest.mark.skipif(not (HAS_CUDA and HAS_TENSORRT), reason="needs TensorRT and a CUDA GPU")

SPECS = [TensorSpec("ids", ("batch", "sequence"), "int64"), TensorSpec("mask", ("batch", "sequence"), "int64"),
         TensorSpec("scale", (4,), "float32")]  # fmt: skip
TRACED = {"ids": (2, 16), "mask": (2, 16), "scale": (4,)}


def test_profiles_default_to_one_to_four_times_the_traced_size():
    shapes = profile_shapes(SPECS, TRACED, {})
    assert shapes == {"ids": ((1, 1), (2, 16), (8, 64)), "mask": ((1, 1), (2, 16), (8, 64))}


def test_profile_overrides_apply_to_every_input_with_that_axis():
    shapes = profile_shapes(SPECS, TRACED, parse_ranges(["batch=1:8:32", "sequence=16:128:512"]))
    assert shapes["ids"] == shapes["mask"] == ((1, 16), (8, 128), (32, 512))


@pytest.mark.parametrize(
    ("items", "message"),
    [(["batch"], "bad profile"), (["batch=1:2"], "bad profile"), (["batch=4:2:8"], "1 <= min <= opt <= max"),
     (["batch=0:1:2"], "1 <= min"), (["batch=a:b:c"], "bad profile")],
)  # fmt: skip
def test_bad_profiles(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_ranges(items)


def test_a_profile_for_an_axis_no_input_has():
    with pytest.raises(ConfigError, match="names axis width, which no input has"):
        profile_shapes(SPECS, TRACED, {"width": (1, 2, 3)})


def test_shapes_outside_the_profile_are_named():
    bounds = ((1, 1), (2, 16), (8, 64))
    assert check_shape("ids", (8, 64), bounds) is None
    assert check_shape("ids", (9, 16), bounds) == "input 'ids' has size 9 on axis 0, outside the engine's profile [1, 8]"


def test_an_engine_from_another_tensorrt_or_gpu_is_refused():
    built = device_record("10.3.0", "NVIDIA H200", (9, 0))
    check_compatible(built, device_record("10.3.0", "NVIDIA H100", (9, 0)), "model.engine")  # same architecture
    with pytest.raises(ArtifactError, match="built with TensorRT 10.3.0; this machine has 10.4.0"):
        check_compatible(built, device_record("10.4.0", "NVIDIA H200", (9, 0)), "model.engine")
    with pytest.raises(ArtifactError, match=r"built for NVIDIA H200 \(compute capability 9.0\); this GPU is NVIDIA A100 \(8.0\)"):
        check_compatible(built, device_record("10.3.0", "NVIDIA A100", (8, 0)), "model.engine")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"precision": "fp8"}, "must be some of"), ({"workspace_mb": 0}, "must be >= 1"),
     ({"optimization_level": 6}, r"in \[0, 5\]"), ({"profile": "batch=1:2"}, "bad profile")],
)  # fmt: skip
def test_tensorrt_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        torchkiln.backends.backend_options("tensorrt", options)


@pytest.mark.skipif(HAS_TENSORRT and HAS_CUDA, reason="TensorRT is usable here")
def test_the_tensorrt_backend_says_what_is_missing():
    with pytest.raises(BackendError, match="the tensorrt backend needs (TensorRT|CUDA device 0)"):
        compile_quietly(torch.nn.Linear(4, 2).eval(), torch.randn(1, 4), backend="tensorrt")


def test_torch_backend_in_bfloat16_round_trips_its_options(tmp_path):
    model, inputs = models.get("resnet").build().eval(), models.get("resnet").example_inputs()
    compiled = compile_quietly(model, inputs, backend="torch", backend_options={"dtype": "bfloat16"},
                               tolerance=torchkiln.Tolerance(min_cosine=0.999))  # fmt: skip
    assert compiled(**inputs).dtype == torch.float32 and compiled.report.artifact.cosine >= 0.999
    assert compiled.report.artifact.max_abs_error > 1e-4  # it really ran in bfloat16
    loaded = torchkiln.load(compiled.save(tmp_path / "a"))
    assert loaded.options.dtype == "bfloat16"
    torch.testing.assert_close(loaded(**inputs), compiled(**inputs))


def test_torch_backend_refuses_a_reduced_dtype_on_a_quantized_graph():
    entry = models.get("mlp")
    model, inputs = entry.build().eval(), entry.example_inputs()
    with pytest.raises(BackendError, match="dtype=float16 on a quantized graph"):
        compile_quietly(model, inputs, passes="quantize", calibration_data=[inputs] * 2, backend="torch",
                        backend_options={"dtype": "float16"})  # fmt: skip


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")
def test_torch_backend_on_cuda_without_a_gpu():
    with pytest.raises(BackendError, match="device=cuda, but torch sees no CUDA device"):
        compile_quietly(torch.nn.Linear(4, 2).eval(), torch.randn(1, 4), backend="torch", backend_options={"device": "cuda"})


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(ConfigError, match="cuda_graphs' needs device=cuda"):
        torchkiln.backends.backend_options("torch", {"cuda_graphs": True})


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["resnet", "text_encoder"])
def test_torch_backend_fp16_with_cuda_graphs_matches_eager(name):
    entry = models.get(name)
    model, inputs = entry.build().eval(), entry.example_inputs()
    compiled = compile_quietly(model, inputs, backend="torch", dynamic_axes=entry.dynamic_axes,
                               backend_options={"device": "cuda", "dtype": "float16", "cuda_graphs": True},
                               tolerance=torchkiln.Tolerance(min_cosine=0.999))  # fmt: skip
    again = compiled(**inputs)  # the second call replays the captured graph
    eager = model(**inputs)
    assert torch.nn.functional.cosine_similarity(again.flatten(), eager.flatten(), dim=0) >= 0.999


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("name", ["resnet", "text_encoder"])
def test_tensorrt_fp16_engine_runs_at_min_opt_and_max_batch(tmp_path, name):
    entry = models.get(name)
    model, inputs = entry.build().eval(), entry.example_inputs()
    compiled = compile_quietly(model, inputs, backend="tensorrt", dynamic_axes="batch",
                               backend_options={"precision": "fp16", "profile": "batch=1:4:8"},
                               tolerance=torchkiln.Tolerance(min_cosine=0.999))  # fmt: skip
    for batch in (1, 4, 8):
        batched = {k: torch.cat([v] * batch) for k, v in inputs.items()}
        got, want = compiled(**batched), model(**batched)
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) >= 0.999
    with pytest.raises(torchkiln.InputError, match="outside the engine's profile"):
        compiled(**{k: torch.cat([v] * 9) for k, v in inputs.items()})
    assert any("layer precisions" in note for note in compiled.report.artifact.notes)
    loaded = torchkiln.load(compiled.save(tmp_path / "engine"))
    torch.testing.assert_close(loaded(**inputs), compiled(**inputs))


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_int8_from_qdq_matches_eager():
    entry = models.get("resnet")
    model, inputs = entry.build().eval(), entry.example_inputs()
    calibration = [entry.example_inputs(seed=s) for s in range(8)]
    compiled = compile_quietly(model, inputs, passes="cleanup,fold_batchnorm,quantize:target=tensorrt",
                               calibration_data=calibration, backend="tensorrt",
                               backend_options={"precision": "fp16|int8"})  # fmt: skip
    assert compiled.report.artifact.cosine >= 0.99
    assert any("int8" in note for note in compiled.report.artifact.notes)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("name", "dtype"), [("resnet", "bfloat16"), ("text_encoder", "float32")])
def test_inductor_on_cuda_matches_eager_and_reloads(tmp_path, name, dtype):
    entry = models.get(name)
    model, inputs = entry.build().eval(), entry.example_inputs()
    compiled = compile_quietly(model, inputs, backend="inductor", dynamic_axes="batch",
                               backend_options={"device": "cuda", "dtype": dtype},
                               tolerance=torchkiln.Tolerance(min_cosine=0.999) if dtype != "float32" else None)  # fmt: skip
    batched = {k: torch.cat([v] * 3) for k, v in inputs.items()}
    got, want = compiled(**batched), model(**batched)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) >= 0.999
    directory = compiled.save(tmp_path / "package")
    record = (directory / "inductor.json").read_text()
    assert '"cuda_capability"' in record
    torch.testing.assert_close(torchkiln.load(directory)(**inputs), compiled(**inputs))


@pytest.mark.gpu
@needs_cuda
def test_auto_on_a_gpu_machine_lists_the_cuda_candidates():
    entry = models.get("resnet")
    model, inputs = entry.build().eval(), entry.example_inputs()
    compiled = compile_quietly(model, inputs, backend="auto", tolerance=torchkiln.Tolerance(min_cosine=0.999),
                               backend_options={"candidates": "onnxruntime,torch-cuda-fp16,inductor-cuda", "runs": 20})  # fmt: skip
    verdicts = {c.label: c.verdict for c in compiled.report.candidates}
    assert set(verdicts) == {"onnxruntime", "torch-cuda-fp16", "inductor-cuda"}
    assert list(verdicts.values()).count("chosen") == 1
