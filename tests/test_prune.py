"""The prune pass: unstructured (per layer, global) and 2:4 magnitude pruning."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_ZOO, compile_quietly
from torch import nn

from torchkiln import models
from torchkiln.errors import ConfigError, PassError
from torchkiln.passes.prune import kth_magnitude, two_of_four


def weights(compiled) -> dict[str, torch.Tensor]:
    gm = compiled.artifact.module
    return {n: p for n, p in gm.named_parameters() if n.endswith("_pruned")}


def test_ratio_zero_is_the_identity():
    entry = models.get("resnet")
    compiled = compile_quietly(entry.build(), entry.example_inputs(1), passes="prune:ratio=0", backend="torch")
    record = compiled.report.passes[0]
    assert record.modified is False and record.max_abs_error == 0.0


def test_per_layer_ratio_zeroes_that_share_of_every_layer():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    compiled = compile_quietly(model, torch.randn(4, 16), passes="prune:ratio=0.25", backend="torch")
    pruned = weights(compiled)
    assert len(pruned) == 2
    for original, (name, weight) in zip((model[0].weight, model[2].weight), sorted(pruned.items())):
        assert float((weight == 0).float().mean()) == pytest.approx(0.25, abs=1 / weight.numel())
        kept = weight != 0
        assert torch.equal(weight[kept], original.detach()[kept]), name  # survivors unchanged
        assert original.detach().abs()[~kept].max() <= original.detach().abs()[kept].min()
    assert "0: 25.0% of weights zero" in compiled.report.passes[0].notes
    assert compiled.report.passes[0].stats["sparsity"] == pytest.approx(0.25, abs=0.01)


def test_global_scope_uses_one_threshold():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    with torch.no_grad():
        model[2].weight.mul_(100.0)  # the second layer's weights are all larger
    compiled = compile_quietly(model, torch.randn(2, 8), passes="prune:ratio=0.5,scope=global", backend="torch")
    first, second = (w for _, w in sorted(weights(compiled).items()))
    assert bool((first == 0).all()) and bool((second != 0).all())
    assert any("the layer is dead" in n for n in compiled.report.passes[0].notes)


def test_two_of_four_keeps_the_two_largest_of_each_group():
    weight = torch.randn(6, 8, 3, 3)
    mask = two_of_four(weight)
    groups = mask.permute(0, 2, 3, 1).reshape(-1, 4)
    assert bool((groups.sum(1) == 2).all())
    magnitudes = weight.abs().permute(0, 2, 3, 1).reshape(-1, 4)
    assert bool((magnitudes[groups].view(-1, 2).min(1).values >= magnitudes[~groups].view(-1, 2).max(1).values).all())


def test_two_of_four_skips_layers_it_cannot_pattern():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    compiled = compile_quietly(model, torch.randn(1, 3, 9, 9), passes="prune:pattern=2:4", backend="torch")
    notes = compiled.report.passes[0].notes
    assert "0: not pruned, 2:4 needs input channels divisible by 4" in notes
    assert compiled.report.passes[0].stats["layers"] == 1


def test_kth_magnitude():
    values = torch.tensor([3.0, 1.0, 2.0, 4.0])
    assert kth_magnitude(values, 0.5) == 2.0 and kth_magnitude(values, 0.1) == -1.0


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_zoo_prunes_and_runs_on_onnxruntime(name):
    entry = models.get(name)
    compiled = compile_quietly(
        entry.build(), entry.example_inputs(2), passes="fold_batchnorm,prune:ratio=0.3", dynamic_axes=entry.dynamic_axes
    )
    record = compiled.report.passes[-1]
    assert record.modified and record.stats["sparsity"] == pytest.approx(0.3, abs=0.01)
    # no promise against eager: the artifact is held to the pruned graph at fp32
    assert "against the rewritten graph" in compiled.report.artifact.tolerance


def test_a_cosine_promise_is_enforced():
    entry = models.get("mlp")
    with pytest.raises(PassError, match="broke its accuracy promise"):
        compile_quietly(entry.build(), entry.example_inputs(2), passes="prune:ratio=0.9,min_cosine=0.999")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("prune:ratio=1", r"must be in \[0, 1\)"),
        ("prune:ratio=-0.1", r"must be in \[0, 1\)"),
        ("prune:pattern=2:4,ratio=0.3", "leave ratio unset"),
        ("prune:scope=model", "is not one of"),
    ],
)
def test_bad_options(spec, message):
    with pytest.raises(ConfigError, match=message):
        compile_quietly(nn.Linear(4, 2), torch.randn(1, 4), passes=spec)


def test_ignored_layers_are_left_alone_with_a_note():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    compiled = compile_quietly(model, torch.randn(2, 8), passes="prune:ratio=0.5,ignore=2", backend="torch")
    assert "2: not pruned, named in ignore" in compiled.report.passes[0].notes
    assert compiled.report.passes[0].stats["layers"] == 1
