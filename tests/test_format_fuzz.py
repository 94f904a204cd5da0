"""Format fuzzer: valid manifests, ``program.json``, ``partition.json``, recipes and ``[tune]`` tables
mutated field by field (a value replaced by a hostile one, a key deleted, a list entry repeated),
each file re-hashed in its manifest as an attacker who can edit the directory would. Every case must
end in a typed error (a ``KilnError``) or in a result the manifest describes, with nothing written
outside the case's own directory, no file the mutation names created or read into the output,
bounded memory (an address-space cap while it runs) and bounded time.

The default run draws ``TORCHKILN_FORMAT_FUZZ_EXAMPLES`` (25) cases per format from a fixed seed;
``make fuzz-long`` draws 1000.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
from conftest import compile_quietly
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from torch import nn

import torchkiln
from torchkiln.compiler.files import sha256
from torchkiln.compiler.program import dtype_name
from torchkiln.errors import KilnError
from torchkiln.workflows import tuning
from torchkiln.workflows.recipe import load_recipe

EXAMPLES = int(os.environ.get("TORCHKILN_FORMAT_FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("TORCHKILN_FUZZ_SEED", "20261203"))
SECONDS_PER_CASE = 30.0
MEMORY_HEADROOM = 2 << 30  # address space a case may add

SENTINEL = "torchkiln-fuzz-sentinel"  # a file name a mutation may point an operator at
HOSTILE_STRINGS = [
    "", "x", "../" + SENTINEL, "/etc/hostname", SENTINEL, "op:aten::from_file.default", "op:aten::_print.default",
    "op:aten::add_.Tensor", "op:aten::zeros.default", "op:aten::relu.default", "os.system", "builtins.eval",
    "operator.getitem", "nan", "manifest.json", "program.bin", "stage0", "torchkiln-artifact", "torchkiln-partition",
    "float64", "int8", "cuda", "batch", "\x00", "é" * 3, "a" * 300,
]  # fmt: skip
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2**31, 2**63, 10**12])
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=6)
)  # fmt: skip
KEYS = st.sampled_from(["node", "tuple", "list", "dict", "dtype", "float", "device", "name", "target", "op",
                        "format", "files", "shape", "offset", "kind"]) | st.text(max_size=4)  # fmt: skip
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=10)  # fmt: skip


def _nested(depth: int) -> Any:
    return {"list": [_nested(depth - 1)]} if depth else 1


HOSTILE_VALUES = VALUES | st.integers(1, 60).map(_nested)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


@st.composite
def mutations(draw: Any, document: Any) -> tuple[str, tuple[Any, ...], Any]:
    """(kind, path, value): replace the value at ``path``, delete it, or repeat a list entry."""
    path = draw(st.sampled_from(list(_paths(document))[1:]))
    kind = draw(st.sampled_from(["replace", "replace", "replace", "delete", "repeat"]))
    return kind, path, draw(HOSTILE_VALUES) if kind == "replace" else None


def mutated(document: Any, mutation: tuple[str, tuple[Any, ...], Any]) -> Any:
    kind, path, value = mutation
    result = copy.deepcopy(document)
    parent = result
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == "replace":
        parent[last] = value
    elif kind == "delete":
        del parent[last]
    elif isinstance(parent, list):
        parent.insert(last, copy.deepcopy(parent[last]))
    else:
        parent[last] = [parent[last], copy.deepcopy(parent[last])]
    return result


def fuzzed(strategy: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        configured = settings(max_examples=EXAMPLES, deadline=None, database=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.function_scoped_fixture])  # fmt: skip
        return seed(SEED)(configured(given(mutation=strategy)(test)))

    return wrap


# --- the guarantees each case is held to ------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@contextlib.contextmanager
def guarded(work: Path, writable: Path | None = None) -> Iterator[None]:
    """Run a case: nothing outside ``writable`` (default: nowhere) under ``work`` or in the working
    directory changes, no sentinel file appears, the address space grows by at most
    MEMORY_HEADROOM, the case ends within SECONDS_PER_CASE."""
    before, here = _tree(work), _top_level(Path.cwd())
    sentinels = _sentinels(work)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = _address_space()
    cap = used + MEMORY_HEADROOM if used else resource.RLIM_INFINITY
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    start = time.monotonic()
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert time.monotonic() - start < SECONDS_PER_CASE
    after = {k: v for k, v in _tree(work).items() if writable is None or not (work / k).is_relative_to(writable)}
    before = {k: v for k, v in before.items() if writable is None or not (work / k).is_relative_to(writable)}
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:5]
    assert _sentinels(work) == sentinels
    if writable is None or not Path.cwd().is_relative_to(writable):  # a writer may write where it runs
        assert _top_level(Path.cwd()) == here


def _top_level(directory: Path) -> dict[str, int]:
    """The working directory's entries (a write anywhere in a tree would also change its top level's
    mtime only at that level: this catches files created beside the user, cheaply)."""
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if p.is_file()}


def _sentinels(work: Path) -> set[Path]:
    """Where a mutation's paths (SENTINEL, ../SENTINEL, relative to the case or the working
    directory) could create a file."""
    places = {work, work / "artifact", work.parent, Path.cwd(), Path.cwd().parent}
    return {place / SENTINEL for place in places if (place / SENTINEL).exists()}


def _address_space() -> int:
    try:
        fields = Path("/proc/self/status").read_text().split("VmSize:")[1].split()
        return int(fields[0]) * 1024
    except (OSError, IndexError, ValueError):
        return 0


def typed_or_described(call: Callable[[], Any], check: Callable[[Any], None]) -> str:
    """Run ``call``: a KilnError is a pass ("refused"); a result must satisfy ``check``."""
    try:
        result = call()
    except KilnError as exc:
        event(f"refused: {type(exc).__name__}")
        return "refused"
    check(result)
    event("ran")
    return "ran"


# --- artifacts: manifest.json and program.json ------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    base = tmp_path_factory.mktemp("fuzz-artifacts")
    saved = {b: compile_quietly(model, torch.randn(2, 4), backend=b, dynamic_axes="batch").save(base / b)
             for b in ("torch", "onnxruntime", "openvino")}  # fmt: skip
    (base / SENTINEL).write_text("secret")  # what a from_file mutation would try to read
    return saved


def _case_directory(source: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="fuzz-", dir=source.parent))
    shutil.copytree(source, work / "artifact")
    return work


def _write_json(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document))


def _rehash(directory: Path, name: str) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) and name in manifest["files"]:
        manifest["files"][name] = sha256(directory / name)
        (directory / "manifest.json").write_text(json.dumps(manifest))


def _described(compiled: Any) -> None:
    """A loaded artifact that loads must run to outputs of its declared dtypes and ranks, or refuse."""
    x = torch.randn(3, 4)

    def check(outputs: Any) -> None:
        leaves = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for leaf, spec in zip(torch.utils._pytree.tree_leaves(leaves), compiled.outputs):
            assert isinstance(leaf, torch.Tensor) and dtype_name(leaf.dtype) == spec.dtype and leaf.dim() == len(spec.shape)
            assert SENTINEL.encode() not in leaf.detach().cpu().numpy().tobytes()

    typed_or_described(lambda: compiled(x), check)


def _run_artifact_case(source: Path, member: str, mutation: Any) -> None:
    work = _case_directory(source)
    try:
        directory = work / "artifact"
        document = json.loads((directory / member).read_text())
        _write_json(directory / member, mutated(document, mutation))
        _rehash(directory, member)
        with guarded(work):
            typed_or_described(lambda: torchkiln.load(directory), _described)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _document(path: Path) -> Any:
    return json.loads(path.read_text())


_BASE: dict[str, Any] = {}  # the documents strategies mutate: built once, from fresh artifacts


def _base_documents() -> dict[str, Any]:
    if not _BASE:
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        with tempfile.TemporaryDirectory() as tmp:
            for backend in ("torch", "onnxruntime", "openvino"):
                compiled = compile_quietly(model, torch.randn(2, 4), backend=backend, dynamic_axes="batch")
                saved = compiled.save(Path(tmp) / backend)
                _BASE[f"manifest-{backend}"] = _document(saved / "manifest.json")
            _BASE["program"] = _document(Path(tmp) / "torch" / "program.json")
            part = torchkiln.partition(model, {"input": torch.randn(2, 4)}, stages=2, balance="params")
            _BASE["partition"] = _document(part.save(Path(tmp) / "p") / "partition.json")
            compile_quietly(model, torch.randn(2, 4), backend="torch", cache=Path(tmp) / "cache", dynamic_axes="batch")
            (entry,) = (Path(tmp) / "cache" / "optimize").iterdir()
            _BASE["cached-program"] = _document(entry / "program.json")
    return _BASE


@fuzzed(st.deferred(lambda: mutations(_base_documents()["manifest-torch"])))
def test_mutated_manifests(artifacts, mutation):
    _run_artifact_case(artifacts["torch"], "manifest.json", mutation)


@fuzzed(st.deferred(lambda: mutations(_base_documents()["program"])))
def test_mutated_torch_graphs(artifacts, mutation):
    _run_artifact_case(artifacts["torch"], "program.json", mutation)


@fuzzed(st.deferred(lambda: mutations(_base_documents()["manifest-onnxruntime"])))
def test_mutated_onnxruntime_manifests(artifacts, mutation):
    _run_artifact_case(artifacts["onnxruntime"], "manifest.json", mutation)


@fuzzed(st.deferred(lambda: mutations(_base_documents()["manifest-openvino"])))
def test_mutated_openvino_manifests(artifacts, mutation):
    _run_artifact_case(artifacts["openvino"], "manifest.json", mutation)


# --- the build cache's entries (a CI cache restored from another branch) --------------------------------


def _cached_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


@pytest.fixture(scope="module")
def cache_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz-cache") / "cache"
    compile_quietly(_cached_model(), torch.randn(2, 4), backend="torch", cache=directory, dynamic_axes="batch")
    return directory


@fuzzed(st.deferred(lambda: mutations(_base_documents()["cached-program"])))
def test_mutated_cache_entries(cache_directory, mutation):
    """A compile reading a tampered optimize entry gives the eager model's outputs (a miss is rebuilt;
    a hit is verified) or a KilnError, and writes nothing but the cache."""
    work = _case_directory(cache_directory)
    try:
        cache = work / "artifact"
        (entry,) = (cache / "optimize").iterdir()
        _write_json(entry / "program.json", mutated(_document(entry / "program.json"), mutation))
        model, x = _cached_model(), torch.randn(3, 4)

        def check(compiled: Any) -> None:
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)

        with guarded(work, writable=cache):
            typed_or_described(lambda: compile_quietly(model, torch.randn(2, 4), backend="torch", cache=cache,
                                                       dynamic_axes="batch"), check)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- partitions --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_partition(tmp_path_factory):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    part = torchkiln.partition(model, {"input": torch.randn(2, 4)}, stages=2, balance="params")
    return part.save(tmp_path_factory.mktemp("fuzz-partition") / "p")


@fuzzed(st.deferred(lambda: mutations(_base_documents()["partition"])))
def test_mutated_partitions(saved_partition, mutation):
    work = _case_directory(saved_partition)
    try:
        directory = work / "artifact"
        _write_json(directory / "partition.json", mutated(_document(directory / "partition.json"), mutation))

        def run(part: Any) -> None:
            assert "stage" in part.table()  # every figure it prints was checked on load

            def check(outputs: Any) -> None:
                assert all(isinstance(o, torch.Tensor) and o.dtype == torch.float32 for o in outputs)

            typed_or_described(lambda: part(input=torch.randn(3, 4)), check)

        with guarded(work):
            typed_or_described(lambda: torchkiln.load_partition(directory), run)
        _run_pipeline_verb(work, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_pipeline_verb(work: Path, directory: Path) -> None:
    """``kiln pipeline`` on the partition as rank 0 of a one-rank group (a two-stage partition is then
    refused after rank 0 loaded its stage; a one-stage one runs): exit 0, 1 or 2 with the rank's error
    line, never a traceback, and only its own -o written."""
    import io
    import socket

    import numpy as np

    from torchkiln.cli import main

    np.savez(work / "in.npz", input=np.ones((4, 4), dtype=np.float32))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    world = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    saved = {k: os.environ.get(k) for k in world}
    err = io.StringIO()
    os.environ.update(world)
    try:
        with guarded(work, writable=work / "out"), contextlib.redirect_stderr(err):
            (work / "out").mkdir()
            code = main(["pipeline", str(directory), "--inputs", str(work / "in.npz"), "-o", str(work / "out" / "o.npz"),
                         "--microbatches", "2", "--timeout", "20"])  # fmt: skip
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    text = err.getvalue()
    assert code in (0, 1, 2) and "Traceback" not in text, text[-800:]
    assert (code == 0) == (work / "out" / "o.npz").exists(), text[-800:]
    assert code == 0 or "[rank 0] error:" in text, text[-800:]
    event(f"kiln pipeline exit {code}")


# --- recipes and [tune] tables -----------------------------------------------------------------------------

RECIPE = """
[model]
source = "mlp"
inputs = [{ name = "x", shape = [1, 64], dynamic = { 0 = "batch" } }]
kv_cache = "float"

[[passes]]
name = "cleanup"

[[passes]]
name = "quantize"
options = { mode = "dynamic", min_macs = 0 }

[backend]
name = "onnxruntime"
options = { intra_op_threads = 1 }

[gate]
max_size_mb = 5.0

[tune]
trials = 4
objectives = ["size_mb", "latency_ms"]
sampler = "random"

[tune.space]
"quantize" = "optional"
"quantize.mode" = ["dynamic", "weight_only"]
"quantize.min_macs" = [0, 4096]
"backend" = ["onnxruntime", "torch"]
"""


@fuzzed(mutations(tomllib.loads(RECIPE)))
def test_mutated_recipes_and_tune_tables(tmp_path_factory, mutation):
    work = Path(tempfile.mkdtemp(prefix="fuzz-recipe-", dir=tmp_path_factory.getbasetemp()))
    try:
        document = mutated(tomllib.loads(RECIPE), mutation)
        try:
            text = tuning.toml_text(document)
        except (KilnError, TypeError, ValueError, KeyError, AttributeError):
            return  # not expressible in TOML (a None): no user can write this recipe
        (work / "kiln.toml").write_text(text)

        def settings_of(recipe: Any) -> None:
            if recipe.tune is not None:
                typed_or_described(lambda: tuning.settings(recipe), lambda s: None)

        with guarded(work):
            typed_or_described(lambda: load_recipe(work / "kiln.toml"), settings_of)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_mutation_engine_reaches_every_field():
    document = {"a": [1, {"b": 2}], "c": "d"}
    assert set(list(_paths(document))[1:]) == {("a",), ("a", 0), ("a", 1), ("a", 1, "b"), ("c",)}
    assert mutated(document, ("replace", ("a", 1, "b"), 7)) == {"a": [1, {"b": 7}], "c": "d"}
    assert mutated(document, ("delete", ("c",), None)) == {"a": [1, {"b": 2}]}
    assert mutated(document, ("repeat", ("a", 0), None)) == {"a": [1, 1, {"b": 2}], "c": "d"}
