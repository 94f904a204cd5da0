"""Bad input over every public entry point: compile, trace, calling a compiled model, save, load
and every CLI command. Each case must raise a typed KilnError (the CLI: exit 1 or 2 with one line,
never 3 = internal error) and leave no partial artifact behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compile_quietly
from torch import nn

import torchkiln
from torchkiln.cli import main
from torchkiln.compiler.files import sha256
from torchkiln.errors import ArtifactError, BackendError, ConfigError, InputError, TraceError


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


class ReturnsInt(nn.Module):
    def forward(self, x):
        return x, 3


def nan_at(shape, index=0, value=float("nan")):
    t = torch.randn(shape)
    t.view(-1)[index] = value
    return t


X, Y = torch.randn(2, 4), torch.randn(2, 5)
LINEAR = nn.Linear(4, 2)


def _failing_loader():
    """A data loader whose second read fails, as a flaky network file system does."""
    yield torch.randn(2, 4)
    raise OSError(5, "Input/output error", "/data/shard-7.bin")

COMPILE_CASES = [
    # (id, model, example inputs, compile keyword arguments, error type, message)
    ("model-not-a-module", lambda x: x, X, {}, TraceError, "expected a torch.nn.Module"),
    ("inputs-wrong-type", LINEAR, "not a tensor", {}, InputError, "must be a tensor"),
    ("inputs-non-tensor-element", TwoInputs(), (X, [1, 2]), {}, InputError, r"'y' is \[1, 2\] \(list\)"),
    ("inputs-constant-nan", TwoInputs(), (X, float("nan")), {}, InputError, r"constant \(bool, int, finite float"),
    ("inputs-constant-breaks-model", TwoInputs(), (X, 3), {}, InputError, "fails on the example inputs"),
    ("inputs-too-many", TwoInputs(), (X, Y, Y), {}, InputError, "do not fit"),
    ("inputs-unknown-keyword", TwoInputs(), {"x": X, "z": Y}, {}, InputError, "'z' is not a parameter"),
    ("inputs-wrong-shape", LINEAR, torch.randn(2, 7), {}, InputError, "fails on the example inputs"),
    (
        "inputs-wrong-dtype",
        LINEAR,
        torch.ones(2, 4, dtype=torch.int64),
        {},
        InputError,
        "fails on the example inputs",
    ),
    ("inputs-nan", LINEAR, nan_at((2, 4)), {}, InputError, "'input' contains NaN or Inf"),
    ("inputs-inf", LINEAR, nan_at((2, 4), 3, float("inf")), {}, InputError, "contains NaN or Inf"),
    ("output-not-a-tensor", ReturnsInt(), X, {}, TraceError, r"output\[1\] is a int"),
    ("unknown-pass", LINEAR, X, {"passes": "cleanup,fuse_all"}, ConfigError, "unknown pass 'fuse_all'"),
    ("unknown-pass-option", LINEAR, X, {"passes": "cleanup:fold=1"}, ConfigError, "unknown option 'fold'"),
    ("bad-pass-value", LINEAR, X, {"passes": "cleanup:max_constant_bytes=-5"}, ConfigError, "must be >= 0"),
    ("pass-not-a-spec", LINEAR, X, {"passes": [3]}, ConfigError, "must be a spec string, a Pass or"),
    ("unknown-backend", LINEAR, X, {"backend": "tvm"}, ConfigError, "unknown backend 'tvm'"),
    (
        "unknown-backend-option",
        LINEAR,
        X,
        {"backend_options": {"threads": 2}},
        ConfigError,
        "unknown option 'threads'",
    ),
    ("bad-backend-option", LINEAR, X, {"backend_options": {"opset": "new"}}, ConfigError, "expected int"),
    ("unknown-frontend", LINEAR, X, {"frontend": "jit"}, ConfigError, "unknown frontend 'jit'"),
    (
        "dynamic-unknown-input",
        LINEAR,
        X,
        {"dynamic_axes": {"nope": [0]}},
        ConfigError,
        "unknown input 'nope'",
    ),
    ("dynamic-axis-range", LINEAR, X, {"dynamic_axes": {"input": [2]}}, ConfigError, "out of range"),
    ("dynamic-bad-string", LINEAR, X, {"dynamic_axes": "sequence"}, ConfigError, "not understood"),
    # quantization: calibration data and options
    ("calibration-missing", LINEAR, X, {"passes": "quantize"}, InputError, "needs calibration data"),
    ("calibration-empty", LINEAR, X, {"passes": "quantize", "calibration_data": []}, InputError, "is empty"),
    (
        "calibration-not-iterable",
        LINEAR,
        X,
        {"passes": "quantize", "calibration_data": 5},
        InputError,
        "must be an iterable of input batches",
    ),
    (
        "calibration-wrong-shape",
        LINEAR,
        X,
        {"passes": "quantize", "calibration_data": [X, torch.randn(2, 5)]},
        InputError,
        r"calibration batch 1: input 'input' has shape \[2, 5\], expected \[2, 4\]",
    ),
    (
        "calibration-wrong-dtype",
        LINEAR,
        X,
        {"passes": "quantize", "calibration_data": [X.double()]},
        InputError,
        "calibration batch 0: input 'input' has dtype float64",
    ),
    (
        "calibration-with-labels",
        LINEAR,
        X,
        {"passes": "quantize", "calibration_data": [(X, torch.zeros(2))]},
        InputError,
        "calibration batch 0: expected at most 1 positional inputs",
    ),
    (
        "calibration-nan",
        LINEAR,
        X,
        {"passes": "quantize", "calibration_data": [nan_at((2, 4))]},
        InputError,
        "contains NaN or Inf",
    ),
    ("unknown-calibrator", LINEAR, X, {"passes": "quantize:calibrator=kl"}, ConfigError, "'kl' is not one of"),
    ("unknown-quantize-mode", LINEAR, X, {"passes": "quantize:mode=int2"}, ConfigError, "is not one of"),
    ("bad-bits", LINEAR, X, {"passes": "quantize:mode=weight_only,bits=2"}, ConfigError, "is not one of"),
    (
        "bad-block-size",
        LINEAR,
        X,
        {"passes": "quantize:mode=weight_only,block_size=24"},
        ConfigError,
        "a power of 2",
    ),
    (
        "option-of-another-mode",
        LINEAR,
        X,
        {"passes": "quantize:mode=dynamic,calibrator=entropy"},
        ConfigError,
        "'calibrator' applies to mode=int8 only, not mode=dynamic",
    ),
    ("bad-percentile", LINEAR, X, {"passes": "quantize:percentile=20"}, ConfigError, r"in \(50, 100\]"),
    ("bad-max-error", LINEAR, X, {"passes": "quantize:max_error=0"}, ConfigError, "must be > 0"),
    ("bf16-on-onnxruntime", LINEAR, X, {"passes": "quantize:mode=bf16"}, BackendError, "bfloat16"),
    # compression passes
    ("prune-ratio-out-of-range", LINEAR, X, {"passes": "prune:ratio=1.5"}, ConfigError, r"in \[0, 1\)"),
    ("prune-2-4-with-ratio", LINEAR, X, {"passes": "prune:pattern=2:4,ratio=0.3"}, ConfigError, "leave ratio unset"),
    ("prune-round-to", LINEAR, X, {"passes": "prune:structured=true,round_to=0"}, ConfigError, "must be >= 1"),
    ("lowrank-energy", LINEAR, X, {"passes": "lowrank:energy=0"}, ConfigError, r"in \(0, 1\]"),
    ("cluster-too-few", LINEAR, X, {"passes": "cluster:clusters=1"}, ConfigError, "between 2 and 256"),
    ("distill-without-data", LINEAR, X, {"passes": "distill"}, InputError, "distill needs training data"),
    # non-finite numbers turn range checks off (`nan < 0` is False): every float option refuses them
    ("distill-temperature-nan", LINEAR, X, {"passes": "distill:temperature=nan", "train_data": [X]}, ConfigError,
     "must be a finite number"),
    ("prune-ratio-nan", LINEAR, X, {"passes": "prune:ratio=nan"}, ConfigError, "must be a finite number"),
    ("lowrank-energy-inf", LINEAR, X, {"passes": "lowrank:energy=inf"}, ConfigError, "must be a finite number"),
    ("percentile-nan", LINEAR, X, {"passes": "quantize:percentile=nan"}, ConfigError, "must be a finite number"),
    ("promise-nan", LINEAR, X, {"passes": "quantize:min_cosine=nan"}, ConfigError, "must be a finite number"),
    # arguments of the wrong kind
    ("backend-options-a-string", LINEAR, X, {"backend_options": "opset=19"}, ConfigError,
     "backend_options must be a mapping"),
    ("passes-a-number", LINEAR, X, {"passes": 5}, ConfigError, "passes must be a pipeline string"),
    ("pass-options-never-re-split", LINEAR, X, {"passes": [("prune", {"ratio": "0.1,structured=true"})]},
     ConfigError, "expected float, got '0.1,structured=true'"),
    ("dynamic-axes-a-number", LINEAR, X, {"dynamic_axes": 0}, ConfigError, "dynamic_axes must be"),
    ("dynamic-axis-a-name", LINEAR, X, {"dynamic_axes": {"input": ["a"]}}, ConfigError, "non-integer axis"),
    ("inputs-meta", LINEAR, torch.randn(2, 4, device="meta"), {}, InputError, "is a meta tensor"),
    ("inputs-sparse", LINEAR, X.to_sparse(), {}, InputError, "is a sparse_coo tensor"),
    ("inputs-empty", LINEAR, torch.randn(0, 4), {}, InputError, "has no elements"),
    ("calibration-empty-batch", LINEAR, X, {"passes": "quantize", "dynamic_axes": "batch",
     "calibration_data": [X, torch.randn(0, 4)]}, InputError, "calibration batch 1: input 'input' has no elements"),
    ("distill-empty-data", LINEAR, X, {"passes": "distill", "train_data": []}, InputError, "is empty"),
    # issue 41: the Python API checks what the CLI checks
    ("calibration-iterator-raises", LINEAR, X, {"passes": "quantize", "calibration_data": _failing_loader()},
     InputError, "calibration_data: reading batch 1 failed: OSError: .Errno 5. Input/output error"),
    ("block-size-wider-than-every-layer", nn.Linear(64, 128), torch.randn(2, 64),
     {"passes": "quantize:mode=weight_only,block_size=1048576"}, ConfigError,
     "block_size=1048576 is wider than every layer it would quantize .the widest has 64 inputs.: each row would be padded 16,384x"),
]  # fmt: skip


@pytest.mark.parametrize("case", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compile(case):
    _, model, inputs, kwargs, error, message = case
    with pytest.raises(error, match=message):
        compile_quietly(model, inputs, **kwargs)


TRACE_CASES = [c for c in COMPILE_CASES if set(c[3]) <= {"frontend", "dynamic_axes"}]


@pytest.mark.parametrize("case", TRACE_CASES, ids=[c[0] for c in TRACE_CASES])
def test_trace(case):
    _, model, inputs, kwargs, error, message = case
    with pytest.raises(error, match=message):
        torchkiln.trace(model, inputs, **kwargs)


@pytest.fixture(scope="module")
def two_inputs():
    return compile_quietly(TwoInputs().eval(), (X, Y), backend="torch")


CALL_CASES = [
    ("missing", (X,), {}, "missing input"),
    ("too-many", (X, Y, Y), {}, "at most 2 positional"),
    ("unknown-name", (X,), {"z": Y}, "unexpected input 'z'"),
    ("twice", (X, Y), {"x": X}, "given both"),
    ("wrong-size", (X, torch.randn(3, 5)), {}, r"'y' has shape \[3, 5\], expected \[2, 5\]"),
    ("wrong-rank", (X, torch.randn(2, 5, 1)), {}, "has shape"),
    ("wrong-dtype", (X.double(), Y), {}, "dtype float64, expected float32"),
    ("not-a-tensor", ([[1.0] * 4] * 2, Y), {}, "must be a torch.Tensor"),
    ("meta-tensor", (X.to("meta"), Y), {}, "is a meta tensor"),
    ("sparse-tensor", (X.to_sparse(), Y), {}, "is a sparse_coo tensor"),
]


@pytest.mark.parametrize("case", CALL_CASES, ids=[c[0] for c in CALL_CASES])
def test_calling_a_compiled_model(two_inputs, case):
    _, args, kwargs, message = case
    with pytest.raises(InputError, match=message):
        two_inputs(*args, **kwargs)


def test_static_shape_error_suggests_dynamic_axes(two_inputs):
    with pytest.raises(InputError) as info:
        two_inputs(torch.randn(5, 4), torch.randn(5, 5))
    assert "dynamic_axes" in info.value.hint


def test_nan_at_call_time_propagates_like_eager(two_inputs):
    out = two_inputs(nan_at((2, 4)), Y)
    assert torch.isnan(out).any()  # the user's data: not an error, same as eager


@pytest.fixture
def saved(tmp_path):
    compiled = compile_quietly(nn.Linear(4, 2), torch.randn(1, 4))
    return compiled, compiled.save(tmp_path / "artifact")


def _edit_manifest(directory, **changes):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    for key in [k for k, v in changes.items() if v is ...]:
        del manifest[key]
    path.write_text(json.dumps(manifest))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _replace_model_keeping_checksum(directory):
    (directory / "model.onnx").write_bytes(b"not an onnx model")
    _edit_manifest(directory, files={"model.onnx": sha256(directory / "model.onnx")})


LOAD_CASES = [
    ("no-manifest", lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    ("manifest-not-json", lambda d: (d / "manifest.json").write_text("{not json"), "unreadable or corrupt"),
    ("manifest-truncated", lambda d: _truncate(d / "manifest.json"), "unreadable or corrupt"),
    ("manifest-not-ours", lambda d: (d / "manifest.json").write_text("[]"), "not a torchkiln manifest"),
    ("manifest-newer", lambda d: _edit_manifest(d, format_version=99), "format version 99 is not supported"),
    ("manifest-missing-key", lambda d: _edit_manifest(d, inputs=...), "lacks inputs"),
    ("model-missing", lambda d: (d / "model.onnx").unlink(), "model.onnx is missing"),
    ("model-truncated", lambda d: _truncate(d / "model.onnx"), "does not match its manifest checksum"),
    ("model-corrupt", _replace_model_keeping_checksum, "cannot load model.onnx"),
    ("unknown-backend", lambda d: _edit_manifest(d, backend="tvm"), "invalid: unknown backend 'tvm'"),
    ("bad-backend-option", lambda d: _edit_manifest(d, backend_options={"opset": "x"}), "invalid"),
    ("bad-output-spec", lambda d: _edit_manifest(d, out_spec="garbage"), "invalid"),
    ("bad-input-spec", lambda d: _edit_manifest(d, inputs=[{"name": "x"}]), "invalid"),
]


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_refuses_corrupt_artifacts(saved, case):
    _, corrupt, message = case
    _, directory = saved
    corrupt(directory)
    with pytest.raises(ArtifactError, match=message):
        torchkiln.load(directory)


@pytest.mark.parametrize("target", ["missing", "file"])
def test_load_of_something_that_is_not_an_artifact(tmp_path, target):
    path = tmp_path / target
    if target == "file":
        path.write_text("x")
    with pytest.raises(ArtifactError, match="is not a directory"):
        torchkiln.load(path)


def _can_create_in(directory: Path) -> bool:
    probe = directory / ".kiln-write-probe"
    try:
        probe.mkdir()
    except OSError:
        return False
    probe.rmdir()
    return True


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process cannot create entries in: a 0500 directory, or for root (whom
    permissions do not stop) the kernel's /sys."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not _can_create_in(locked):
            yield locked
        elif Path("/sys").is_dir() and not _can_create_in(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.skip("no unwritable directory available to this user")
    finally:
        locked.chmod(0o700)
        locked.rmdir()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_save_into_read_only_directory(saved, unwritable_dir):
    compiled, _ = saved
    with pytest.raises(ArtifactError, match="cannot write to"):
        compiled.save(unwritable_dir / "kiln-artifact")
    assert not (unwritable_dir / "kiln-artifact").exists()


def test_save_below_a_file(saved, tmp_path):
    compiled, _ = saved
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="cannot write to"):
        compiled.save(blocker / "artifact")
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        compiled.save(blocker)
    assert blocker.read_text() == "x" and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("interruption", "raised"),
    [(OSError(28, "No space left on device"), ArtifactError), (KeyboardInterrupt(), KeyboardInterrupt)],
    ids=["disk-full", "ctrl-c"],
)
def test_interrupted_save_keeps_the_previous_artifact(saved, monkeypatch, interruption, raised):
    compiled, directory = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def half_write(target):
        (target / "model.onnx").write_bytes(b"partial")
        raise interruption

    monkeypatch.setattr(compiled.artifact, "save", half_write)
    with pytest.raises(raised):
        compiled.save(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert leftovers(directory.parent) == []
    torchkiln.load(directory)


def test_interrupted_first_save_leaves_nothing(monkeypatch, tmp_path):
    compiled = compile_quietly(nn.Linear(4, 2), torch.randn(1, 4))
    monkeypatch.setattr(compiled.artifact, "save", lambda target: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        compiled.save(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_resave_replaces_atomically(saved):
    compiled, directory = saved
    (directory / "stale.txt").write_text("old")
    compiled.save(directory)
    assert not (directory / "stale.txt").exists() and leftovers(directory.parent) == []


CLI_CASES = [
    # (argv, exit code, message); {tmp} is the test's directory, {locked} an unwritable one
    (["export", "resnet", "--passes", "cleanup,fuse_all", "-o", "{tmp}/o"], 2, "unknown pass 'fuse_all'"),
    (["export", "resnet", "--passes", "cleanup:bogus=1", "-o", "{tmp}/o"], 2, "unknown option 'bogus'"),
    (["export", "resnet", "--backend-option", "opset=5", "-o", "{tmp}/o"], 2, "must be between 18"),
    (["export", "resnet", "--backend-option", "opset", "-o", "{tmp}/o"], 2, "bad --backend-option"),
    (["export", "no_such_model", "-o", "{tmp}/o"], 2, "unknown zoo model 'no_such_model'"),
    (["export", "resnet", "--input", "1x3xbig", "-o", "{tmp}/o"], 2, "bad --input '1x3xbig'"),
    (["export", "resnet", "--input", "0x3x32x32", "-o", "{tmp}/o"], 2, "sizes must be positive"),
    (["export", "resnet", "--input", "1x3x32x32:float99", "-o", "{tmp}/o"], 2, "unknown dtype 'float99'"),
    (["export", "resnet", "--input", "1x4x32x32", "-o", "{tmp}/o"], 2, "fails on the example inputs"),
    (["export", "resnet", "--dynamic", "x=batch", "-o", "{tmp}/o"], 2, "bad --dynamic"),
    (["export", "resnet", "--dynamic", "y:0=batch", "-o", "{tmp}/o"], 2, "unknown input 'y'"),
    (["export", "{tmp}/missing.py:build", "--input", "1x4", "-o", "{tmp}/o"], 2, "does not exist"),
    (["export", "{tmp}/broken.py:build", "--input", "1x4", "-o", "{tmp}/o"], 2, "importing"),
    (
        ["export", "{tmp}/broken_factory.py:build", "--input", "1x4", "-o", "{tmp}/o"],
        2,
        "calling build() failed",
    ),
    (
        ["export", "torchkiln.nothing_here:build", "--input", "1x4", "-o", "{tmp}/o"],
        2,
        "cannot import module",
    ),
    (["export", "torchkiln.models:ZOO", "--input", "1x4", "-o", "{tmp}/o"], 2, "not a callable"),
    (
        ["export", "torchkiln.models:small_models", "--input", "1x4", "-o", "{tmp}/o"],
        2,
        "not a torch.nn.Module",
    ),
    (["export", "torch.nn:Identity", "-o", "{tmp}/o"], 2, "--input is required"),
    (["export", "mlp", "-o", "{tmp}/file/o"], 1, "cannot write to"),
    (["export", "mlp", "-o", "{locked}/o"], 1, "cannot write to"),
    (["inspect", "mlp", "--input", "1x65"], 2, "fails on the example inputs"),
    (["inspect", "{tmp}/untraceable.py:build", "--input", "2x4"], 1, "symbolic tracing failed"),
    (["passes", "nope"], 2, "unknown pass 'nope'"),
    (["build", "{tmp}/nope.toml"], 2, "cannot read recipe"),
    (["build", "{tmp}/file"], 2, "the [model] table is missing"),
    (["export", "mlp", "--passes", "quantize", "-o", "{tmp}/o"], 2, "needs calibration data"),
    (["export", "mlp", "--passes", "quantize", "--calibration", "random:0", "-o", "{tmp}/o"], 2, "bad --calibration"),
    (["export", "mlp", "--passes", "quantize", "--calibration", "{tmp}/no.pt", "-o", "{tmp}/o"], 2, "not found"),
    (["export", "mlp", "--passes", "quantize", "--calibration", "{tmp}/file", "-o", "{tmp}/o"], 2, "unsupported"),
    (["export", "mlp", "--passes", "quantize", "--calibration", "{tmp}/bad.pt", "-o", "{tmp}/o"], 2, "cannot read"),
    (
        ["export", "mlp", "--passes", "quantize", "--calibration", "{tmp}/wrong.npz", "-o", "{tmp}/o"],
        2,
        "has arrays y that are not model inputs",
    ),
    # recipes: every failure names the table/key, exits 2 (bad recipe or data) or 1 (build failed)
    (["build", "{tmp}/calib_missing.toml", "-o", "{tmp}/o"], 2, "not found"),
    (["build", "{tmp}/calib_raises.toml", "-o", "{tmp}/o"], 2, "boom() failed: RuntimeError: no data"),
    (["build", "{tmp}/eval_no_labels.toml", "-o", "{tmp}/o"], 2, "[evaluation] batches must be (inputs, integer labels)"),
    (["build", "{tmp}/nan_cosine.toml", "-o", "{tmp}/o"], 2, "[verify] min_cosine: must be in (0, 1], got nan"),
    (["build", "{tmp}/both_tolerances.toml", "-o", "{tmp}/o"], 2, "give min_cosine or atol/rtol, not both"),
    (["build", "{tmp}/negative_size.toml", "-o", "{tmp}/o"], 2, "[gate] max_size_mb: must be > 0, got -1"),
    (["build", "{tmp}/zero_batches.toml", "-o", "{tmp}/o"], 2, "[calibration] batches: must be >= 1"),
    (["build", "{tmp}/wrong_shape.toml", "-o", "{tmp}/o"], 2, "fails on the example inputs"),
    (["build", "{tmp}/ok.toml", "-o", "{locked}/o"], 1, "cannot write to"),
    # compare and bench
    (["compare", "mlp", "{tmp}/nowhere"], 1, "is not a directory"),
    (["compare", "mlp", "{tmp}"], 1, "no manifest.json"),
    (["bench", "mlp", "--batch-sizes", "x"], 2, "bad --batch-sizes"),
    (["bench", "mlp", "--runtimes", "ort-int8", "--calibration", "{tmp}/no.pt"], 2, "not found"),
    (["bench", "{tmp}/nowhere.py:build", "--input", "1x4"], 2, "does not exist"),
    # inputs and numbers that used to end in an internal error or a silent wrong verdict
    (["build", "{tmp}/latin1.toml"], 2, "the recipe is not UTF-8 text"),
    (["build", "{tmp}/comma_option.toml"], 2, "expected float, got '0.1,structured=true'"),
    # issue 41: sizes priced against the memory budget before they are allocated; counts and seconds checked
    (["bench", "mlp", "--batch-sizes", "1000000000", "--runs", "1"], 2,
     "--batch-sizes=1000000000 needs 238.4 GiB for the inputs of one batch, over the memory budget"),
    (["export", "mlp", "--passes", "quantize", "--calibration", "random:1000000000", "-o", "{tmp}/o"], 2,
     "--calibration=random:1000000000 needs 238.4 GiB for 1000000000 batches like the example"),
    (["tune", "{tmp}/negative_seed.toml", "--no-cache", "-o", "{tmp}/o"], 2, "[tune] seed must be an integer in [0, 2**32), got -1"),
    (["tune", "{tmp}/tune.toml", "--no-cache", "--timeout", "nan", "-o", "{tmp}/o"], 2,
     "timeout must be a finite number of seconds >= 0, got float nan"),
    (["export", "mlp", "--input", "100000000000x64", "-o", "{tmp}/o"], 2, "is more than an example input needs"),
    (["export", "text_encoder", "--input", "1x16:int64:0", "-o", "{tmp}/o"], 2, "high must be in [1,"),
    (["export", "mlp", "--input", "1x64:int8:300", "-o", "{tmp}/o"], 2, "high must be in [1, 128]"),
    (["export", "mlp", "--input", "1x64:bool", "-o", "{tmp}/o"], 2, "fails on the example inputs"),
    (["export", "mlp", "--input", "1x64:complex64", "-o", "{tmp}/o"], 2, "not supported for generated inputs"),
    (["export", "mlp", "--atol", "nan", "-o", "{tmp}/o"], 2, "tolerance atol must be a finite number >= 0"),
    (["export", "mlp", "--rtol", "-1", "-o", "{tmp}/o"], 2, "tolerance rtol must be a finite number >= 0"),
    (["export", "mlp", "--passes", "quantize", "--calibration", "{tmp}/empty.npz", "-o", "{tmp}/o"], 2,
     "no rows to split into batches"),
    (["export", "mlp", "-o", "{tmp}"], 2, "not a torchkiln artifact; refusing to replace it"),
]  # fmt: skip

_MLP_RECIPE = '[model]\nsource = "mlp"\n[backend]\nname = "onnxruntime"\n'
_QUANTIZE = '[[passes]]\nname = "quantize"\n'

FILES = {
    "broken.py": "raise RuntimeError('bad module')\n",
    "broken_factory.py": "def build():\n    raise ValueError('no weights')\n",
    "untraceable.py": (
        "import torch\n\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
        "        if x.sum() > 0:\n            return x\n        return -x\n\ndef build():\n    return M()\n"
    ),
    "file": "",
    "bad.pt": "not a pickle",
    "data.py": (
        "import torch\n\ndef boom():\n    raise RuntimeError('no data')\n\n"
        "def unlabelled():\n    return [torch.randn(1, 64)]\n"
    ),
    "ok.toml": _MLP_RECIPE,
    "calib_missing.toml": _MLP_RECIPE + _QUANTIZE + '[calibration]\nsource = "missing.npz"\n',
    "calib_raises.toml": _MLP_RECIPE + _QUANTIZE + '[calibration]\nsource = "data.py:boom"\n',
    "eval_no_labels.toml": _MLP_RECIPE + '[evaluation]\nsource = "data.py:unlabelled"\n',
    "nan_cosine.toml": _MLP_RECIPE + "[verify]\nmin_cosine = nan\n",
    "both_tolerances.toml": _MLP_RECIPE + "[verify]\nmin_cosine = 0.9\natol = 0.1\n",
    "negative_size.toml": _MLP_RECIPE + "[gate]\nmax_size_mb = -1\n",
    "zero_batches.toml": _MLP_RECIPE + '[calibration]\nsource = "data.py:boom"\nbatches = 0\n',
    "wrong_shape.toml": _MLP_RECIPE.replace('"mlp"\n', '"mlp"\ninputs = [{ name = "x", shape = [1, 65] }]\n'),
    "latin1.toml": _MLP_RECIPE.encode() + '# caf\u00e9\n'.encode("latin-1"),
    "comma_option.toml": _MLP_RECIPE + '[[passes]]\nname = "prune"\noptions = { ratio = "0.1,structured=true" }\n',
    "negative_seed.toml": _MLP_RECIPE + '[tune]\ntrials = 2\nseed = -1\n[tune.space]\n"backend" = ["torch", "onnxruntime"]\n',
    "tune.toml": _MLP_RECIPE + '[tune]\ntrials = 2\n[tune.space]\n"backend" = ["torch", "onnxruntime"]\n',
}


@pytest.mark.parametrize("case", CLI_CASES, ids=[" ".join(c[0][:3]) for c in CLI_CASES])
def test_cli(capsys, tmp_path, unwritable_dir, case):
    argv, code, message = case
    for name, text in FILES.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.float32))
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 64), np.float32))
    before = sorted(os.listdir(tmp_path))
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{locked}", str(unwritable_dir)) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("kiln: ")]  # drop progress lines
    assert len(errors) == 1 and message in errors[0] and "error:" in errors[0], err
    assert "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == before  # nothing of the user's was touched


@pytest.mark.parametrize("case", LOAD_CASES[:9], ids=[c[0] for c in LOAD_CASES[:9]])
@pytest.mark.parametrize("command", ["compare", "bench"])
def test_compare_and_bench_refuse_corrupt_artifacts(saved, capsys, case, command):
    _, directory = saved
    _, corrupt, message = case
    corrupt(directory)
    argv = ["compare", "torch.nn:Identity", str(directory)] if command == "compare" else ["bench", str(directory)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("kiln: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_compare_with_inputs_the_artifact_does_not_take(saved):
    _, directory = saved
    with pytest.raises(InputError, match="unexpected input 'x'"):
        torchkiln.compare_artifact(nn.Linear(4, 2), directory, {"x": torch.randn(1, 4)})


def test_an_unwritable_cache_does_not_fail_the_build(tmp_path, unwritable_dir, capsys):
    (tmp_path / "kiln.toml").write_text(_MLP_RECIPE)
    argv = ["build", str(tmp_path / "kiln.toml"), "--cache-dir", str(unwritable_dir / "cache"), "--json"]
    assert main(argv) == 0
    cache = json.loads(capsys.readouterr().out)["cache"]
    assert all("not stored: cannot write to" in state for state in cache.values()), cache


@pytest.mark.parametrize("stem", ["onnx", "json", "numpy"])
def test_a_model_file_named_like_a_package_does_not_shadow_it(tmp_path, capsys, stem):
    source = tmp_path / f"{stem}.py"
    source.write_text("import torch\n\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    argv = ["export", f"{source}:build", "--input", "input=1x4", "-o", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    import importlib

    assert importlib.import_module(stem).__file__ != str(source)  # the real package is still the package
    assert torchkiln.load(tmp_path / "o")(torch.randn(1, 4)).shape == (1, 2)


def test_bench_with_the_model_of_another_architecture(saved, capsys):
    _, directory = saved
    assert main(["bench", str(directory), "--model", "resnet", "--runs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--model resnet does not run on the artifact's inputs" in err and "internal error" not in err
