"""The prune pass: unstructured (per layer, global) and 2:4 magnitude pruning."""

from __future__ import annotations

import pytest
import torch
from conftest import SWEEP_ZOO, compile_quietly
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


@pytest.mark.parametrize("name", SWEEP_ZOO)
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


# --- structured channel pruning ----------------------------------------------------------------


def shapes(compiled) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in compiled.artifact.module.named_parameters()}


class Residual(nn.Module):
    """stem → (conv-BN-ReLU → conv-BN) + identity → ReLU → conv → mean → flatten → Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(64 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        y = torch.relu(x + y)
        y = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv3(y)), 2)
        return self.head(y.flatten(1))


def test_structured_pruning_shrinks_coupled_groups_and_still_runs():
    model = Residual().eval()
    models.randomize_batchnorm(model)
    compiled = compile_quietly(
        model, torch.randn(2, 3, 8, 8), passes="prune:structured=true,ratio=0.5", dynamic_axes="batch"
    )
    record = compiled.report.passes[0]
    notes = "\n".join(record.notes)
    # the residual ties stem and conv2 (and bn2): one group of 32 -> 16; conv1 alone; conv3 feeds the head
    assert "stem+conv2: 32 -> 16 channels" in notes and "conv1: 32 -> 16 channels" in notes
    assert "conv3: 64 -> 32 channels" in notes
    assert record.stats == {"groups": 3, "attention": 0, "channels_before": 128, "channels_after": 64}
    assert "head: channels not pruned, its channels reach a graph output" in notes
    # the ONNX model runs with the smaller shapes at another batch size
    x = torch.randn(5, 3, 8, 8)
    assert compiled(x).shape == (5, 10)
    assert record.params_after < 0.5 * record.params_before


def test_structured_pruning_on_the_torch_backend_has_smaller_tensors():
    model = Residual().eval()
    compiled = compile_quietly(model, torch.randn(1, 3, 8, 8), passes="prune:structured=true,ratio=0.5", backend="torch")
    sizes = shapes(compiled)
    head = [s for n, s in sizes.items() if len(s) == 2 and s[0] == 10]
    assert head == [(10, 32 * 4)], sizes  # flatten maps each kept channel to its 4 columns
    bn = compiled.artifact.module.get_submodule("bn2")
    assert bn.num_features == 16 and bn.running_mean.shape == (16,)


def test_keeps_the_highest_norm_channels():
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -5.0, 0.1, 3.0]).view(4, 1, 1, 1))
    compiled = compile_quietly(
        model, torch.randn(1, 1, 2, 2), passes="prune:structured=true,ratio=0.5,round_to=1", backend="torch"
    )
    kept = [p for n, p in compiled.artifact.module.named_parameters() if p.shape == (2, 1, 1, 1)]
    assert kept and kept[0].flatten().tolist() == [-5.0, 3.0]  # channels 1 and 3, in order


def test_depthwise_convs_tie_their_input_and_output_channels():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 8, 1)
    ).eval()
    compiled = compile_quietly(
        model, torch.randn(2, 3, 6, 6), passes="prune:structured=true,ratio=0.5", backend="onnxruntime"
    )
    assert "0: 16 -> 8 channels" in compiled.report.passes[0].notes
    assert compiled(torch.randn(2, 3, 6, 6)).shape == (2, 8, 6, 6)
    depthwise = [s for s in compiled.report.passes[0].notes if s.startswith("2")]
    assert depthwise == [], depthwise  # the depthwise conv is a member of conv 0's group, not a group


def test_round_to_keeps_hardware_friendly_widths():
    model = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 3)).eval()
    compiled = compile_quietly(model, torch.randn(2, 8), passes="prune:structured=true,ratio=0.5", backend="torch")
    assert "0: 40 -> 24 channels" in compiled.report.passes[0].notes  # 20 rounded up to 24


@pytest.mark.parametrize("name", SWEEP_ZOO)
def test_structured_pruning_runs_on_every_zoo_model(name):
    entry = models.get(name)
    model = entry.build()
    compiled = compile_quietly(
        model, entry.example_inputs(2), passes="fold_batchnorm,prune:structured=true,ratio=0.5",
        dynamic_axes=entry.dynamic_axes,
    )  # fmt: skip
    record = compiled.report.passes[-1]
    if name != "lstm":  # the LSTM's only layer outside the recurrent cell is the output head
        assert record.stats["channels_after"] < record.stats["channels_before"], record.notes
        assert record.params_after < record.params_before
    fresh = entry.example_inputs(3, seed=5)
    with torch.no_grad():
        assert compiled(**fresh).shape == model(**fresh).shape


class Branches(nn.Module):
    """Two branches concatenated on channels, a conv behind the concat, then flatten → Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.mix = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.head(torch.relu(self.mix(y)).flatten(1))


def zero_channels(conv: nn.Conv2d, channels: list[int]) -> None:
    with torch.no_grad():
        conv.weight[channels] = 0
        conv.bias[channels] = 0


def test_removing_dead_channels_through_a_concat_changes_nothing():
    """Channels whose filters are all zero carry nothing: pruning exactly those (the lowest L1)
    must leave the outputs as they were — which checks every offset behind the concat."""
    model = Branches().eval()
    zero_channels(model.a, [0, 2, 4, 6])
    zero_channels(model.b, [1, 3, 5, 7])
    zero_channels(model.mix, [0, 1, 2, 3])
    x = torch.randn(3, 3, 4, 4)
    compiled = compile_quietly(
        model, x, passes="prune:structured=true,ratio=0.5,round_to=1,min_cosine=0.999999", backend="onnxruntime"
    )
    notes = compiled.report.passes[0].notes
    assert {"a: 8 -> 4 channels", "b: 8 -> 4 channels", "mix: 8 -> 4 channels"} <= set(notes), notes
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert compiled.report.passes[0].params_after < 0.55 * compiled.report.passes[0].params_before


def test_removing_dead_channels_of_a_residual_group_changes_nothing():
    model = Residual().eval()
    for conv in (model.stem, model.conv1, model.conv2, model.conv3):
        zero_channels(conv, list(range(0, conv.out_channels, 2)))
    with torch.no_grad():  # the BNs must map the dead channels to zero as well
        for bn in (model.bn1, model.bn2):
            bn.bias[0::2] = 0
            bn.running_mean[0::2] = 0
    x = torch.randn(2, 3, 8, 8)
    compiled = compile_quietly(
        model, x, passes="fold_batchnorm,prune:structured=true,ratio=0.5,round_to=1", backend="torch"
    )
    assert "stem+conv2: 32 -> 16 channels" in compiled.report.passes[-1].notes
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


def test_attention_heads_are_pruned_as_units():
    from torchkiln.models.transformer import Attention

    model = nn.Sequential(Attention(32, heads=4)).eval()
    attn = model[0]
    with torch.no_grad():  # heads 1 and 3 are dead: zero q/k/v rows and the matching proj columns
        for head in (1, 3):
            rows = slice(head * 8, head * 8 + 8)
            for layer in (attn.q, attn.k, attn.v):
                layer.weight[rows] = 0
                layer.bias[rows] = 0
            attn.proj.weight[:, rows] = 0
    x = torch.randn(2, 5, 32)
    compiled = compile_quietly(
        model, x, passes="prune:structured=true,ratio=0.5", backend="onnxruntime", dynamic_axes="batch"
    )
    record = compiled.report.passes[0]
    assert "0: 4 -> 2 attention heads" in record.notes, record.notes
    assert record.stats["attention"] == 1
    with torch.no_grad():  # removing dead heads changes nothing, at another batch size too
        for batch in (torch.randn(2, 5, 32), torch.randn(4, 5, 32)):
            torch.testing.assert_close(compiled(batch), model(batch), atol=1e-5, rtol=1e-5)
    assert record.params_after == record.params_before - 2 * 8 * (3 * 33 + 32)


def test_a_model_whose_channels_all_reach_the_output_is_left_alone():
    compiled = compile_quietly(nn.Linear(4, 3), torch.randn(2, 4), passes="prune:structured=true", backend="torch")
    record = compiled.report.passes[0]
    assert record.modified is False
    # the model is the Linear itself, so the note names its graph node
    assert record.notes == ["linear_default: channels not pruned, its channels reach a graph output"]


def test_global_structured_scope_prunes_where_channels_matter_least():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1)
    ).eval()
    with torch.no_grad():
        model[0].weight[8:] *= 1e-3  # half of the first layer's channels barely matter
        model[2].weight.copy_(torch.randn_like(model[2].weight).sign() * 0.1)  # the second's all matter alike
    x = torch.randn(1, 3, 6, 6)
    spec = "prune:structured=true,ratio=0.25,round_to=1"
    local = compile_quietly(model, x, passes=spec, backend="torch").report.passes[0].notes
    overall = compile_quietly(model, x, passes=spec + ",scope=global", backend="torch").report.passes[0].notes
    assert {"0: 16 -> 12 channels", "2: 16 -> 12 channels"} <= set(local)
    assert {"0: 16 -> 8 channels", "2: keeps all 16 channels (round_to=1)"} <= set(overall), overall
