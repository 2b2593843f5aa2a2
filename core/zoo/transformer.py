"""Transformer models: a small test encoder, ViT-Tiny, and a byte-level language identifier
(imports torch). Attention is written with plain ops (no fused fast path), as a backend sees it."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import BUILTIN
from ._weights import calibrated


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: multi-head self-attention and a GELU MLP, each residual."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(nn.functional.gelu(self.ff1(self.norm2(x))))


class Encoder(nn.Module):
    """A learned position embedding, ``layers`` encoder layers and a final norm."""

    def __init__(self, dim: int, heads: int, ffn: int, layers: int, seq: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.1)
        self.layers = nn.Sequential(*(EncoderLayer(dim, heads, ffn) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(x + self.pos))


class SmallTransformer(nn.Module):
    """Two encoder layers over a 1x32x64 sequence of embeddings, mean-pooled to 1x16."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, seq: int = 32, classes: int = 16) -> None:
        super().__init__()
        self.encoder = Encoder(dim, heads, 2 * dim, layers, seq)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


class ViT(nn.Module):
    """Vision transformer (Dosovitskiy et al. 2021): patches by a strided convolution, a class
    token, pre-norm encoder layers, the class token's features classified."""

    def __init__(self, image: int = 224, patch: int = 16, dim: int = 192, heads: int = 3, layers: int = 12,
                 classes: int = 1000) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.encoder = Encoder(dim, heads, 4 * dim, layers, (image // patch) ** 2 + 1)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patches(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.encoder(x)[:, 0])


class LangId(nn.Module):
    """Language identification from raw UTF-8 bytes: byte embeddings, a transformer encoder, mean
    pooling, and one logit per language."""

    def __init__(self, seq: int = 128, dim: int = 96, heads: int = 4, layers: int = 2, languages: int = 200) -> None:
        super().__init__()
        self.bytes = nn.Embedding(256, dim)
        self.encoder = Encoder(dim, heads, 2 * dim, layers, seq)
        self.head = nn.Linear(dim, languages)

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.bytes(data)).mean(dim=1))


def _build(name: str, model: nn.Module, seed: int) -> nn.Module:
    return calibrated(model, BUILTIN[name].inputs, seed, BUILTIN[name].int_high)


def small_transformer() -> nn.Module:
    """2 layers, 4 heads, 64 dims over 32 tokens. Parameters: 70,160; FLOPs: 4,720,640."""
    torch.manual_seed(0)
    return _build("small_transformer", SmallTransformer(), 2)


def vit_tiny() -> nn.Module:
    """ViT-Tiny/16 at 224x224 (197 tokens). Parameters: 5,717,416; FLOPs: 2,507,366,400."""
    torch.manual_seed(0)
    return _build("vit_tiny", ViT(), 6)


def langid() -> nn.Module:
    """128 bytes, 96-dim embeddings, 2 layers of 4 heads, 200 languages.
    Parameters: 206,024; FLOPs: 50,370,048."""
    torch.manual_seed(0)
    return _build("langid", LangId(), 7)
