"""Small models for the command-line and report tests: ``toy_models:factory`` targets."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Two blocks of Linear -> GELU -> Linear with a residual, then a scalar loss."""

    def __init__(self, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x.pow(2).mean()


def mlp(width: int = 32, layers: int = 2, batch: int = 4, seq: int = 8):
    """(model, example inputs): an MLP over a (batch, seq, width) input."""
    torch.manual_seed(0)
    return MLP(width, layers), (torch.randn(batch, seq, width),)


def raises():
    raise RuntimeError("weights not found")


def not_a_pair():
    return 3


def lstm():
    torch.manual_seed(0)
    return nn.LSTM(8, 8, batch_first=True), (torch.randn(2, 4, 8),)


def shape_bug():
    """A model whose forward fails on its own example input (a shape mismatch)."""
    return nn.Linear(4, 4), torch.randn(2, 5)


class KeepLast(nn.Module):
    """Embeds ids and keeps the last ``keep`` positions (a transformers-style int input)."""

    def __init__(self, vocab: int = 64, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, width)

    def forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        h = self.head(self.emb(ids))[:, -keep:].contiguous()
        return h.sin().sum()


def keep_last(batch: int = 2, seq: int = 8):
    """(model, keyword inputs) of :class:`KeepLast`."""
    torch.manual_seed(0)
    return KeepLast(), {"ids": torch.randint(0, 64, (batch, seq)), "keep": 4}


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU written out, as transformers does: a chain of eight pointwise ops."""
    import math

    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPTBlock(nn.Module):
    """A pre-norm GPT block: attention written with matmuls and softmax, an MLP with
    :func:`gelu_new`."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = (q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.out(gelu_new(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """``layers`` GPT blocks and a linear head, summed to a scalar loss."""

    def __init__(self, width: int = 64, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[GPTBlock(width, heads) for _ in range(layers)])
        self.head = nn.Linear(width, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x)).sum()


def gpt(width: int = 64, heads: int = 2, layers: int = 2, batch: int = 2, seq: int = 32):
    """(model, example inputs): a small GPT over a (batch, seq, width) input."""
    torch.manual_seed(0)
    return GPT(width, heads, layers), (torch.randn(batch, seq, width),)
