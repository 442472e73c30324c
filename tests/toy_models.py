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
