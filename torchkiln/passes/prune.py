"""``prune``: magnitude pruning of conv / linear weights, unstructured or 2:4 semi-structured.

Unstructured (``pattern=unstructured``): the ``ratio`` smallest-magnitude weights become zero —
per layer (``scope=layer``: each layer loses ``ratio`` of its weights) or over all layers at once
(``scope=global``: one threshold, so layers with many small weights lose more). Shapes do not
change; the gain is in compression and sparse kernels, and the report gives each layer's sparsity.

2:4 (``pattern=2:4``): in every group of 4 consecutive weights along a layer's input channels
(the GEMM reduction axis; for a conv, at each kernel position) the 2 smallest become zero — the
layout NVIDIA sparse tensor cores (TensorRT's sparse-weights flag) accelerate. Layers whose input
channels are not a multiple of 4 are left alone with a note.

Structured (``structured=true``): whole channels go, in groups of coupled channels, and the layers
shrink (:mod:`torchkiln.passes.channels`).

``ratio=0`` changes nothing and reports ``modified=False``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import fx

from torchkiln.compiler import graph as G
from torchkiln.compiler.options import option
from torchkiln.compiler.passes import Pass, PassConfig, PassResult, register_pass
from torchkiln.compiler.program import Program
from torchkiln.compiler.verify import Tolerance
from torchkiln.passes import channels, heads
from torchkiln.passes.layers import Layer, find_layers, ignored
from torchkiln.passes.promise import check_min_cosine, min_cosine_option, promise


@dataclasses.dataclass(frozen=True)
class PruneConfig(PassConfig):
    ratio: float = option(0.5, "fraction of weights (structured: of each group's channels) removed, in [0, 1)")
    scope: Literal["layer", "global"] = option(
        "layer", "one threshold per layer (structured: per group) or one for all, on scores relative to each group"
    )
    pattern: Literal["unstructured", "2:4"] = option("unstructured", "which weights may become zero")
    structured: bool = option(False, "remove whole channels (coupled groups) and shrink the layers")
    round_to: int = option(8, "structured: round each group's kept channels up to a multiple of this")
    importance: Literal["l1", "l2"] = option("l1", "structured: rank channels by the filters' L1 or L2 norm")
    ignore: tuple[str, ...] = option((), "module paths (globs) never pruned, e.g. stem.*|head")
    min_cosine: float | None = min_cosine_option()

    def validate(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            self.fail("ratio", f"must be in [0, 1), got {self.ratio}")
        if self.pattern == "2:4" and "ratio" in self.changed():
            self.fail("ratio", "2:4 always prunes half of each group of 4; leave ratio unset")
        if self.structured and self.pattern != "unstructured":
            self.fail("structured", "structured pruning removes channels; it does not combine with pattern=2:4")
        if self.round_to < 1:
            self.fail("round_to", f"must be >= 1, got {self.round_to}")
        check_min_cosine(self)


@register_pass
class Prune(Pass):
    """Zero the smallest conv/linear weights (unstructured or 2:4), or remove whole channels."""

    name = "prune"
    Config = PruneConfig
    lossless = False
    config: PruneConfig

    def tolerance(self) -> Tolerance | None:
        return promise(self.config.min_cosine)

    def run(self, program: Program) -> PassResult:
        if self.config.pattern == "unstructured" and self.config.ratio == 0:
            return PassResult(modified=False, notes=["ratio=0: nothing to prune"])
        work = copy.deepcopy(program.graph_module)
        layers, notes = find_layers(work)
        if self.config.structured:
            G.annotate(work, program.example_inputs)
            result = self._structured(work, layers, notes)
            if result.modified:
                program.graph_module = work
            return result
        chosen = []
        for layer in layers:
            if layer.weight is None:
                continue  # matmul of two activations: no weight
            if ignored(layer, self.config.ignore):
                notes.append(f"{layer.name}: not pruned, named in ignore")
            else:
                chosen.append(layer)
        masks = self._masks(work, chosen, notes)
        zeros = total = 0
        for layer, mask in masks.items():
            weight = G.get_attr_value(work, str(layer.weight.target))  # type: ignore[union-attr]
            pruned = weight.detach() * mask.to(weight.dtype)
            with work.graph.inserting_before(layer.node):
                node = work.graph.get_attr(G.add_attribute(work, f"{layer.name}_pruned", pruned, parameter=True))
            layer.node.update_arg(1, node)
            zeros, total = zeros + int((~mask).sum()), total + mask.numel()
            share = float((~mask).sum()) / mask.numel()
            dead = " — the layer is dead: use scope=layer or ignore it" if share >= 0.99 else ""
            notes.append(f"{layer.name}: {100.0 * share:.1f}% of weights zero{dead}")
        if not masks:
            return PassResult(modified=False, notes=notes + ["no layer to prune: nothing changed"])
        work.graph.eliminate_dead_code()
        G.drop_unused_attributes(work)
        program.graph_module = work
        sparsity = zeros / total if total else 0.0
        return PassResult(True, {"layers": len(masks), "zeros": zeros, "sparsity": round(sparsity, 4)}, notes)

    def _structured(self, gm: fx.GraphModule, layers: list[Layer], notes: list[str]) -> PassResult:
        groups, attention = channel_groups(gm, layers, self.config.ignore, notes)
        before = after = 0
        keeps = {}
        scores = {group: channels.importance(gm, group, self.config.importance) for group in groups}
        counts = self._kept_counts(scores)
        for group in groups:
            keep = counts[group]
            before, after = before + group.channels, after + keep
            if keep == group.channels:
                notes.append(f"{group.name}: keeps all {keep} channels (round_to={self.config.round_to})")
                continue
            keeps[group] = scores[group].topk(keep).indices.sort().values
            notes.append(f"{group.name}: {group.channels} -> {keep} channels")
        channels.shrink(gm, keeps)
        for head_group in attention:
            keep = heads.kept_heads(head_group.heads, self.config.ratio)
            before, after = before + head_group.heads * head_group.head_dim, after + keep * head_group.head_dim
            if keep == head_group.heads:
                notes.append(f"{head_group.name}: keeps all {keep} heads")
                continue
            score = heads.head_importance(gm, head_group)
            heads.prune_heads(gm, head_group, score.topk(keep).indices.sort().values)
            notes.append(f"{head_group.name}: {head_group.heads} -> {keep} attention heads")
        if after == before:
            return PassResult(modified=False, stats={"groups": len(groups), "attention": len(attention)}, notes=notes)
        gm.graph.eliminate_dead_code()
        G.drop_unused_attributes(gm)
        stats: dict[str, int | float] = {
            "groups": len(groups), "attention": len(attention), "channels_before": before, "channels_after": after
        }  # fmt: skip
        return PassResult(True, stats, notes)

    def _kept_counts(self, scores: dict[channels.Group, torch.Tensor]) -> dict[channels.Group, int]:
        """Channels each group keeps: ``ratio`` of each (scope=layer), or of all channels ranked
        together by their score relative to their group's mean (scope=global), so a group whose
        channels matter alike keeps more. Rounded up to ``round_to``."""
        ratio, round_to = self.config.ratio, self.config.round_to
        if self.config.scope == "layer" or not scores:
            return {g: channels.kept_count(g.channels, ratio, round_to) for g in scores}
        relative = {g: s / s.mean().clamp(min=1e-30) for g, s in scores.items()}
        threshold = kth_magnitude(torch.cat(list(relative.values())), ratio)
        counts = {}
        for group, values in relative.items():
            share = 1.0 - float((values > threshold).sum()) / group.channels
            counts[group] = channels.kept_count(group.channels, share, round_to)
        return counts

    def _masks(self, gm: fx.GraphModule, layers: list[Layer], notes: list[str]) -> dict[Layer, torch.Tensor]:
        weights = {layer: G.get_attr_value(gm, str(layer.weight.target)).detach() for layer in layers}  # type: ignore[union-attr]
        if self.config.pattern == "2:4":
            masks = {}
            for layer, weight in weights.items():
                if weight.dim() < 2 or weight.shape[1] % 4:
                    notes.append(f"{layer.name}: not pruned, 2:4 needs input channels divisible by 4")
                else:
                    masks[layer] = two_of_four(weight)
            return masks
        if self.config.scope == "global":
            threshold = kth_magnitude(torch.cat([w.abs().flatten() for w in weights.values()]), self.config.ratio)
            return {layer: w.abs() > threshold for layer, w in weights.items()}
        return {layer: w.abs() > kth_magnitude(w.abs().flatten(), self.config.ratio) for layer, w in weights.items()}


def channel_groups(
    gm: fx.GraphModule, layers: list[Layer], ignore: Sequence[str], notes: list[str]
) -> tuple[list[channels.Group], list[heads.Heads]]:
    """The coupled channel groups structured pruning may shrink, and the attention head groups
    (their layers belong to no channel group); each group left alone gets a note saying why.
    ``gm`` must be annotated with shapes (``G.annotate``)."""

    def named(members: Iterable[Layer]) -> bool:
        return any(ignored(layer, ignore) for layer in members)

    attention = [h for h in heads.find_heads(gm, layers) if not named(h.layers)]
    builder = channels.GroupBuilder(gm, layers)
    groups, seen = [], {layer for group in attention for layer in group.layers}
    for layer in layers:
        if layer in seen or layer.weight is None or (layer.kind == "conv" and channels.groups(layer) != 1):
            continue
        try:
            group = builder.build(layer)
        except channels.Frozen as reason:
            notes.append(f"{layer.name}: channels not pruned, {reason}")
            continue
        seen.update(group.producers)
        if named(group.producers + group.depthwise):
            notes.append(f"{group.name}: channels not pruned, a member is named in ignore")
        else:
            groups.append(group)
    return groups, attention


def kth_magnitude(magnitudes: torch.Tensor, ratio: float) -> float:
    """The magnitude at or below which ``ratio`` of the values lie (-1 when nothing is pruned)."""
    count = int(ratio * magnitudes.numel())
    if count == 0:
        return -1.0
    return float(torch.kthvalue(magnitudes.float(), count).values)


def two_of_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep-mask with the 2 largest of every 4 consecutive input channels (per output channel and
    kernel position)."""
    spatial = tuple(range(2, weight.dim()))
    moved = weight.permute(0, *spatial, 1)  # [out, *kernel, in]
    groups = moved.reshape(-1, 4).abs()
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    inverse = (0, weight.dim() - 1, *range(1, weight.dim() - 1))
    return keep.reshape(moved.shape).permute(*inverse).contiguous()
