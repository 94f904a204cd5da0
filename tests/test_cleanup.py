"""cleanup: structure, numerics, the no-op case and the cases it must leave alone."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_ZOO, op_count
from torch import nn

from torchkiln import models
from torchkiln.compiler.manager import PassManager
from torchkiln.compiler.passes import parse_pass
from torchkiln.compiler.trace import trace

FLAVOURS = ["fx", "export"]


def run_cleanup(model, inputs, frontend="fx", spec="cleanup", **trace_kwargs):
    program = trace(model, inputs, frontend=frontend, **trace_kwargs)
    records = PassManager([parse_pass(spec)]).run(program)  # verifies numerics at fp32 tolerance
    return program, records[0]


class NoOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()

    def forward(self, x):
        h = self.ident(self.drop(self.fc(x)))
        h = torch.nn.functional.dropout(h, 0.3, training=False)
        h = (h * 1 + 0).contiguous()
        h = 1 * h - 0
        return h / 1


@pytest.mark.parametrize("frontend", FLAVOURS)
def test_noops_are_removed_and_outputs_match(frontend):
    program, record = run_cleanup(NoOps().eval(), torch.randn(2, 8), frontend)
    assert record.modified and record.stats["noops_removed"] >= 6
    ops = set(record.ops_after)
    assert ops <= {"Linear", "aten.linear"}, ops
    assert record.max_abs_error == 0.0


def test_dropout_in_training_mode_is_kept():
    model = NoOps().train()
    program = trace(model, torch.randn(2, 8), frontend="fx")
    record = PassManager([parse_pass("cleanup")], instruments=[]).run(program)[0]
    assert op_count(program.graph_module, "Dropout") == 1
    assert op_count(program.graph_module, "dropout") == 0  # F.dropout(training=False) still goes
    assert record.stats["noops_removed"] >= 5


def test_type_changing_identities_are_kept():
    class Promote(nn.Module):
        def forward(self, mask, x):
            return mask * 1, x + 0, x.int() * 1.0  # bool->int64, kept; float, dropped; int->float, kept

    inputs = (torch.tensor([True, False]), torch.randn(2))
    program, record = run_cleanup(Promote(), inputs)
    assert record.stats["noops_removed"] == 1
    outputs = program.run(inputs)
    assert outputs[0].dtype == torch.int64 and outputs[2].dtype == torch.float32


class Reshapes(nn.Module):
    def forward(self, x):
        a = x.reshape(x.size(0), 4, 4).reshape(x.size(0), 16)  # chain -> one reshape -> identity
        b = x.view(x.size(0), -1)  # same shape at any batch: identity
        c = x.flatten(1)  # rank 2 already: identity
        d = x.view(1, -1)  # same shape at batch 1 only: must stay when batch is dynamic
        return a + b + c, d


@pytest.mark.parametrize("frontend", FLAVOURS)
def test_reshapes_with_dynamic_batch(frontend):
    program, record = run_cleanup(Reshapes(), torch.randn(1, 16), frontend, dynamic_axes="batch")
    assert record.stats["reshapes_removed"] >= 4
    reshapes = [
        n for n in program.graph_module.graph.nodes if "view" in str(n.target) or "reshape" in str(n.target)
    ]
    assert len(reshapes) == 1  # only x.view(1, -1) is left
    # at batch 2 the kept reshape still does what the original did
    out = program.run((torch.randn(2, 16),))
    assert out[1].shape == (1, 32)


def test_reshape_without_dynamic_axes_at_same_shape_is_removed():
    program, record = run_cleanup(Reshapes(), torch.randn(1, 16))
    assert not any(
        "view" in str(n.target) or "reshape" in str(n.target) for n in program.graph_module.graph.nodes
    )


class Constants(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.register_buffer("offset", torch.randn(8))

    def forward(self, x):
        w = (self.w.t() * 2).contiguous()  # parameters only: folded
        noise = torch.rand(8)  # random: never folded
        return x @ w + self.offset.exp(), noise.shape[0] * x


@pytest.mark.parametrize("frontend, folded", [("fx", 1), ("export", 2)])
def test_constant_subgraphs_are_folded(frontend, folded):
    # fx evaluates buffer and factory calls while tracing, so only the parameter chain is left to
    # fold there; the export graph also keeps exp(offset) and the random op as nodes.
    program = trace(Constants(), torch.randn(2, 8), frontend=frontend)
    record = PassManager([parse_pass("cleanup")]).run(program)[0]
    assert record.stats["constants_folded"] == folded
    ops = set(record.ops_after)
    assert not {"t", "exp", "aten.t", "aten.exp", "aten.permute"} & ops, ops
    assert [k for k in record.ops_before if "rand" in k] == [k for k in ops if "rand" in k]
    assert record.params_after == record.params_before  # a folded parameter stays a parameter


def test_constant_folding_respects_size_limit():
    class Grow(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = nn.Parameter(torch.randn(1, 64))

        def forward(self, x):
            return x + self.v.expand(64, 64).contiguous()

    program = trace(Grow(), torch.randn(64, 64), frontend="fx")
    record = PassManager([parse_pass("cleanup:max_constant_bytes=1024,remove_noops=false")]).run(program)[0]
    assert record.stats["constants_folded"] == 0
    program = trace(Grow(), torch.randn(64, 64), frontend="fx")
    record = PassManager([parse_pass("cleanup:remove_noops=false")]).run(program)[0]
    assert record.stats["constants_folded"] == 1


def test_dead_code_is_removed():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    program, record = run_cleanup(Dead(), torch.randn(1, 4))
    assert record.stats["dead_nodes_removed"] == 1
    assert not hasattr(program.graph_module, "unused")
    assert record.params_after < record.params_before


@pytest.mark.parametrize("frontend", FLAVOURS)
def test_an_unused_attention_without_dropout_is_dead_code(frontend):
    """torch tags scaled_dot_product_attention nondeterministic (for its dropout_p), which kept an
    unused one — and every projection feeding it — alive (an encoder-decoder's encoder graph)."""

    class UnusedAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            q, k = self.q(x), self.k(x)
            nn.functional.scaled_dot_product_attention(q, k, k)  # result unused
            return self.out(x) + k

    program, record = run_cleanup(UnusedAttention(), torch.randn(1, 3, 8), frontend=frontend)
    assert not hasattr(program.graph_module, "q") and record.stats["dead_nodes_removed"] >= 2
    assert hasattr(program.graph_module, "k")  # still used by the output


@pytest.mark.parametrize("frontend", FLAVOURS)
@pytest.mark.parametrize("name", SMALL_ZOO)
def test_every_zoo_model_then_second_run_is_a_no_op(name, frontend):
    entry = models.get(name)
    program = trace(entry.build(), entry.example_inputs(), frontend=frontend, dynamic_axes=entry.dynamic_axes)
    manager = PassManager([parse_pass("cleanup")])
    first = manager.run(program)[0]
    assert first.max_abs_error is not None and first.max_abs_error <= 1e-5
    graph_before = program.graph_module.graph.python_code("self").src
    second = manager.run(program)[0]
    assert second.modified is False and not any(second.stats.values())
    assert program.graph_module.graph.python_code("self").src == graph_before


class GroupedQueryAttention(nn.Module):
    """4 query heads over 2 key/value heads, the keys and values repeated as transformers' repeat_kv
    does (``tile=False``: query head i reads kv head i // 2) or tiled (``tile=True``: i % 2)."""

    def __init__(self, tile: bool = False):
        super().__init__()
        self.q, self.kv, self.tile = nn.Linear(16, 16), nn.Linear(16, 16), tile

    def forward(self, x, mask):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, 8).transpose(1, 2).split(4, dim=-1)
        if self.tile:
            k, v = (h[:, None].expand(b, 2, 2, t, 4).reshape(b, 4, t, 4) for h in (k, v))
        else:
            k, v = (h[:, :, None, :, :].expand(b, 2, 2, t, 4).reshape(b, 4, t, 4) for h in (k, v))
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool())
        return out.transpose(1, 2).reshape(b, t, 16)


def _gqa_inputs():
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    return {"x": torch.randn(2, 6, 16), "mask": mask}


def test_repeated_key_value_heads_feed_attention_directly():
    axes = {"x": {0: "batch", 1: "sequence"}, "mask": {0: "batch", 1: "sequence"}}
    program, record = run_cleanup(GroupedQueryAttention(), _gqa_inputs(), frontend="export", dynamic_axes=axes)
    assert record.stats["repeated_kv_removed"] == 1  # and the manager checked the outputs at fp32
    assert op_count(program.graph_module, "aten.expand") == 0
    (attention,) = [n for n in program.graph_module.graph.nodes if "scaled_dot" in str(n.target)]
    assert attention.kwargs["enable_gqa"] is True
    assert [tuple(a.meta["tensor_meta"].shape) for a in attention.args[1:3]] == [(2, 2, 6, 4)] * 2


def test_tiled_key_value_heads_are_not_grouped_attention():
    """Heads tiled (i % 2) are not grouped-query heads (i // 2): rewriting them would change the result."""
    program, record = run_cleanup(GroupedQueryAttention(tile=True), _gqa_inputs(), frontend="export")
    assert record.stats["repeated_kv_removed"] == 0
    assert op_count(program.graph_module, "aten.expand") == 2
