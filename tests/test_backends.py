"""Backends: every zoo model on torch and ONNX Runtime (dynamic axes), ONNX details, options."""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import SWEEP_ZOO, compile_quietly
from torch import nn

import torchkiln
from torchkiln import models
from torchkiln.errors import BackendError, ConfigError, ExportError


def other_sizes(entry: models.ZooEntry) -> dict[str, torch.Tensor]:
    """Inputs at batch 3 (and sequence 20 where the sequence is dynamic): off the traced shape."""
    inputs = entry.example_inputs(batch=3, seed=7)
    for spec in entry.inputs:
        if (1, "sequence") in spec.dynamic:
            t = inputs[spec.name]
            inputs[spec.name] = torch.cat([t, t, t[:, :8]], dim=1)[:, :20]
    return inputs


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", SWEEP_ZOO)
def test_zoo_model_matches_eager_at_other_batch_sizes(name, backend):
    entry = models.get(name)
    model = entry.build()
    compiled = compile_quietly(
        model, entry.example_inputs(), backend=backend, dynamic_axes=entry.dynamic_axes
    )
    inputs = other_sizes(entry)
    with torch.no_grad():
        expected = model(**inputs)
    actual = compiled(**inputs)
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 1e-4 * max(scale, 1.0)
    assert compiled.report.artifact.max_rel_error <= 1e-4


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory):
    entry = models.get("resnet")
    compiled = compile_quietly(entry.build(), entry.example_inputs(), backend="onnx", dynamic_axes="batch")
    directory = compiled.save(tmp_path_factory.mktemp("resnet") / "artifact")
    return compiled, onnx.load(str(directory / "model.onnx"))


def test_onnx_node_names_trace_back_to_modules(resnet_onnx):
    _, model = resnet_onnx
    names = {n.name for n in model.graph.node}
    assert "layer1.0.conv1/Conv" in names and "fc/Gemm" in names, sorted(names)[:20]
    assert all(n.metadata_props for n in model.graph.node)  # exporter's fx_node / scope records kept


def test_onnx_dynamic_axes_carry_their_names(resnet_onnx):
    _, model = resnet_onnx
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.opset_import[0].version == 23


def test_onnx_opset_option(tmp_path):
    compiled = compile_quietly(
        nn.Linear(4, 2), torch.randn(1, 4), backend="onnx", backend_options={"opset": 20}
    )
    model = onnx.load(str(compiled.save(tmp_path / "a") / "model.onnx"))
    assert model.opset_import[0].version == 20
    with pytest.raises(ConfigError, match="opset' must be between 18"):
        compile_quietly(nn.Linear(4, 2), torch.randn(1, 4), backend="onnx", backend_options={"opset": 11})


def test_external_data(tmp_path):
    compiled = compile_quietly(
        nn.Linear(64, 64), torch.randn(1, 64), backend_options={"external_data": "always"}
    )
    directory = compiled.save(tmp_path / "a")
    assert (directory / "model.onnx.data").stat().st_size >= 64 * 64 * 4
    import torchkiln

    loaded = torchkiln.load(directory)
    x = torch.randn(1, 64)
    torch.testing.assert_close(loaded(x), compiled(x))


def test_unsupported_op_names_fx_node_and_module():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    model = nn.Sequential(nn.Linear(4, 4), Odd())
    with pytest.raises(ExportError) as info:
        compile_quietly(model, torch.randn(2, 4), backend="onnx")
    # the exporter's dispatcher has no function for it: that (and only that) is a missing translation
    assert "no ONNX translation for prims.bessel_j0" in info.value.message
    assert "module '1'" in info.value.where and "FX node" in info.value.where


class MultiQuery(nn.Module):
    """Falcon-style multi-query attention: 4 query heads, one key/value head broadcast over them."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, 1, 4).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, 16)


@pytest.mark.parametrize("passes", ["cleanup", ""])
def test_multi_query_attention_broadcasting_one_kv_head_exports(passes):
    """The exporter's Attention requires equal or grouped head counts; attention over one broadcast
    KV head reaches it as grouped (enable_gqa: query head i reads KV head 0), with or without cleanup."""
    torch.manual_seed(0)
    model, x = MultiQuery().eval(), torch.randn(1, 5, 16)
    compiled = compile_quietly(model, x, dynamic_axes={"x": {0: "batch", 1: "sequence"}}, passes=passes)
    other = torch.randn(3, 7, 16)
    torch.testing.assert_close(compiled(other), model(other), atol=1e-5, rtol=1e-4)


def test_an_export_failure_without_a_node_line_names_the_deepest_cause(monkeypatch):
    """Without that rewrite the exporter's translation rejects the op: the error names the op and
    the exporter's own reason (deepest in the chain), not a missing translation."""
    from torchkiln.backends import onnx_backend

    monkeypatch.setattr(onnx_backend, "_broadcast_heads", lambda node: False)
    with pytest.raises(ExportError) as info:
        compile_quietly(MultiQuery().eval(), torch.randn(1, 5, 16), backend="onnx")
    message = info.value.message
    assert "no ONNX translation" not in message
    assert "translating aten.scaled_dot_product_attention.default" in message
    assert "q_num_heads = kv_num_heads" in message


def test_provider_selection():
    with pytest.raises(BackendError, match="NopeExecutionProvider not available") as info:
        compile_quietly(
            nn.Linear(4, 2), torch.randn(1, 4), backend_options={"providers": "NopeExecutionProvider"}
        )
    assert "CPUExecutionProvider" in info.value.hint
    compiled = compile_quietly(
        nn.Linear(4, 2), torch.randn(1, 4), backend_options={"providers": ["CPUExecutionProvider"]}
    )
    assert compiled.report.artifact.notes == ["providers: CPUExecutionProvider"]


def test_session_options_and_optimized_model(tmp_path):
    options = {"graph_optimization_level": "basic", "intra_op_threads": 1, "save_optimized": True}
    compiled = compile_quietly(nn.Linear(4, 2), torch.randn(1, 4), backend_options=options)
    directory = compiled.save(tmp_path / "a")
    assert onnx.load(str(directory / "model.optimized.onnx")).graph.node
    with pytest.raises(ConfigError, match="not one of disable, basic, extended, all"):
        compile_quietly(
            nn.Linear(4, 2), torch.randn(1, 4), backend_options={"graph_optimization_level": "max"}
        )


@pytest.mark.parametrize("backend, options, message", [
    ("tvm", {}, "unknown backend 'tvm'"),
    ("onnxruntime", {"threads": 2}, "unknown option 'threads'"),
    ("torch", {"opset": 18}, "unknown option 'opset'"),
])  # fmt: skip
def test_bad_backend_or_option(backend, options, message):
    with pytest.raises(ConfigError, match=message):
        compile_quietly(nn.Linear(4, 2), torch.randn(1, 4), backend=backend, backend_options=options)


def test_the_translation_table_picks_up_transformers_moe_op_registered_after_a_first_export(monkeypatch):
    """transformers registers its grouped matmul when a model imports its MoE layers, possibly after
    an earlier export in the process cached the table: that entry is looked up per export (a cached
    table failed Mixtral with 'no ONNX translation' depending on test order)."""
    from torchkiln.backends import onnx_lowering

    monkeypatch.setattr(onnx_lowering, "_registered", lambda namespace, name: None)
    assert len(onnx_lowering.translation_table()) == 5  # torchkiln's ops only
    monkeypatch.setattr(onnx_lowering, "_registered", lambda namespace, name: "transformers-op")
    table = onnx_lowering.translation_table()
    assert len(table) == 6 and callable(table["transformers-op"])


class _LstmGruClassifier(nn.Module):
    """A user's own recurrent classifier: an LSTM feeding a bidirectional GRU, the last step classified."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.gru = nn.GRU(32, 24, batch_first=True, bidirectional=True)
        self.head = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.lstm(x)[0])[0][:, -1])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_an_lstm_feeding_a_gru_keeps_a_dynamic_sequence_on_onnx(backend, tmp_path):
    """torch shaped the recurrent ops by unrolling them over the traced length: the ONNX graph held a
    Reshape to it and ONNX Runtime failed ('lstm/Reshape') even at the example's own size."""
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed (pip install 'torchkiln[openvino]')")
    model = _LstmGruClassifier().eval()
    compiled = compile_quietly(model, {"x": torch.randn(2, 10, 16)}, backend=backend,
                               dynamic_axes={"x": {0: "batch", 1: "sequence"}})  # fmt: skip
    loaded = torchkiln.load(compiled.save(tmp_path / "artifact"))
    for shape in [(1, 1, 16), (1, 3, 16), (3, 25, 16)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x=x), model(x), atol=1e-5, rtol=1e-4)


def test_recurrent_shapes_leaves_real_tensors_to_the_real_kernels():
    """The export-time shape kernels answer fake tensors only: a server thread running an LSTM while
    another compiles gets real outputs, not empty tensors of the right shape."""
    from torchkiln.compiler.export import recurrent_shapes

    model = _LstmGruClassifier().eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        want = model(x)
        with recurrent_shapes():
            got = model(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_recurrent_shapes_from_many_threads_restores_the_kernels():
    """Exports in two threads, the first in leaving first: the last one out restores torch's own
    kernels (saved and restored per context, the second would have saved the first's shape-only
    kernels and put them back at its end)."""
    import threading

    from torch._decomp import decomposition_table

    from torchkiln.compiler.export import recurrent_shapes

    op = torch.ops.aten.lstm.input
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    before = (op.py_kernels.get(key), decomposition_table.get(op))
    entered = [threading.Event(), threading.Event()]
    leave = [threading.Event(), threading.Event()]

    def export_for_a_while(index: int) -> None:
        with recurrent_shapes():
            entered[index].set()
            leave[index].wait()

    threads = [threading.Thread(target=export_for_a_while, args=(i,)) for i in range(2)]
    threads[0].start()
    entered[0].wait()
    threads[1].start()
    entered[1].wait()
    assert op.py_kernels.get(key) is not before[0]  # installed while they run
    for index in (0, 1):
        leave[index].set()
        threads[index].join()
    assert (op.py_kernels.get(key), decomposition_table.get(op)) == before
