"""What load and save guarantee (README "Guarantees"): loading never executes code, never reads a
file the manifest does not list (or one outside the directory) and never writes; saving never
replaces a directory that is not an artifact and, killed at any instant, leaves the destination
holding a complete artifact (the old or the new one) — with concurrent writers serialised."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import random
import signal
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import compile_quietly
from torch import nn

import torchkiln
from torchkiln.cli import main
from torchkiln.compiler import files
from torchkiln.compiler.files import sha256
from torchkiln.errors import ArtifactError


class Payload:
    """Unpickling this creates ``path``: the side effect that proves code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def pickle_payload(sentinel: Path) -> bytes:
    return pickle.dumps(Payload(sentinel))


def torch_zip_payload(sentinel: Path) -> bytes:
    """A torch.save-style zip whose data.pkl runs the payload (what a planted .pt2/.pt carries)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_payload(sentinel))
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def edit_manifest(directory: Path, **changes) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def plant(directory: Path, name: str, data: bytes) -> None:
    """Write ``data`` as ``name`` and list it in the manifest with its real checksum, as an attacker
    who can edit the directory would."""
    (directory / name).write_bytes(data)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = sha256(directory / name)
    (directory / "manifest.json").write_text(json.dumps(manifest))


BACKENDS = ["torch", "onnx", "onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """One saved artifact per backend (a small MLP, dynamic batch), copied per test."""
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), torch.randn(2, 4)
    base = tmp_path_factory.mktemp("artifacts")
    return {b: compile_quietly(model, x, backend=b, dynamic_axes="batch").save(base / b) for b in BACKENDS}


@pytest.fixture
def copy_of(artifacts, tmp_path):
    def make(backend: str, suffix: str = "") -> Path:
        target = tmp_path / f"{backend}{suffix}"
        target.mkdir()
        for path in artifacts[backend].iterdir():
            (target / path.name).write_bytes(path.read_bytes())
        return target

    return make


def backend_files(directory: Path) -> list[str]:
    return sorted(json.loads((directory / "manifest.json").read_text())["files"])


# --- 1. loading never executes code -----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
def test_a_payload_planted_in_any_file_never_runs(copy_of, tmp_path, backend, kind):
    payload = {"pickle": pickle_payload, "torch-zip": torch_zip_payload}[kind]
    names = backend_files(copy_of(backend)) + ["program.pt2", "extra.pt"]
    for name in names:
        directory = copy_of(backend, suffix=name)
        sentinel = tmp_path / f"ran-{name}"
        plant(directory, name, payload(sentinel))
        try:
            torchkiln.load(directory)(torch.randn(2, 4))
        except ArtifactError:
            pass  # refused; a listed file the backend does not use is only checksummed
        assert not sentinel.exists(), f"a payload in {name} ran on load"


def test_an_old_torch_export_archive_is_refused_not_unpickled(copy_of, tmp_path):
    directory = copy_of("torch")
    sentinel = tmp_path / "ran"
    for name in ("program.json", "program.bin"):
        (directory / name).unlink()
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"] = {}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    plant(directory, "program.pt2", torch_zip_payload(sentinel))
    with pytest.raises(ArtifactError, match="torch.export archive, which torchkiln no longer loads"):
        torchkiln.load(directory)
    assert not sentinel.exists()


@pytest.mark.parametrize("command", ["bench", "compare"])
def test_cli_commands_load_safely_too(copy_of, tmp_path, capsys, command):
    directory = copy_of("onnxruntime")
    sentinel = tmp_path / "ran"
    plant(directory, "model.onnx", pickle_payload(sentinel))
    argv = {"bench": ["bench", str(directory), "--runs", "1", "--quiet"],
            "compare": ["compare", "mlp", str(directory)]}[command]  # fmt: skip
    assert main(argv) in (1, 2)
    assert not sentinel.exists()
    assert "internal error" not in capsys.readouterr().err


ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x1b[31m\u202e"  # clear screen, set the title, red, right-to-left


@pytest.mark.parametrize("field", ["model", "input", "axis", "output", "report", "backend_option"])
@pytest.mark.parametrize("command", ["bench", "compare", "generate"])
def test_terminal_escapes_in_a_manifest_are_printed_as_text(copy_of, capsys, field, command):
    """A manifest's strings reach the terminal escaped, whatever line prints them."""
    directory = copy_of("onnxruntime")
    manifest = json.loads((directory / "manifest.json").read_text())
    if field == "model":
        manifest["model"] = manifest["report"]["model"] = ESCAPES + "MLP"
    elif field in ("input", "axis", "output"):
        spec = manifest["outputs" if field == "output" else "inputs"][0]
        spec["name" if field != "axis" else "shape"] = ESCAPES if field != "axis" else [ESCAPES, 4]
    elif field == "report":
        manifest["report"]["notes"] = [ESCAPES]
        manifest["report"]["passes"] = [{**manifest["report"]["passes"][0], "notes": [ESCAPES]}] if manifest["report"]["passes"] else []
    else:
        manifest["backend_options"]["providers"] = ESCAPES
    (directory / "manifest.json").write_text(json.dumps(manifest))
    argv = {"bench": ["bench", str(directory), "--runs", "1"], "compare": ["compare", "mlp", str(directory)],
            "generate": ["generate", str(directory), "--prompt-ids", "1,2"]}[command]  # fmt: skip
    main(argv)
    out, err = capsys.readouterr()
    for stream in (out, err):
        assert not set(stream) & {"\x1b", "\x07", "\u202e"}, stream[:400]
    assert "internal error" not in err


def _graph_edit(directory: Path, edit) -> None:
    program = json.loads((directory / "program.json").read_text())
    edit(program)
    plant(directory, "program.json", json.dumps(program).encode())


def _first_call(program: dict) -> dict:
    return next(n for n in program["nodes"] if n["op"] == "call_function")


TORCH_GRAPH_CASES = [
    ("python-function", lambda p: _first_call(p).update(target="os.system"), "is not an operator"),
    ("builtin-eval", lambda p: _first_call(p).update(target="builtins.eval"), "is not an operator"),
    ("op-outside-namespaces", lambda p: _first_call(p).update(target="op:torchvision::nms.default"),
     "is not an operator of"),
    ("unknown-op", lambda p: _first_call(p).update(target="op:aten::no_such_op.default"), "does not exist"),
    ("module-call", lambda p: _first_call(p).update(op="call_module"), "has op 'call_module'"),
    ("tensor-outside-blob", lambda p: p["tensors"][0].update(offset=10**9), "lies outside program.bin"),
    ("object-dtype", lambda p: p["tensors"][0].update(dtype="object"), "dtype 'object'"),
    ("unknown-argument", lambda p: _first_call(p).update(args={"tuple": [{"eval": "1+1"}]}), "argument"),
    ("dangling-node", lambda p: _first_call(p).update(args={"tuple": [{"node": "nope"}]}), "before it is defined"),
    ("not-a-graph", lambda p: p.update(format="pickle"), "format/version"),
    # operators that exist in aten but do more than compute (the allow-list refuses them)
    ("reads-a-file", lambda p: _insert(p, "op:aten::from_file.default", ["/etc/hostname"],
                                       [["shared", False], ["size", 4], ["dtype", {"dtype": "uint8"}]]), "allow-list"),
    ("prints", lambda p: _insert(p, "op:aten::_print.default", ["pwned"]), "allow-list"),
    ("writes-into-its-input", lambda p: _insert(p, "op:aten::add_.Tensor", [{"node": "input_1"}, {"node": "input_1"}]),
     "allow-list"),
    ("draws-random-numbers", lambda p: _insert(p, "op:aten::rand.default", [{"list": [2, 2]}]), "allow-list"),
    ("fills-a-tensor-in-place", lambda p: _insert(p, "op:aten::copy_.default", [{"node": "_0_weight"}, {"node": "_0_bias"}]),
     "allow-list"),
    ("nested-arguments", lambda p: _insert(p, "op:aten::relu.default", [_nested(40)]), "nested deeper"),
    ("overlapping-tensors", lambda p: p["tensors"][1].update(offset=100), "overlap"),
    ("renamed-input", lambda p: next(n for n in p["nodes"] if n["op"] == "placeholder").update(target="other"),
     "manifest declares inputs"),
    ("returns-a-number", lambda p: p["nodes"][-1].update(args={"tuple": [{"tuple": [5]}]}), "not a tensor"),
    ("returns-two-values", lambda p: p["nodes"][-1].update(args={"tuple": [{"tuple": [{"node": "relu"},
                                                                                     {"node": "linear_1"}]}]}),
     "returns 2 values"),
]  # fmt: skip


def _insert(program: dict, target: str, args: list, kwargs: list | None = None) -> None:
    """A call of ``target`` placed before the output node, as an attacker editing program.json would."""
    node = {"op": "call_function", "name": "planted", "target": target, "args": {"tuple": args},
            "kwargs": {"dict": kwargs or []}}  # fmt: skip
    program["nodes"].insert(len(program["nodes"]) - 1, node)


def _nested(depth: int):
    return {"list": [_nested(depth - 1)]} if depth else 1


@pytest.mark.parametrize("case", TORCH_GRAPH_CASES, ids=[c[0] for c in TORCH_GRAPH_CASES])
def test_a_tampered_torch_graph_is_refused(copy_of, case):
    _, edit, message = case
    directory = copy_of("torch")
    _graph_edit(directory, edit)
    with pytest.raises(ArtifactError, match=message):
        torchkiln.load(directory)


def test_a_graph_that_returns_another_dtype_than_declared_is_refused_at_the_call(copy_of):
    directory = copy_of("torch")

    def edit(program: dict) -> None:
        _insert(program, "op:aten::to.dtype", [{"node": "linear_1"}, {"dtype": "float64"}])
        program["nodes"][-1]["args"] = {"tuple": [{"tuple": [{"node": "planted"}]}]}

    _graph_edit(directory, edit)
    loaded = torchkiln.load(directory)
    with pytest.raises(ArtifactError, match="output .* is float64.*manifest declares float32"):
        loaded(torch.randn(3, 4))


def test_tensor_entries_over_one_byte_range_share_one_copy(copy_of):
    """A thousand entries naming the same megabyte load as one copy (memory stays bounded by the
    blob's size; each entry was copied before: a gigabyte here)."""
    import tracemalloc

    directory = copy_of("torch")
    blob = (directory / "program.bin").read_bytes()
    plant(directory, "program.bin", blob + bytes(1 << 20))
    big = {"name": "big", "dtype": "uint8", "shape": [1 << 20], "offset": len(blob), "kind": "buffer"}
    _graph_edit(directory, lambda p: p["tensors"].extend({**big, "name": f"alias{i}"} for i in range(1000)))
    tracemalloc.start()
    try:
        loaded = torchkiln.load(directory)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"loading held {peak / 1e6:.0f} MB"
    assert loaded(torch.randn(3, 4)).shape == (3, 2)


def _outside_secret(directory: Path) -> str:
    (directory.parent / "secret.txt").write_text("secret")
    return "../secret.txt"


MANIFEST_CASES = [
    ("files-empty", lambda d: edit_manifest(d, files={}), "lists no files"),
    ("files-a-list", lambda d: edit_manifest(d, files=["model.onnx"]), "'files' must be a JSON object"),
    ("passes-a-number", lambda d: edit_manifest(d, passes=5), "'passes' must be a JSON array"),
    ("passes-of-numbers", lambda d: edit_manifest(d, passes=[5]), "'passes' must be a list of strings"),
    ("options-a-string", lambda d: edit_manifest(d, backend_options="opset=19"), "must be a JSON object"),
    ("backend-a-number", lambda d: edit_manifest(d, backend=3), "'backend' must be a JSON string"),
    ("report-a-list", lambda d: edit_manifest(d, report=[]), "'report' must be a JSON object"),
    ("inputs-of-numbers", lambda d: edit_manifest(d, inputs=[1]), "invalid"),
    ("report-unknown-field", lambda d: edit_manifest(d, report={"model": "m", "flavour": "fx", "x": 1}), "invalid"),
    ("digest-not-hex", lambda d: edit_manifest(d, files={"model.onnx": "abc"}), "SHA-256 hex digest"),
    ("parent-path", lambda d: edit_manifest(d, files={_outside_secret(d): "0" * 64}), "not a plain file name"),
    ("absolute-path", lambda d: edit_manifest(d, files={"/etc/passwd": "0" * 64}), "not a plain file name"),
    ("nested-path", lambda d: edit_manifest(d, files={"sub/model.onnx": "0" * 64}), "not a plain file name"),
    ("manifest-listed", lambda d: edit_manifest(d, files={"manifest.json": "0" * 64}), "SHA-256"),
    ("unlisted-model", lambda d: edit_manifest(d, files={"notes.txt": _note(d)}), "needs model.onnx, which"),
]  # fmt: skip


def _note(directory: Path) -> str:
    (directory / "notes.txt").write_text("hello")
    return sha256(directory / "notes.txt")


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_the_manifest_is_checked_before_anything_is_read(copy_of, case):
    _, edit, message = case
    directory = copy_of("onnxruntime")
    edit(directory)
    with pytest.raises(ArtifactError, match=message):
        torchkiln.load(directory)


def test_a_tampered_model_under_an_empty_file_list_is_refused(copy_of):
    directory = copy_of("onnxruntime")
    (directory / "model.onnx").write_bytes(b"tampered")
    edit_manifest(directory, files={})
    with pytest.raises(ArtifactError, match="lists no files"):
        torchkiln.load(directory)


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_symlinked_members_are_refused(copy_of, tmp_path, target):
    directory = copy_of("onnxruntime")
    real = tmp_path / "real.onnx" if target == "outside" else directory / "real.onnx"
    real.write_bytes((directory / "model.onnx").read_bytes())
    (directory / "model.onnx").unlink()
    (directory / "model.onnx").symlink_to(real)
    with pytest.raises(ArtifactError, match="model.onnx is a symbolic link"):
        torchkiln.load(directory)


def test_external_data_outside_the_artifact_is_refused(copy_of, tmp_path):
    import onnx

    directory = copy_of("onnxruntime")
    model = onnx.load(str(directory / "model.onnx"))
    onnx.save(model, str(directory / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)  # fmt: skip
    (tmp_path / "weights.bin").write_bytes((directory / "weights.bin").read_bytes())
    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(model, str(directory / "model.onnx"))
    (directory / "weights.bin").unlink()
    edit_manifest(directory, files={"model.onnx": sha256(directory / "model.onnx")})
    with pytest.raises(ArtifactError, match=r"stored in '../weights.bin', which is not a file of the artifact"):
        torchkiln.load(directory)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_loading_never_writes(tmp_path):
    """save_optimized artifacts used to rewrite model.optimized.onnx inside themselves on every load."""
    compiled = compile_quietly(nn.Linear(4, 2).eval(), torch.randn(1, 4),
                               backend_options={"save_optimized": True})  # fmt: skip
    directory = compiled.save(tmp_path / "artifact")
    assert "model.optimized.onnx" in backend_files(directory)
    before, listing = snapshot(directory), sorted(os.listdir(tmp_path))
    written = []

    def audit(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].startswith(str(directory)):
            mode, flags = args[1], args[2]
            if (mode and any(c in str(mode) for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR)):
                written.append(args[0])

    sys.addaudithook(audit)
    for _ in range(2):
        loaded = torchkiln.load(directory)
        loaded(torch.randn(1, 4))
    assert snapshot(directory) == before and sorted(os.listdir(tmp_path)) == listing
    assert written == []


def test_a_loaded_artifact_saves_what_it_loaded(tmp_path):
    """c = load(D); D rebuilt from another model; c.save(E) must package c's own weights."""
    x = torch.randn(1, 4)
    first, second = nn.Linear(4, 2).eval(), nn.Linear(4, 2).eval()
    for backend in BACKENDS:
        directory = compile_quietly(first, x, backend=backend).save(tmp_path / f"d-{backend}")
        loaded = torchkiln.load(directory)
        compile_quietly(second, x, backend=backend).save(directory)
        again = torchkiln.load(loaded.save(tmp_path / f"e-{backend}"))
        torch.testing.assert_close(again(x), first(x), atol=1e-5, rtol=1e-4)


# --- 2. no user data lost -----------------------------------------------------------------------


def test_export_refuses_to_replace_a_directory_that_is_not_an_artifact(tmp_path, capsys):
    project = tmp_path / "myproj"
    project.mkdir()
    (project / "train.py").write_text("print('my work')")
    assert main(["export", "mlp", "-o", str(project), "--quiet"]) == 2  # a destination that may not be written: a usage error
    assert "not a torchkiln artifact; refusing to replace it" in capsys.readouterr().err
    assert (project / "train.py").read_text() == "print('my work')"
    with pytest.raises(ArtifactError, match="not a torchkiln artifact"):
        compile_quietly(nn.Linear(4, 2), torch.randn(1, 4)).save(project)
    assert sorted(os.listdir(project)) == ["train.py"]


@pytest.mark.parametrize("output", [".", "..", "./"])
def test_export_to_the_current_directory_is_a_clear_error(tmp_path, monkeypatch, capsys, output):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["export", "mlp", "-o", output, "--quiet"]) == 2
    assert "is the current directory or one of its parents" in capsys.readouterr().err


def test_an_empty_directory_and_an_artifact_are_replaced(tmp_path):
    compiled = compile_quietly(nn.Linear(4, 2), torch.randn(1, 4))
    (tmp_path / "empty").mkdir()
    compiled.save(tmp_path / "empty")
    compiled.save(tmp_path / "empty")  # now an artifact: replaced again
    assert "manifest.json" in os.listdir(tmp_path / "empty")
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # no lock, staging or aside copies left


def test_build_refuses_a_setuptools_build_directory(tmp_path, capsys):
    recipe = tmp_path / "kiln.toml"
    recipe.write_text('[model]\nsource = "mlp"\n')
    (tmp_path / "build" / "lib").mkdir(parents=True)
    (tmp_path / "build" / "lib" / "module.py").write_text("x = 1")
    assert main(["build", str(recipe), "--quiet", "--no-cache"]) == 2
    assert "not a torchkiln artifact" in capsys.readouterr().err
    assert (tmp_path / "build" / "lib" / "module.py").read_text() == "x = 1"


# Writers are forked from this process (fast: no interpreter start). They only copy files and
# write JSON — no ONNX Runtime or torch kernels run in a forked child; loading happens in the parent.
FORK = multiprocessing.get_context("fork")


def _save_in_child(artifacts: list, dest: Path, step: str, mode: str, ready, loop: bool) -> None:
    if mode == "fallback":
        files._exchange = lambda a, b: False

    def crash(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    files.after_step = crash
    ready.set()
    while True:
        for artifact in artifacts:
            artifact.save(dest)
        if not loop:
            return


def start_writer(artifacts: list, dest: Path, step: str, mode: str, loop: bool = False):
    ready = FORK.Event()
    writer = FORK.Process(target=_save_in_child, args=(artifacts, dest, step, mode, ready, loop), daemon=True)
    writer.start()
    assert ready.wait(30)
    return writer


@pytest.fixture(scope="module")
def old_and_new(tmp_path_factory):
    base = tmp_path_factory.mktemp("versions")
    x = torch.randn(1, 4)
    made = {}
    for seed, name in ((1, "old"), (2, "new")):
        torch.manual_seed(seed)
        made[name] = compile_quietly(nn.Linear(4, 2).eval(), x).save(base / name)
    return made


PROBE = torch.ones(1, 4)


def identity(directory: Path) -> tuple[float, ...]:
    """Which artifact ``directory`` holds: it must load completely; its output tells which."""
    return tuple(torchkiln.load(directory)(PROBE).flatten().tolist())


def assert_clean(parent: Path) -> None:
    left = [n for n in os.listdir(parent) if n.startswith(".")]
    assert left == [], f"left behind: {left}"


@pytest.mark.parametrize(
    ("mode", "step"),
    [("exchange", "exchanged"), ("fallback", "between-renames"), ("fallback", "renamed"), ("exchange", "synced")],
)
def test_a_writer_killed_at_each_step_leaves_a_complete_artifact(old_and_new, tmp_path, mode, step):
    dest = tmp_path / "artifact"
    torchkiln.load(old_and_new["old"]).save(dest)
    old, new = identity(dest), identity(old_and_new["new"])
    new_artifact = torchkiln.load(old_and_new["new"])  # held: its private copy lives while it does
    writer = start_writer([new_artifact], dest, step, mode)
    writer.join(60)
    assert writer.exitcode == -signal.SIGKILL
    assert identity(dest) == (old if step in ("synced", "between-renames") else new)  # complete, old or new
    torchkiln.load(old_and_new["old"]).save(dest)  # the next writer recovers and cleans up
    assert identity(dest) == old
    assert_clean(tmp_path)


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_a_writer_killed_at_random_instants_never_loses_the_artifact(old_and_new, tmp_path, mode):
    dest = tmp_path / "artifact"
    torchkiln.load(old_and_new["old"]).save(dest)
    both = [torchkiln.load(old_and_new["new"]), torchkiln.load(old_and_new["old"])]
    known = {identity(old_and_new["old"]), identity(old_and_new["new"])}
    rng = random.Random(20261128)
    for _ in range(20):
        writer = start_writer(both, dest, "never", mode, loop=True)
        time.sleep(rng.random() * 0.2)  # a save takes a few ms: this lands anywhere in one
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(30)
        assert identity(dest) in known
    torchkiln.load(old_and_new["new"]).save(dest)
    assert identity(dest) == identity(old_and_new["new"])
    assert_clean(tmp_path)


def _save_until(artifact, dest: Path, start: float, seconds: float, counts, slot: int) -> None:
    time.sleep(max(0.0, start - time.time()))
    while time.time() < start + seconds:
        artifact.save(dest)
        counts[slot] += 1


def test_concurrent_writers_are_serialised_and_readers_always_see_an_artifact(old_and_new, tmp_path):
    """Three writers save to one path for 3 s while this process loads it in a loop."""
    dest = tmp_path / "artifact"
    torchkiln.load(old_and_new["old"]).save(dest)
    known = {identity(old_and_new["old"]), identity(old_and_new["new"])}
    start, seconds = time.time() + 0.5, 3.0
    counts = FORK.Array("i", 3)
    # held here until the writers end: a CompiledModel's private copy is removed when it is collected
    artifacts = [torchkiln.load(old_and_new[name]) for name in ("old", "new", "old")]
    writers = [
        FORK.Process(target=_save_until, args=(artifact, dest, start, seconds, counts, i))
        for i, artifact in enumerate(artifacts)
    ]
    for writer in writers:
        writer.start()
    time.sleep(max(0.0, start - time.time()))
    loads = 0
    while time.time() < start + seconds:
        assert identity(dest) in known
        loads += 1
    for writer in writers:
        writer.join(60)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert min(counts) > 0 and loads > 0, (list(counts), loads)
    assert_clean(tmp_path)


def test_an_artifact_whose_files_vanished_refuses_to_save(tmp_path):
    loaded = torchkiln.load(compile_quietly(nn.Linear(4, 2), torch.randn(1, 4)).save(tmp_path / "a"))
    for path in loaded.artifact.directory.iterdir():  # what a temp-directory cleaner would do
        path.unlink()
    with pytest.raises(ArtifactError, match="model.onnx is gone"):
        loaded.save(tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_writer_waits_for_the_lock_then_reports_a_typed_error(old_and_new, tmp_path, monkeypatch):
    dest = tmp_path / "artifact"
    with files._locked(dest, timeout=1):
        with pytest.raises(ArtifactError, match="another process has been writing"):
            with files.atomic_directory(dest, "artifact", lock_timeout=0.2):
                pass
    assert_clean(tmp_path)


def test_an_output_node_without_its_argument_is_refused(copy_of):
    """Found by the format fuzzer (fx's code generation raised a raw IndexError)."""
    directory = copy_of("torch")
    _graph_edit(directory, lambda p: p["nodes"][-1].update(args={"tuple": []}))
    with pytest.raises(ArtifactError, match="output node"):
        torchkiln.load(directory)


# --- nesting: JSON and artifacts inside artifacts ---------------------------------------------------------


def test_a_manifest_nested_100000_deep_is_an_artifact_error(copy_of, tmp_path, capsys):
    """It was a raw RecursionError from json, on load and on `kiln export -o` of that directory."""
    directory = copy_of("torch")
    (directory / "manifest.json").write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ArtifactError, match="nested deeper than 200 levels"):
        torchkiln.load(directory)
    assert main(["export", "mlp", "--backend", "torch", "-o", str(directory)]) == 2  # not ours: refused
    assert "is a directory that is not a torchkiln artifact" in capsys.readouterr().err
    deep = "[" * 300 + "]" * 300  # within the parser's recursion, beyond the depth limit
    with pytest.raises(ArtifactError, match="nested deeper"):
        files.parse_json(deep, "x.json")


def test_an_encoder_decoder_whose_part_is_an_encoder_decoder_is_refused(copy_of, tmp_path):
    """Each part loaded the next: 500 levels gave a raw RecursionError."""
    from torchkiln.driver.compiled import FORMAT, FORMAT_VERSION

    def pair(directory: Path, encoder: Path, decoder: Path) -> Path:
        directory.mkdir()
        for name, part in (("encoder", encoder), ("decoder", decoder)):
            os.rename(part, directory / name)
        parts = {name: sha256(directory / name / "manifest.json") for name in ("encoder", "decoder")}
        (directory / "manifest.json").write_text(json.dumps(
            {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "encoder-decoder", "parts": parts}))
        return directory

    inner = pair(tmp_path / "inner", copy_of("torch"), copy_of("onnxruntime"))
    outer = pair(tmp_path / "outer", inner, copy_of("onnxruntime"))
    with pytest.raises(ArtifactError, match="is an encoder-decoder inside another artifact"):
        torchkiln.load(outer)
