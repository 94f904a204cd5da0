"""Transformer encoders: a small ViT (patch embedding) and a text encoder (token embedding).

Attention is written out (q/k/v projections, per-head reshape, softmax) rather than taken from
``nn.MultiheadAttention``, so every op is visible in the graph and heads can be pruned as units.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = self.head_dim**-0.5

    def _split(self, x: Tensor) -> Tensor:
        return x.reshape(x.size(0), x.size(1), self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        out = (weights @ v).transpose(1, 2)
        return self.proj(out.reshape(x.size(0), x.size(1), -1))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.1):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    def __init__(self, image: int = 32, patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_dim: int = 128, num_classes: int = 10, in_channels: int = 3):  # fmt: skip
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(tokens.size(0), -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos
        x = self.norm(self.layers(x))
        return self.head(x[:, 0])


class TextEncoder(nn.Module):
    """Token ids [batch, seq] → class logits; positions are sliced to the sequence length."""

    def __init__(self, vocab: int = 1000, max_len: int = 64, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_dim: int = 128, num_classes: int = 4):  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids) + self.pos[:, : input_ids.size(1)]
        x = self.norm(self.layers(x))
        return self.head(x.mean(1))
