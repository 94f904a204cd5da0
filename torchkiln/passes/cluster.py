"""``cluster``: weight sharing — each layer's weights become indices into a small codebook.

Per conv / linear layer, 1-D k-means (``clusters`` centroids, initialised at evenly spaced
quantiles, Lloyd iterations until no weight changes cluster) replaces every weight by its
centroid. The IR stores what a deployment stores::

    weight = take(codebook [k] float32, indices [shape] uint8)

so the exported ONNX file holds one byte per weight plus the codebook (a Gather the runtime folds
at load time). The exporter's own optimizer folds *small* constant subgraphs, so layers of a few
thousand weights come out as float initializers again; large layers, where the bytes are, stay
shared. The report gives each layer's stored size and the size at ``log2(k)`` bits per index.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import fx

from torchkiln.compiler import graph as G
from torchkiln.compiler.options import option
from torchkiln.compiler.passes import Pass, PassConfig, PassResult, register_pass
from torchkiln.compiler.program import Program
from torchkiln.compiler.verify import Tolerance
from torchkiln.passes.layers import Layer, find_layers, ignored
from torchkiln.passes.promise import check_min_cosine, min_cosine_option, promise

MAX_ITERATIONS = 50


@dataclasses.dataclass(frozen=True)
class ClusterConfig(PassConfig):
    clusters: int = option(16, "codebook size per layer, 2..256 (indices are stored as uint8)")
    ignore: tuple[str, ...] = option((), "module paths (globs) left alone")
    min_cosine: float | None = min_cosine_option()

    def validate(self) -> None:
        if not 2 <= self.clusters <= 256:
            self.fail("clusters", f"must be between 2 and 256, got {self.clusters}")
        check_min_cosine(self)


@register_pass
class ClusterWeights(Pass):
    """k-means weight sharing: conv/linear weights become uint8 indices into a float codebook."""

    name = "cluster"
    Config = ClusterConfig
    lossless = False
    config: ClusterConfig

    def tolerance(self) -> Tolerance | None:
        return promise(self.config.min_cosine)

    def run(self, program: Program) -> PassResult:
        work = copy.deepcopy(program.graph_module)
        layers, notes = find_layers(work)
        clustered, dense_bytes, stored_bytes, packed_bytes = 0, 0, 0, 0
        bits = math.ceil(math.log2(self.config.clusters))
        for layer in layers:
            if layer.weight is None:
                continue
            if ignored(layer, self.config.ignore):
                notes.append(f"{layer.name}: not clustered, named in ignore")
                continue
            weight = G.get_attr_value(work, str(layer.weight.target)).detach()
            codebook, indices = kmeans(weight.float().flatten(), self.config.clusters)
            _share(work, layer, codebook, indices.to(torch.uint8).view(weight.shape))
            dense, stored = weight.numel() * weight.element_size(), weight.numel() + 4 * codebook.numel()
            packed = math.ceil(weight.numel() * bits / 8) + 4 * codebook.numel()
            clustered, dense_bytes = clustered + 1, dense_bytes + dense
            stored_bytes, packed_bytes = stored_bytes + stored, packed_bytes + packed
            notes.append(f"{layer.name}: {weight.numel():,} weights -> {stored:,} bytes ({packed:,} at {bits} bits)")
        if not clustered:
            return PassResult(modified=False, stats={"clustered": 0}, notes=notes)
        work.graph.eliminate_dead_code()
        G.drop_unused_attributes(work)
        program.graph_module = work
        stats: dict[str, int | float] = {"clustered": clustered, "dense_bytes": dense_bytes, "stored_bytes": stored_bytes,
                 "packed_bytes": packed_bytes}  # fmt: skip
        return PassResult(True, stats, notes)


def kmeans(values: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means: (sorted centroids [<= clusters], index of each value's centroid)."""
    distinct = torch.unique(values)
    if distinct.numel() <= clusters:  # already shared: exact
        return distinct, torch.bucketize(values, distinct)
    centroids = torch.quantile(values.double(), torch.linspace(0, 1, clusters, dtype=torch.float64)).float()
    assignment = torch.full_like(values, -1, dtype=torch.long)
    for _ in range(MAX_ITERATIONS):
        centroids = torch.unique(centroids)  # sorted; duplicates from tied quantiles merge
        boundaries = (centroids[1:] + centroids[:-1]) / 2
        new = torch.bucketize(values, boundaries)
        if torch.equal(new, assignment):
            break
        assignment = new
        sums = torch.zeros_like(centroids).index_add_(0, assignment, values)
        counts = torch.zeros_like(centroids).index_add_(0, assignment, torch.ones_like(values))
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids, assignment


def _share(gm: fx.GraphModule, layer: Layer, codebook: torch.Tensor, indices: torch.Tensor) -> None:
    """Point the layer's weight argument at ``take(codebook, indices)``."""
    with gm.graph.inserting_before(layer.node):
        book = gm.graph.get_attr(G.add_attribute(gm, f"{layer.name}_codebook", codebook, True))
        index = gm.graph.get_attr(G.add_attribute(gm, f"{layer.name}_indices", indices, True))
        shared = gm.graph.call_function(torch.take, (book, gm.graph.call_method("long", (index,))))
    layer.node.update_arg(1, shared)
