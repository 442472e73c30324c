"""SimpleFSDP-style sharding on every rank of a 2-process gloo group (CPU), for
``test_parallel.py``: each rank holds a row shard of one weight and all-gathers it inside
the compiled graph; planned without and with ``regather_params``."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

ROWS, COLS, BATCH = 64, 32, 8  # the unsharded weight: 8 KiB of fp32


def weight() -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0)) / 8


def inputs(rank: int) -> torch.Tensor:
    return torch.randn(BATCH, COLS, generator=torch.Generator().manual_seed(10 + rank))


def loss_of(x: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ full.t()).square().sum()


class Sharded(torch.nn.Module):
    """Holds rank ``rank``'s rows of the weight; the forward gathers the whole weight."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.shard = torch.nn.Parameter(weight().chunk(world)[rank].clone())

    def forward(self, x):
        import torch.distributed._functional_collectives as funcol

        return loss_of(x, funcol.all_gather_tensor(self.shard, 0, dist.group.WORLD))


def reference(world: int = 2) -> list[torch.Tensor]:
    """Single-process eager: each rank's shard of the gradient of the summed losses."""
    full = weight().requires_grad_()
    sum(loss_of(inputs(r), full) for r in range(world)).backward()
    return list(full.grad.chunk(world))


def _step(rank: int, regather: bool) -> dict:
    import ckptfx

    torch._dynamo.reset()
    model = Sharded(rank, dist.get_world_size())
    backend = ckptfx.CkptBackend(inner="eager", regather_params=regather, verify_ranks=True)
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() != model.shard.untyped_storage().data_ptr():
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # the input requires grad: its gradient reads the unsharded weight
        loss = torch.compile(model, backend=backend)(inputs(rank).requires_grad_())
    loss.backward()
    return {"grad": model.shard.grad.tolist(), "measured": sum(seen.values()),
            "reported": [r.saved_bytes for r in backend.reports],
            "recomputed_ops": [c.op for r in backend.reports for c in r.recomputed],
            "notes": [n for r in backend.reports for n in r.notes],
            "fallback": [r.fallback for r in backend.reports],
            "fingerprints": backend.fingerprints}


def simple_fsdp(rank: int) -> dict:
    with warnings.catch_warnings():  # all_gather_tensor's deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        return {"off": _step(rank, False), "on": _step(rank, True),
                "unsharded_bytes": ROWS * COLS * 4}
