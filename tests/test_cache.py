"""The stage cache: programs survive save/load exactly (both graph flavours, quantized ops,
symbolic shapes), keys change with what a stage depends on, and what cannot be cached says so."""

from __future__ import annotations

import errno
import json
import sys

import pytest
import torch
from torch import nn

from tests.conftest import SMALL_ZOO, compile_quietly
from torchkiln import models
from torchkiln.compiler.trace import trace
from torchkiln.driver import cache


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", SMALL_ZOO)
def test_a_saved_program_loads_back_with_the_same_graph_and_outputs(tmp_path, name, frontend):
    entry = models.get(name)
    program = trace(entry.build().eval(), entry.example_inputs(), dynamic_axes=entry.dynamic_axes, frontend=frontend)
    cache.save_program(program, tmp_path, {"report": {"x": 1}})
    loaded, extra = cache.load_program(tmp_path)
    assert extra == {"report": {"x": 1}}
    assert [n.name for n in loaded.graph_module.graph.nodes] == [n.name for n in program.graph_module.graph.nodes]
    assert loaded.inputs == program.inputs and loaded.outputs == program.outputs and loaded.flavour == program.flavour
    for check in program.checks:  # includes the second size along dynamic axes
        assert all(torch.equal(a, b) for a, b in zip(loaded.run(check.inputs), program.run(check.inputs)))


def test_quantized_ops_survive_a_reload_in_the_cache(tmp_path):
    entry = models.get("mlp")
    model, inputs = entry.build().eval(), entry.example_inputs()
    compiled = compile_quietly(model, inputs, passes="quantize", calibration_data=[inputs] * 4,
                               backend="torch", cache=tmp_path)  # fmt: skip
    again = compile_quietly(model, inputs, passes="quantize", calibration_data=[inputs] * 4,
                            backend="torch", cache=tmp_path)  # fmt: skip
    assert again.report.cache["optimize"].startswith("hit") and again.report.cache["lower"].startswith("hit")
    assert torch.equal(compiled(**inputs), again(**inputs))


def test_calibration_data_is_part_of_the_key(tmp_path):
    entry = models.get("mlp")
    model, inputs = entry.build().eval(), entry.example_inputs()
    # A one-shot iterator is read once, hashed and calibrated on; the same data as a list is a hit.
    compile_quietly(model, inputs, passes="quantize", calibration_data=iter([inputs] * 4), cache=tmp_path)
    same = compile_quietly(model, inputs, passes="quantize", calibration_data=[inputs] * 4, cache=tmp_path)
    assert same.report.cache["optimize"].startswith("hit")
    doubled = {k: v * 2 for k, v in inputs.items()}
    other = compile_quietly(model, inputs, passes="quantize", calibration_data=[doubled] * 4, cache=tmp_path)
    assert other.report.cache["optimize"].startswith("miss")


def test_a_cpu_whose_int8_saturates_is_part_of_the_key(tmp_path, monkeypatch):
    """quantize's reduce_range=auto rounds weights to 7 bits on such a CPU: a cache shared with a
    VNNI machine must not hand it (or take from it) the other grid."""
    from torchkiln.driver import api
    from torchkiln.passes import quantize as quantize_pass

    entry = models.get("mlp")
    model, inputs = entry.build().eval(), entry.example_inputs()
    for saturates, verdict in ((True, "miss"), (True, "hit"), (False, "miss")):
        monkeypatch.setattr(api, "int8_saturates", lambda s=saturates: s)
        monkeypatch.setattr(quantize_pass, "int8_saturates", lambda s=saturates: s)
        compiled = compile_quietly(model, inputs, passes="quantize", calibration_data=[inputs] * 4, cache=tmp_path,
                                   backend="torch")  # its int8 is exact float math: no kernel saturates
        assert compiled.report.cache["optimize"].startswith(verdict), (saturates, compiled.report.cache)
        assert ("(7-bit" if saturates else "(8-bit") in " ".join(compiled.report.passes[-1].notes)


def test_a_graph_calling_an_unnamed_function_is_not_cacheable():
    program = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), torch.randn(2, 4), frontend="export")
    node = next(n for n in program.graph_module.graph.nodes if n.op == "call_function")
    node.target = lambda *args, **kwargs: None  # noqa: E731 - what a user's graph might call
    with pytest.raises(cache.NotCacheable, match="which the cache cannot name"):
        cache.round_trip(program)


def test_compile_goes_on_without_the_cache_when_the_graph_is_not_cacheable(tmp_path, monkeypatch):
    def refuse(program):
        raise cache.NotCacheable("cannot name <lambda> for reloading")

    monkeypatch.setattr(cache, "round_trip", refuse)
    model, x = nn.Linear(4, 4).eval(), torch.randn(2, 4)
    compiled = compile_quietly(model, x, cache=tmp_path)
    assert compiled.report.cache == {"optimize": "not cacheable: cannot name <lambda> for reloading"}
    torch.testing.assert_close(compiled(x), model(x))
    assert not (tmp_path / "optimize").exists() and not (tmp_path / "lower").exists()


def test_the_model_fingerprint_follows_weights_and_mode():
    model = models.get("mlp").build().eval()
    first = cache.model_fingerprint(model).hexdigest()
    assert cache.model_fingerprint(model).hexdigest() == first
    model.train()
    assert cache.model_fingerprint(model).hexdigest() != first
    model.eval()
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-6
    assert cache.model_fingerprint(model).hexdigest() != first


def test_hasher_labels_keep_parts_apart():
    assert cache.Hasher().add("a", "bc").hexdigest() != cache.Hasher().add("ab", "c").hexdigest()
    assert cache.Hasher().add("t", torch.zeros(2)).hexdigest() != cache.Hasher().add("t", torch.zeros(2, 1)).hexdigest()
    assert cache.Hasher().add("t", torch.zeros(2)).hexdigest() != cache.Hasher().add("t", torch.zeros(2, dtype=torch.int32)).hexdigest()


def test_the_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHKILN_CACHE_DIR", str(tmp_path / "x"))
    assert cache.default_directory() == tmp_path / "x"
    monkeypatch.delenv("TORCHKILN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_directory() == tmp_path / "xdg" / "torchkiln"


SCALE = 1.0  # read by Scaled.forward: a change the model's key cannot see


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) * SCALE


def test_a_cached_program_whose_eager_outputs_changed_is_stale(tmp_path, monkeypatch):
    model, x = Scaled().eval(), torch.randn(2, 4)
    compile_quietly(model, x, cache=tmp_path)
    assert compile_quietly(model, x, cache=tmp_path).report.cache["optimize"].startswith("hit")
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    again = compile_quietly(model, x, cache=tmp_path)
    assert again.report.cache["optimize"].startswith("miss") and "stale" in again.report.cache["optimize"]
    torch.testing.assert_close(again(x), model(x))


# --- a cache entry is data: nothing in it runs ---------------------------------------------------------------


def _cached_entry(tmp_path):
    """A model compiled once into a fresh cache: (model, example, cache dir, its optimize entry)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), torch.randn(2, 4)
    compile_quietly(model, x, backend="torch", cache=tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "optimize").iterdir()
    return model, x, tmp_path / "cache", entry


def test_a_pickle_planted_in_a_cache_entry_is_never_unpickled(tmp_path):
    from tests.test_artifact_safety import pickle_payload, torch_zip_payload

    model, x, directory, entry = _cached_entry(tmp_path)
    # the old entry's name is never read (a hit on the JSON beside it); a payload in either file of the
    # entry makes it a miss, rebuilt
    for name, payload, verdict in (("program.pt", torch_zip_payload, "hit"), ("program.bin", pickle_payload, "miss"),
                                   ("program.json", pickle_payload, "miss")):  # fmt: skip
        sentinel = tmp_path / f"ran-{name}"
        (entry / name).write_bytes(payload(sentinel))
        compiled = compile_quietly(model, x, backend="torch", cache=directory)
        assert not sentinel.exists(), f"a payload in {name} ran"
        assert compiled.report.cache["optimize"].startswith(verdict), name
        torch.testing.assert_close(compiled(x), model(x))


def _tamper(entry, edit) -> None:
    state = json.loads((entry / "program.json").read_text())
    edit(state)
    (entry / "program.json").write_text(json.dumps(state))


HOSTILE_TARGETS = ["torch.save", "torch.load", "torch.from_file", "builtins.eval", "os.system", "subprocess.run",
                   "torch.manual_seed", "op:aten::from_file.default", "op:aten::_print.default"]  # fmt: skip


@pytest.mark.parametrize("target", HOSTILE_TARGETS)
def test_a_cached_graph_naming_a_function_outside_the_allow_list_is_a_miss(tmp_path, target):
    _, _, _, entry = _cached_entry(tmp_path)

    def edit(state):
        node = next(n for n in state["graph"]["nodes"] if n["op"] in ("call_function", "call_module"))
        node["op"], node["target"] = "call_function", target

    _tamper(entry, edit)
    assert cache.load_program(entry) is None


@pytest.mark.parametrize("cls", ["builtins:eval", "os:system", "subprocess:Popen", "torch.nn.modules.linear:os",
                                 "torch.nn.modules.linear:Linear.__init__.__globals__", "tests.conftest:Perturb"])
def test_a_cached_module_of_a_class_outside_torch_nn_is_a_miss(tmp_path, cls):
    _, _, _, entry = _cached_entry(tmp_path)

    def edit(state):
        next(iter(state["graph"]["modules"].values()))["class"] = cls

    _tamper(entry, edit)
    assert cache.load_program(entry) is None


def test_an_entry_nested_beyond_the_limit_is_a_miss_not_a_recursion_error(tmp_path):
    _, _, _, entry = _cached_entry(tmp_path)
    (entry / "program.json").write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert cache.load_program(entry) is None


def test_a_users_own_leaf_module_is_built_without_the_cache_and_says_why(tmp_path):
    class Mine(nn.Module):
        def forward(self, x):
            return x * 2

    model, x = nn.Sequential(nn.Linear(4, 4), Mine()).eval(), torch.randn(2, 4)
    compiled = compile_quietly(model, x, backend="torch", cache=tmp_path, leaf_modules=["1"])
    assert compiled.report.cache["optimize"].startswith("not cacheable: module '1' is a")
    torch.testing.assert_close(compiled(x), model(x))
    assert not (tmp_path / "optimize").exists()


def test_a_cache_on_a_full_disk_is_skipped_with_a_warning(tmp_path, monkeypatch):
    """torch.save raised a RuntimeError mid-write on a full disk: `kiln build` stopped with an internal error."""

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache, "write_atomic", full)
    model, x = nn.Linear(4, 2).eval(), torch.randn(2, 4)
    with pytest.warns(RuntimeWarning, match="optimize stage was not stored in the build cache .*[Nn]o space left"):
        compiled = compile_quietly(model, x, backend="torch", cache=tmp_path)
    assert "not stored: cannot write to" in compiled.report.cache["optimize"]
    assert "No space left on device" in compiled.report.cache["optimize"]
    torch.testing.assert_close(compiled(x), model(x))
    assert not (tmp_path / "optimize").exists() or not any((tmp_path / "optimize").iterdir())  # nothing half-written


def _rewrite_first_call(state, op, target, args):
    node = next(n for n in state["graph"]["nodes"] if n["op"] in ("call_function", "call_module"))
    node["op"], node["target"], node["args"] = op, target, {"tuple": args}


@pytest.mark.parametrize(("op", "target", "args"), [
    # getattr(x, "__class__") -> __init__ -> __globals__ -> os: any object in the process, then its methods
    ("call_function", "builtins.getattr", [{"node": "x"}, "__class__"]),
    ("call_function", "builtins.getattr", [{"node": "x"}, {"node": "x"}]),
    ("call_method", "__reduce_ex__", [{"node": "x"}, 2]),
    ("call_method", "system", [{"node": "x"}, "touch ran"]),
    ("call_method", "register_hook", [{"node": "x"}, {"node": "x"}]),
    ("call_function", "operator.methodcaller", ["system", "touch ran"]),
    ("call_function", "operator.attrgetter", ["__class__"]),
])  # fmt: skip
def test_a_cached_graph_cannot_reach_past_tensors(tmp_path, op, target, args):
    _, _, _, entry = _cached_entry(tmp_path)
    state = json.loads((entry / "program.json").read_text())
    placeholder = next(n["name"] for n in state["graph"]["nodes"] if n["op"] == "placeholder")
    args = [{"node": placeholder} if a == {"node": "x"} else a for a in args]
    _tamper(entry, lambda s: _rewrite_first_call(s, op, target, args))
    assert cache.load_program(entry) is None


def test_a_cached_get_attr_of_a_module_is_a_miss(tmp_path):
    _, _, _, entry = _cached_entry(tmp_path)

    def edit(state):
        module = next(iter(state["graph"]["modules"]))
        node = next(n for n in state["graph"]["nodes"] if n["op"] == "call_module")
        node["op"], node["target"], node["args"] = "get_attr", module, {"tuple": []}

    _tamper(entry, edit)
    assert cache.load_program(entry) is None
