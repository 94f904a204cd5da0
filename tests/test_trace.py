"""trace(): input/output structures, both frontends, the model is never mutated, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchkiln import models
from torchkiln.compiler.trace import trace
from torchkiln.errors import ConfigError, TraceError


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, x, y, scale=None):
        h = self.a(x) + self.b(y)
        return {"sum": h, "parts": [self.a(x), (self.b(y),)]}


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), Branchy())

    def forward(self, x):
        return self.body(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_positional_keyword_and_nested_outputs(frontend):
    model = TwoInputs().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    program = trace(model, {"y": y, "x": x}, frontend=frontend)
    assert [s.name for s in program.inputs] == ["x", "y"]  # signature order, not call order
    assert program.flavour == frontend
    assert [s.shape for s in program.outputs] == [(2, 3)] * 3
    flat = program.run((x, y))
    expected = model(x, y)
    torch.testing.assert_close(flat[0], expected["sum"])
    torch.testing.assert_close(flat[2], expected["parts"][1][0])
    rebuilt = torch.utils._pytree.tree_unflatten(list(flat), program.out_spec)
    assert set(rebuilt) == {"sum", "parts"} and isinstance(rebuilt["parts"][1], tuple)


def test_single_tensor_and_tuple_inputs():
    model = TwoInputs().eval()
    program = trace(model, (torch.randn(1, 4), torch.randn(1, 5)), frontend="fx")
    assert [s.name for s in program.inputs] == ["x", "y"]
    single = trace(nn.Linear(4, 2), torch.randn(3, 4))
    assert single.inputs[0].shape == (3, 4) and single.inputs[0].dtype == "float32"


def test_shape_metadata_on_every_tensor_node():
    program = trace(models.build("resnet"), torch.randn(1, 3, 32, 32), frontend="fx")
    for node in program.graph_module.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            assert "tensor_meta" in node.meta, node.name


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_user_model_is_not_mutated(frontend):
    model = models.build("mlp")
    before = copy.deepcopy(model.state_dict())
    program = trace(model, torch.randn(2, 64), frontend=frontend)
    for p in program.graph_module.parameters():
        p.data.add_(1.0)  # what a rewriting pass might do
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_fx_failure_names_module_line_cause_and_fix():
    with pytest.raises(TraceError) as info:
        trace(DataDependent(), torch.randn(2, 4), frontend="fx")
    err = info.value
    assert "data-dependent control flow" in err.message
    assert "module 'body.1'" in err.where and "test_trace.py" in err.where and "if x.sum() > 0" in err.where
    assert "leaf_modules=['body.1']" in err.hint and "frontend='export'" in err.hint
    assert "concrete_args" not in err.hint  # not a compile() argument: suggest only what works


def test_fx_failure_in_the_root_module_suggests_no_leaf():
    class RootBranch(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(TraceError) as info:
        trace(RootBranch(), torch.randn(2, 4), frontend="fx")
    err = info.value
    assert "RootBranch.forward" in err.where and "if x.sum() > 0" in err.where
    assert "leaf_modules" not in err.hint and "(root)" not in err.hint and "frontend='export'" in err.hint


def test_leaf_module_makes_it_traceable():
    program = trace(DataDependent(), torch.randn(2, 4), frontend="fx", leaf_modules=["body.1"])
    assert any(n.op == "call_module" and n.target == "body.1" for n in program.graph_module.graph.nodes)


def test_auto_falls_back_to_export():
    class ShapeLoop(nn.Module):  # iterating a size is untraceable by fx, fine for torch.export
        def forward(self, x):
            out = x
            for _ in range(x.shape[1]):
                out = out + 1
            return out

    program = trace(ShapeLoop(), torch.randn(2, 3))
    assert program.flavour == "export"
    torch.testing.assert_close(program.run((torch.ones(2, 3),))[0], torch.full((2, 3), 4.0))


def test_auto_reports_both_failures():
    with pytest.raises(TraceError, match="torch.export also failed") as info:
        trace(DataDependent(), torch.randn(2, 4))
    assert "leaf_modules=['body.1']" in info.value.hint and "torch.cond" in info.value.hint
    assert "frontend='export'" not in info.value.hint


def test_dynamic_axes_add_a_second_check_and_name_output_axes():
    program = trace(nn.Linear(4, 2), torch.randn(1, 4), dynamic_axes="batch")
    assert program.inputs[0].shape == ("batch", 4)
    assert len(program.checks) == 2 and program.checks[1].inputs[0].shape[0] == 2
    assert isinstance(program.outputs[0].shape[0], str) and program.outputs[0].shape[1] == 2


def test_axis_the_model_cannot_vary_is_refused():
    class FixedLength(nn.Module):
        def forward(self, x):
            return x.reshape(x.size(0), 12 * 4)

    with pytest.raises(ConfigError, match="does not run when its dynamic axes"):
        trace(FixedLength(), torch.randn(1, 12, 4), dynamic_axes={"x": {0: "batch", 1: "seq"}})


def test_axis_that_export_specializes_is_named():
    class PythonInt(nn.Module):
        def forward(self, x):
            n = int(x.size(1))  # a Python int: torch.export pins the axis to the traced size
            return x.reshape(x.size(0), n * 4)

    with pytest.raises(ConfigError, match="does not reproduce the model at input shapes"):
        trace(
            PythonInt(), torch.randn(1, 12, 4), frontend="export", dynamic_axes={"x": {0: "batch", 1: "seq"}}
        )
