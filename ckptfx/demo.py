"""``ckptfx demo``: a small built-in GPT trained a few steps under ``backend="ckpt"`` and under
torch.compile's default, side by side with eager.

The model is written here in plain torch (no downloads). For each variant the table gives:
bytes saved for the backward (``saved_tensors_hooks``, unique storages, parameters
excluded), the peak resident memory of one step above the memory before it, the median step
time, the final loss, and whether the gradients match eager's.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from ckptfx.measure import peak_rss_delta, peak_rss_supported, release_large_blocks, saved_tensor_bytes


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Sizes of the demo GPT: vocab, sequence length, layers, heads, width, batch."""

    vocab: int = 4096
    seq: int = 128
    layers: int = 4
    heads: int = 4
    width: int = 256
    batch: int = 8


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.out = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT-2-style decoder: token+position embeddings, pre-LN blocks, tied-free LM head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.seq, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@dataclasses.dataclass
class Row:
    """One variant's figures: bytes, seconds, loss and the gradient check."""

    name: str
    saved_bytes: int = 0
    peak_bytes: int | None = None
    step_s: float = 0.0
    loss: float = 0.0
    max_rel_err: float = 0.0
    grads_match: bool = True


def train(model: nn.Module, backend, ids: torch.Tensor, steps: int, name: str) -> tuple[Row, list]:
    """Trains a copy of ``model`` with SGD for ``steps`` steps; measures the last step."""
    model = copy.deepcopy(model)
    fn = torch.compile(model, backend=backend) if backend is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    row, times = Row(name), []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        last = step == steps - 1

        def one_step():
            loss, saved = saved_tensor_bytes(lambda: fn(ids), exclude=params)
            loss.backward()
            return loss, saved

        start = time.perf_counter()
        if last and peak_rss_supported():
            (loss, saved), row.peak_bytes = peak_rss_delta(one_step)
        else:
            loss, saved = one_step()
        times.append(time.perf_counter() - start)
        row.saved_bytes, row.loss = saved, float(loss.detach())
        grads = [p.grad.clone() for p in params]
        if not last:
            opt.step()
    row.step_s = statistics.median(times[1:] if len(times) > 1 else times)
    return row, grads


def compare(row: Row, grads: list, ref: list, rtol: float) -> None:
    """Fills ``row``'s gradient check: max over parameters of max|g - g_ref| / max|g_ref|."""
    errs = [float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(grads, ref)]
    row.max_rel_err = max(errs)
    row.grads_match = row.max_rel_err <= rtol


def run_demo(cfg: GPTConfig = GPTConfig(), steps: int = 3, inner: str = "inductor",
             options: dict | None = None, rtol: float = 1e-4) -> list[Row]:
    """Trains eager, torch.compile default (Inductor) and backend="ckpt"; returns the rows.

    Gradients are compared on the last step (each variant takes the same SGD steps from the
    same initial weights, so the last step's gradients must agree).
    """
    from ckptfx import _torch_compat as compat

    release_large_blocks()
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq))
    eager, ref = train(model, None, ids, steps, "eager")
    rows = [eager]
    variants = [("torch.compile (inductor)", "inductor"),
                ("backend='ckpt'", _ckpt_backend(inner, options))]
    for name, backend in variants:
        compat.dynamo_reset()
        row, grads = train(model, backend, ids, steps, name)
        compare(row, grads, ref, rtol)
        rows.append(row)
    return rows


def _ckpt_backend(inner: str, options: dict | None):
    from ckptfx.backend import CkptBackend

    return CkptBackend(**{"inner": inner, **(options or {})})


def format_table(rows: list[Row]) -> str:
    """The demo's table as text."""
    mib = 2 ** 20
    head = f"{'variant':<26}{'saved MiB':>10}{'peak MiB':>10}{'step ms':>9}{'loss':>10}  grads vs eager"
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r.peak_bytes / mib:>10.1f}" if r.peak_bytes is not None else f"{'n/a':>10}"
        check = "reference" if r.name == "eager" else (
            f"{'match' if r.grads_match else 'DIFFER'} (max rel err {r.max_rel_err:.1e})")
        lines.append(f"{r.name:<26}{r.saved_bytes / mib:>10.1f}{peak}{r.step_s * 1e3:>9.0f}"
                     f"{r.loss:>10.4f}  {check}")
    return "\n".join(lines)
