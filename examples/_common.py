"""Shared by the distributed examples: process group, device, a small GPT and its data."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ckptfx.demo import GPTConfig, TinyGPT

CFG = GPTConfig(vocab=512, seq=64, layers=4, heads=4, width=128, batch=8)


def setup() -> torch.device:
    """Joins the process group torchrun describes (NCCL for CUDA, gloo for CPU)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def gpt(device: torch.device) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(CFG).to(device)


def batch(step: int, device: torch.device, per_rank: bool = True) -> torch.Tensor:
    """Token ids for ``step``: this rank's own (data parallel) or the same on every rank
    (a pipeline's stages see one batch)."""
    g = torch.Generator().manual_seed(1000 * dist.get_rank() * per_rank + step)
    return torch.randint(0, CFG.vocab, (CFG.batch, CFG.seq), generator=g).to(device)


def train(step_fn, params, device: torch.device, steps: int = 3) -> list[float]:
    """``steps`` AdamW steps of ``step_fn`` (a batch -> the loss), the losses."""
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = step_fn(batch(step, device))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def summary(name: str, backend, losses: list[float]) -> None:
    """Prints, on rank 0, the losses and what ckptfx planned for each compiled graph (a graph
    that several blocks share saves its bytes once per call)."""
    if dist.get_rank() != 0:
        return
    print(f"{name}: losses {', '.join(f'{x:.4f}' for x in losses)}; "
          f"{len(backend.reports)} graph(s) planned")
    for r in backend.reports:
        print(f"  graph {r.graph_id}: saves {r.saved_bytes / 2**20:.2f} MiB per call "
              f"({r.saved_bytes_no_remat / 2**20:.2f} MiB without recompute), recomputes "
              f"{len(r.recomputed)} node(s)")
