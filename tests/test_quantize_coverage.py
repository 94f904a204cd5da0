"""quantize reaches every weight layer, and its stats account for each one: quantized, kept in
float (with the reason) or not recognised (named by module path)."""

from __future__ import annotations

import pytest
import torch
from conftest import compile_quietly
from torch import nn

from torchkiln.compiler.trace import trace
from torchkiln.passes.layers import find_layers, weight_ops


class Conv1D(nn.Module):
    """GPT-2's projection: ``addmm(b, x, W)`` with ``W`` stored as [in, out]."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(shape)


class Projections(nn.Module):
    """The three spellings of a projection by a stored [in, out] matrix, and an embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.c_attn = Conv1D(16, 32)
        self.w = nn.Parameter(torch.randn(32, 24) * 0.2)
        self.u = nn.Parameter(torch.randn(24, 8) * 0.2)

    def forward(self, ids):
        h = torch.relu(self.c_attn(self.embed(ids)))
        h = torch.relu(h @ self.w)
        return torch.mm(h.flatten(0, 1), self.u)


def _quantize(model, inputs, mode="dynamic", calibration=None, **kwargs):
    passes = f"quantize:mode={mode}"
    calibration = (calibration or [inputs] * 3) if mode == "int8" else None
    compiled = compile_quietly(model, inputs, passes=passes, backend="torch", calibration_data=calibration, **kwargs)
    return next(p for p in compiled.report.passes if p.name == "quantize"), compiled


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("mode", ["dynamic", "int8", "weight_only,bits=8"])
def test_projections_by_a_stored_matrix_are_linear_layers(frontend, mode):
    torch.manual_seed(0)
    model, ids = Projections().eval(), torch.randint(0, 50, (2, 6))
    calibration = [{"ids": torch.randint(0, 50, (2, 6))} for _ in range(16)]
    record, compiled = _quantize(model, {"ids": ids}, mode, calibration, frontend=frontend)
    assert record.stats == {"quantized": 3, "float": 1, "unrecognised": 0}
    assert any(n.startswith("embed: left in float, an embedding lookup") for n in record.notes)
    other = torch.randint(0, 50, (2, 6))
    assert torch.nn.functional.cosine_similarity(compiled(other).flatten(), model(other).flatten(), dim=0) > 0.99


def test_a_projection_keeps_one_copy_of_its_matrix():
    program = trace(Projections().eval(), torch.randint(0, 50, (2, 6)), frontend="fx")
    gm = program.graph_module
    before = sum(p.numel() for p in gm.parameters())
    find_layers(gm)
    assert not hasattr(gm, "w")  # `h @ self.w`: its Wᵀ copy replaces it
    assert hasattr(gm.c_attn, "weight")  # still read for its shape in Conv1D.forward
    assert sum(p.numel() for p in gm.parameters()) == before + 16 * 32


def test_a_projection_matrix_shared_with_another_use_is_kept():
    class Tied(nn.Module):  # the same matrix as a projection and, transposed, as a second one
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return (x @ self.w) @ self.w.t()

    model, x = Tied(), torch.randn(2, 8)
    program = trace(model, x, frontend="fx")
    layers, _ = find_layers(program.graph_module)
    assert [layer.kind for layer in layers] == ["linear", "matmul"]  # w.t() is computed: not stored
    assert hasattr(program.graph_module, "w")  # still read by the second product
    torch.testing.assert_close(program.run((x,))[0], model(x))


def test_gpt2_conv1d_layers_are_all_quantized():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    for cls, linears in ((transformers.GPT2Model, 8), (transformers.GPT2LMHeadModel, 9)):
        model = cls(config).eval()
        record, _ = _quantize(model, {"input_ids": torch.randint(0, 100, (1, 8)), "use_cache": False})
        # 4 projections per block (c_attn, c_proj, mlp.c_fc, mlp.c_proj) (+ lm_head); wte/wpe lookups
        assert record.stats == {"quantized": linears, "float": 2, "unrecognised": 0}, record.notes


def _torch_transformer():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 4)).eval()


def test_torch_transformer_modules_are_captured_with_their_projections():
    record, compiled = _quantize(_torch_transformer(), torch.randn(1, 8, 32))
    assert compiled.report.flavour == "export"  # fx would keep TransformerEncoder as one call
    # per layer: packed in_proj, out_proj, linear1, linear2; plus the head
    assert record.stats == {"quantized": 9, "float": 0, "unrecognised": 0}


def test_an_opaque_module_call_is_named_not_silently_skipped():
    record, compiled = _quantize(_torch_transformer(), torch.randn(1, 8, 32), frontend="fx")
    assert compiled.report.flavour == "fx"
    assert record.stats == {"quantized": 1, "float": 0, "unrecognised": 1}
    assert "0: not recognised, a TransformerEncoder module call: its weights are invisible to passes " \
        "(capture with frontend='export')" in record.notes  # fmt: skip


def test_a_leaf_module_the_user_asked_for_stays_fx():
    model = _torch_transformer()
    program = trace(model, torch.randn(1, 8, 32), leaf_modules=["0"])
    assert program.flavour == "fx"


def test_every_weight_op_is_accounted_for():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 8, 3)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.proj = nn.Linear(8, 8)
            self.mix = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            h = self.lstm(self.conv(x).transpose(1, 2))[0]
            return torch.einsum("btc,cd->btd", self.proj(h), self.mix)

    model, x = Mixed().eval(), torch.randn(2, 4, 10)
    record, _ = _quantize(model, x, frontend="fx")
    program = trace(model, x, frontend="fx")
    find_layers(program.graph_module)
    assert len(weight_ops(program.graph_module)) == 4
    assert record.stats == {"quantized": 1, "float": 2, "unrecognised": 1}
    assert "conv: left in float, conv layers are not quantized in mode=dynamic" in record.notes
    assert "lstm: left in float, LSTM layers are not handled by this pass" in record.notes
    assert any(n.startswith("einsum: not recognised, einsum with a stored weight") for n in record.notes), record.notes


class CastsToWeightDtype(nn.Module):
    """``x.to(self.l.weight.dtype)``: torch.export records it with ``_assert_tensor_metadata``."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)

    def forward(self, x):
        return self.l(x.to(self.l.weight.dtype)).float().softmax(-1)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_fp16_on_a_graph_that_casts_to_the_weight_dtype(frontend):
    model, x = CastsToWeightDtype().eval(), torch.randn(2, 8)
    compiled = compile_quietly(model, x, passes="quantize:mode=fp16", backend="torch", frontend=frontend)
    record = compiled.report.passes[0]
    assert record.stats["fp16_ops"] >= 1 and compiled.report.flavour == frontend
    other = torch.randn(2, 8)
    torch.testing.assert_close(compiled(other), model(other), atol=1e-3, rtol=1e-2)


def test_a_failing_pass_names_the_graph_node_on_the_first_line():
    from torchkiln.compiler.passes import Pass, PassResult
    from torchkiln.errors import PassError

    class Breaks(Pass):
        name = "test_breaks"

        def run(self, program):
            gm = program.graph_module
            for node in gm.graph.nodes:
                if node.op == "call_function":
                    node.args = (node.args[0], torch.randn(3, 3), *node.args[2:])  # a wrong weight shape
                    break
            gm.recompile()
            torch.fx.Interpreter(gm).run(*program.example_inputs)
            return PassResult(modified=True)

    with pytest.raises(PassError) as info:
        compile_quietly(CastsToWeightDtype().eval(), torch.randn(2, 8), passes=[Breaks()], frontend="export")
    first = str(info.value).splitlines()[0]
    assert "while running test_breaks after []: at node '" in first and "RuntimeError" in first


def test_a_dynamic_axis_the_exporter_froze_is_explained_and_onnxruntime_stays_quiet(capfd, monkeypatch):
    """The exporter fixing an axis to its traced size, as it did to an LSTM feeding a GRU until it was
    given the recurrent ops' shapes (``recurrent_shapes``, switched off here to bring the freeze back)."""
    import contextlib

    from coverage_models import LstmGru

    from torchkiln.backends import onnx_backend
    from torchkiln.compiler import export
    from torchkiln.errors import BackendError

    for module in (export, onnx_backend):
        monkeypatch.setattr(module, "recurrent_shapes", contextlib.nullcontext)
    axes = {"x": {0: "batch", 1: "sequence"}}
    with pytest.raises(BackendError) as info:
        compile_quietly(LstmGru().eval(), torch.randn(1, 10, 16), dynamic_axes=axes)
    err = info.value
    assert "artifact fails at input shapes x: [1, 10, 16]" in err.message and "'sequence'" in err.message
    assert "drop that axis from dynamic_axes, or use backend='torch'" in err.hint
    assert "[E:onnxruntime" not in capfd.readouterr().err  # its own log line would sit above our error
    compiled = compile_quietly(LstmGru().eval(), torch.randn(1, 10, 16), dynamic_axes=axes, backend="torch")
    assert compiled(torch.randn(2, 7, 16)).shape == (2, 7, 4)  # the torch backend keeps the axis


def _mixtral(transformers):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    ids = torch.randint(0, 50, (1, 6))
    return trace(transformers.MixtralModel(config).eval(), {"input_ids": ids, "use_cache": False})


@pytest.mark.parametrize(
    ("mode", "op"), [("dynamic", "grouped_dynamic_mm"), ("weight_only,bits=4,block_size=16", "grouped_weight_only_mm")]
)
def test_mixture_of_experts_grouped_matmuls_are_counted_and_quantized(mode, op):
    """transformers' experts multiply by one [experts, in, out] tensor in a grouped matmul: each is a
    weight op of the count (before, they were missing from it). Dynamic int8 and weight-only
    quantize every expert's weight; experts named in ``ignore`` stay in float and are named."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from torchkiln.compiler.passes import parse_pipeline

    program = _mixtral(transformers)
    experts = [op for op in weight_ops(program.graph_module) if op.kind == "experts"]
    assert len(experts) == 4  # gate/up and down per layer
    for pass_ in parse_pipeline(f"cleanup,quantize:mode={mode}"):
        result = pass_(program)
    assert result.stats == {"quantized": 14, "float": 1, "unrecognised": 0}  # 10 linear layers + 4 experts
    target = getattr(torch.ops.torchkiln, op).default
    assert sum(n.target is target for n in program.graph_module.graph.nodes) == 4
    assert not [op for op in weight_ops(program.graph_module) if op.kind == "experts"]

    program = _mixtral(transformers)
    for pass_ in parse_pipeline(f"cleanup,quantize:mode={mode},ignore=*.experts"):
        result = pass_(program)
    named = [n for n in result.notes if n.endswith(".experts: left in float, named in ignore")]
    assert len(named) == 4 and result.stats == {"quantized": 10, "float": 5, "unrecognised": 0}
