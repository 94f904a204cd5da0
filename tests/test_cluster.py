"""The cluster pass: k-means weight sharing stored as uint8 indices into a codebook."""

from __future__ import annotations

import pytest
import torch
from conftest import SWEEP_ZOO, compile_quietly
from torch import nn

from torchkiln import models
from torchkiln.errors import ConfigError
from torchkiln.passes.cluster import kmeans


def test_kmeans_finds_well_separated_clusters():
    centers = torch.tensor([-2.0, 0.0, 3.0])
    values = (centers.repeat_interleave(100) + 0.01 * torch.randn(300))[torch.randperm(300)]
    codebook, index = kmeans(values, 3)
    assert torch.allclose(codebook, centers, atol=0.01)
    assert torch.equal(codebook[index], codebook[torch.bucketize(values, (codebook[1:] + codebook[:-1]) / 2)])


def test_kmeans_is_exact_when_there_are_few_distinct_values():
    values = torch.tensor([0.5, -1.0, 0.5, 2.0])
    codebook, index = kmeans(values, 16)
    assert torch.equal(codebook[index], values)


def test_layers_share_at_most_k_values_and_are_stored_as_indices():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10)).eval()
    compiled = compile_quietly(model, torch.randn(2, 3, 8, 8), passes="cluster:clusters=8", backend="torch")
    gm = compiled.artifact.module
    books = {n: p for n, p in gm.named_parameters() if n.endswith("_codebook")}
    indices = {n: p for n, p in gm.named_parameters() if n.endswith("_indices")}
    assert len(books) == len(indices) == 2 and all(b.numel() <= 8 for b in books.values())
    assert all(i.dtype is torch.uint8 and int(i.max()) < 8 for i in indices.values())
    record = compiled.report.passes[0]
    assert record.stats["stored_bytes"] == 16 * 27 + 10 * 576 + 4 * 16
    assert record.stats["packed_bytes"] == (16 * 27 * 3 + 7) // 8 + (10 * 576 * 3 + 7) // 8 + 4 * 16
    assert record.bytes_after < 0.3 * record.bytes_before


def test_clustered_cnn_file_shrinks():
    entry = models.get("resnet")
    dense = compile_quietly(entry.build(), entry.example_inputs(1))
    shared = compile_quietly(entry.build(), entry.example_inputs(1), passes="cluster:clusters=256")
    assert shared.report.artifact.file_bytes < 0.35 * dense.report.artifact.file_bytes
    assert shared.report.artifact.cosine > 0.999


@pytest.mark.parametrize("name", SWEEP_ZOO)
def test_zoo_clusters_and_runs_on_onnxruntime(name):
    entry = models.get(name)
    compiled = compile_quietly(
        entry.build(), entry.example_inputs(2), passes="fold_batchnorm,cluster", dynamic_axes=entry.dynamic_axes
    )
    assert compiled.report.passes[-1].stats["clustered"] >= 1


@pytest.mark.parametrize(("spec", "message"), [("cluster:clusters=1", "between 2 and 256"), ("cluster:clusters=300", "between 2 and 256")])
def test_bad_options(spec, message):
    with pytest.raises(ConfigError, match=message):
        compile_quietly(nn.Linear(4, 2), torch.randn(1, 4), passes=spec)
