"""Training scenarios run on every rank of a 2-process gloo group (CPU), for
``test_parallel.py``: a small GPT trained 2 steps under DDP, FSDP2 or a 2-stage pipeline with
ckptfx planning the compiled graphs. Each rank writes what it saw to ``rank{r}.json``."""

from __future__ import annotations

import json
import logging
import os

import torch
import torch.distributed as dist

from ckptfx.demo import GPTConfig, TinyGPT

CFG = GPTConfig(vocab=128, seq=16, layers=2, heads=2, width=64, batch=4)
STEPS, LR = 2, 0.1


def gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(CFG)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, CFG.vocab, (CFG.batch, CFG.seq), generator=g)


def eager_reference() -> dict:
    """Losses and final gradients of single-process eager training (same data, SGD)."""
    model = gpt()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = model(batch(step))
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return {"losses": losses, "grads": grads}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def plans_of(backend) -> list:
    return [[[s.name for s in r.saved], [c.name for c in r.recomputed], r.fallback]
            for r in backend.reports]


def recomputed_ops(backend) -> list[str]:
    return [c.op for r in backend.reports for c in r.recomputed]


def _train(model, params, steps=STEPS) -> tuple[list[float], dict]:
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = model(batch(step))
        loss.backward()
        losses.append(loss.item())
        grads = {n: _full(p.grad) for n, p in _named(model)}
        opt.step()
    return losses, grads


def _named(model):
    return [(n.replace("_orig_mod.", "").replace("module.", ""), p)
            for n, p in model.named_parameters()]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def ddp(rank: int, options: dict, wrap: str) -> dict:
    import ckptfx
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = gpt()
    backend = ckptfx.CkptBackend(**options)
    # buckets of 64 KiB (the first one too) so that the small GPT makes several graphs
    dist._DEFAULT_FIRST_BUCKET_BYTES = 64 * 1024
    if wrap == "inside":  # the recipe: graphs split per gradient bucket, each planned
        wrapped = DDP(torch.compile(model, backend=backend), bucket_cap_mb=1 / 16)
    else:
        wrapped = torch.compile(DDP(model, bucket_cap_mb=1 / 16), backend=backend)
    losses, grads = _train(wrapped, wrapped.parameters())
    return {"losses": losses, "grads": grads, "plans": plans_of(backend),
            "recomputed_ops": recomputed_ops(backend)}


def ddp_of_sequential(rank: int, options: dict) -> dict:
    """torch.compile(DDP(nn.Sequential(...))) of torch.nn modules only: Dynamo compiles no
    frame (Note [DDP wrap order])."""
    import ckptfx
    from torch.nn.parallel import DistributedDataParallel as DDP

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                   torch.nn.Linear(64, 4))

    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    backend = ckptfx.CkptBackend(**options)
    model = torch.compile(DDP(mlp()), backend=backend)
    for _ in range(2):
        model(x).pow(2).mean().backward()
    ref = mlp()
    for _ in range(2):
        ref(x).pow(2).mean().backward()
    return {"plans": plans_of(backend),
            "grads": {n: p.grad for n, p in _named(model)},
            "ref_grads": {n: p.grad.tolist() for n, p in ref.named_parameters()}}


SCENARIOS = {"ddp": ddp, "ddp_of_sequential": ddp_of_sequential}


def worker(rank: int, world: int, port: int, out_dir: str, name: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    records = _Records()
    logging.getLogger("ckptfx").addHandler(records)
    try:
        result = SCENARIOS[name](rank, **kwargs)
        result["warnings"] = records.messages
        if "grads" in result:
            result["grads"] = {n: g.tolist() for n, g in result["grads"].items()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
