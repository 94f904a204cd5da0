"""Where a program may be cut into pipeline stages: every legal cut of an int8 program builds and
composes (forced one by one, not only the chosen one); weights, dequantized weights, constants and
sizes never cross; what cannot be received is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import torchkiln
from torchkiln import models
from torchkiln.compiler.verify import Tolerance
from torchkiln.driver import partition as partitioning  # _program: the analysed graph
from torchkiln.errors import ConfigError

INT8 = "cleanup,fold_batchnorm,quantize"


def _int8(name: str, frontend: str = "auto"):
    entry = models.get(name)
    calibration = [entry.example_inputs(batch=2, seed=s) for s in range(3)]
    whole = torchkiln.compile(entry.build(), entry.example_inputs(batch=2), passes=INT8, backend="torch",
                              calibration_data=calibration, latency_runs=0, frontend=frontend,
                              dynamic_axes="batch")  # fmt: skip
    return entry, whole


def _tensors(outputs) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def _every_legal_cut_composes(entry, whole, every: int = 1, backend: str = "torch", tolerance=None) -> int:
    legal = torchkiln.legal_cuts(whole, entry.example_inputs(batch=2))
    other = entry.example_inputs(batch=3, seed=9)  # a batch size the stages were not built at
    want = _tensors(whole(**other))
    for position in sorted(legal)[::every]:
        part = torchkiln.partition(whole, entry.example_inputs(batch=2), stages=2, cuts=[position], backend=backend,
                                   tolerance=tolerance, balance="params")  # fmt: skip (no node timing: cuts given)
        first, second = part.records
        # only batch-carrying activations cross: no weight, dequantized weight, constant or Q/DQ side
        assert all(b.shape[0] == 2 and "quantize" not in b.name for b in first.boundary), (position, first.boundary)
        assert sum(b.bytes for b in first.boundary) == legal[position]
        got = part(**other)
        if tolerance is None:
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=f"cut {position}")
    return len(legal)


def test_every_legal_cut_of_an_int8_resnet_builds_and_composes():
    entry, whole = _int8("resnet")
    gm = whole.artifact.module
    program, _, _ = partitioning._program(whole, entry.example_inputs(batch=2), (), "batch", None)
    dequantized_weights = [n for n in gm.graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert dequantized_weights and all(program.kinds[n] == "constant" for n in dequantized_weights)
    # a cut inside a residual block (its quantized skip path is live) is legal: the float value
    # crosses and the receiving stage quantizes it again (every cut: slow; CI builds every sixteenth)
    assert len(torchkiln.legal_cuts(whole, entry.example_inputs(batch=2))) >= len(program.order) - 2
    _every_legal_cut_composes(entry, whole, every=16)


@pytest.mark.slow
def test_every_single_legal_cut_of_an_int8_resnet_builds_and_composes():
    entry, whole = _int8("resnet")
    assert _every_legal_cut_composes(entry, whole) >= 26


def test_every_twenty_fourth_legal_cut_of_an_int8_encoder_builds_and_composes():
    entry, whole = _int8("text_encoder")  # every cut: slow, below
    assert _every_legal_cut_composes(entry, whole, every=24) >= 40


@pytest.mark.slow
def test_every_legal_cut_of_an_int8_encoder_builds_and_composes():
    entry, whole = _int8("text_encoder")
    assert _every_legal_cut_composes(entry, whole) >= 40


@pytest.mark.slow  # ~3 min: ResNet-18 at 224x224, every third legal cut on ONNX Runtime
def test_every_legal_cut_of_an_int8_resnet18_on_onnxruntime_composes():
    entry, whole = _int8("resnet18")
    assert _every_legal_cut_composes(entry, whole, every=3, backend="onnxruntime",
                                     tolerance=Tolerance(min_cosine=0.99)) > 20  # fmt: skip


@pytest.mark.slow  # ~40 s: a 2-layer BERT (transformers, export frontend: its batch is a sym_size every layer reads)
def test_every_legal_cut_of_an_int8_bert_builds_and_composes():
    transformers = pytest.importorskip("transformers", reason="transformers is a dev extra")
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()

    class Entry:
        @staticmethod
        def example_inputs(batch: int, seed: int = 0):
            ids = torch.randint(0, 1000, (batch, 16), generator=torch.Generator().manual_seed(seed))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    whole = torchkiln.compile(model, Entry.example_inputs(2), passes="cleanup,quantize", backend="torch",
                              calibration_data=[Entry.example_inputs(2, s) for s in range(3)], latency_runs=0,
                              frontend="export", dynamic_axes="batch")  # fmt: skip
    assert _every_legal_cut_composes(Entry, whole) >= 60  # of 63 positions


# every balance is slow: CI's int8 partition case is test_every_legal_cut_of_an_int8_resnet_builds_and_composes
@pytest.mark.parametrize("balance", [pytest.param(b, marks=pytest.mark.slow) for b in ("memory", "latency", "params")])
def test_an_int8_partition_on_onnxruntime_composes_under_every_balance(balance):
    entry = models.get("resnet")
    calibration = [entry.example_inputs(batch=2, seed=s) for s in range(3)]
    part = torchkiln.partition(entry.build(), entry.example_inputs(batch=2), stages=3, balance=balance, passes=INT8,
                               calibration_data=calibration, backend="onnxruntime",
                               tolerance=Tolerance(min_cosine=0.99))  # fmt: skip
    assert [r.backend for r in part.records] == ["onnxruntime"] * 3
    assert part.balance_ratio is not None and all(r.measured_ms and r.measured_ms > 0 for r in part.records)


class SizeUsedAtTheEnd(nn.Module):
    """``x.size(0)`` is read by the last node: every stage after the first rebuilds it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        n = x.size(0)
        return self.b(torch.relu(self.a(x))).reshape(n, 2, 4)


@pytest.mark.parametrize("batch", [1, 2])  # batch 1: the probe batch (2) still tells the batch from a 1
def test_a_size_is_rebuilt_from_what_crosses_not_sent(batch):
    model = SizeUsedAtTheEnd().eval()
    x = torch.randn(batch, 8)
    legal = torchkiln.legal_cuts(model, {"x": x}, passes=())
    assert len(legal) == 3  # every position between the four activations
    for position in legal:
        part = torchkiln.partition(model, {"x": x}, stages=2, passes=(), cuts=[position])
        assert all(b.dtype == "float32" and b.shape[0] == batch for b in part.records[0].boundary)
        other = torch.randn(5, 8)
        torch.testing.assert_close(part(x=other)[0], model(other))


def test_a_static_program_takes_its_sizes_as_they_are():
    model = SizeUsedAtTheEnd().eval()
    x = torch.randn(3, 8)
    part = torchkiln.partition(model, {"x": x}, stages=3, passes=(), dynamic_axes=None)
    torch.testing.assert_close(part(x=x)[0], model(x))


class FeatureCountAtTheEnd(nn.Module):
    """The input's width (8) is read at the end, after every tensor with an axis of 8 is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 3)

    def forward(self, x):
        width = x.size(1)
        return self.a(x).sum(1, keepdim=True).expand(-1, width)


class DtypeUsedAtTheEnd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        kind = x.dtype  # read first and last: live across every position
        return self.b(torch.relu(self.a(x).to(kind))).to(kind)


def test_what_a_stage_cannot_receive_or_rebuild_is_named():
    with pytest.raises(ConfigError, match="carries the size 'size'"):
        torchkiln.partition(FeatureCountAtTheEnd().eval(), {"x": torch.randn(2, 8)}, stages=2, passes=(), cuts=[2])
    # one legal cut (before the dtype is read); a third stage would have to receive the dtype
    assert list(torchkiln.legal_cuts(DtypeUsedAtTheEnd().eval(), {"x": torch.randn(2, 8)}, passes=())) == [1]
    with pytest.raises(ConfigError, match="no legal cut for stage 2.*'getattr_1' is not a tensor"):
        torchkiln.partition(DtypeUsedAtTheEnd().eval(), {"x": torch.randn(2, 8)}, stages=3, passes=())
    with pytest.raises(ConfigError, match="need 1 distinct cuts"):
        torchkiln.partition(SizeUsedAtTheEnd().eval(), {"x": torch.randn(2, 8)}, stages=2, passes=(), cuts=[1, 2])
