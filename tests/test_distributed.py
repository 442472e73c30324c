"""DDP on the gloo backend, 2 processes on localhost: identical plans on every rank, no
collective recomputed, gradients equal to single-process eager."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 4))


def _worker(rank: int, world: int, port: int, out_dir: str, options: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import ckptfx
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = _model()
        backend = ckptfx.CkptBackend(inner="eager", **options)
        ddp = DDP(torch.compile(model, backend=backend))
        torch.manual_seed(1)
        x = torch.randn(16, 32)
        ddp(x).pow(2).mean().backward()
        result = {
            "plans": [[[s.name for s in r.saved], [c.name for c in r.recomputed],
                       r.fallback] for r in backend.reports],
            "grads": [p.grad.tolist() for p in model.parameters()],
        }
        # a functional collective inside the compiled graph: its output is saved, never
        # recomputed, even when the budget asks for the least memory
        import torch.distributed._functional_collectives as funcol

        def f(x, w, z):
            return ((x @ w) * funcol.all_reduce(z, "sum", dist.group.WORLD).exp()).sum()

        torch.manual_seed(2)
        x, w, z = torch.randn(8, 16, requires_grad=True), torch.randn(16, 16), torch.randn(8, 16)
        coll = ckptfx.CkptBackend(inner="eager", memory_budget=0.0)
        torch.compile(f, backend=coll)(x, w, z).backward()
        result["collective_grad"] = x.grad.tolist()
        result["collective_recomputed"] = [c.op for r in coll.reports for c in r.recomputed]
        result["collective_fallback"] = [r.fallback for r in coll.reports]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("options", [{}, {"memory_budget": 0.0},
                                     {"memory_budget": 0.5, "cost_model": "profile"}])
def test_ddp_two_ranks_same_plan_and_eager_gradients(tmp_path, options):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), options), nprocs=2,
                       join=True, start_method="spawn")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["plans"] and r0["plans"] == r1["plans"]  # identical decisions on every rank
    assert not any(fallback for *_, fallback in r0["plans"])
    for r in (r0, r1):
        assert not any("c10d" in op or "all_reduce" in op or "wait" in op
                       for op in r["collective_recomputed"])
        assert r["collective_fallback"] == [""]
    torch.manual_seed(2)
    x, w, z = torch.randn(8, 16, requires_grad=True), torch.randn(16, 16), torch.randn(8, 16)
    ((x @ w) * (2 * z).exp()).sum().backward()  # all_reduce over 2 equal ranks: 2 z
    torch.testing.assert_close(torch.tensor(r0["collective_grad"]), x.grad)
    model = _model()
    torch.manual_seed(1)
    model(torch.randn(16, 32)).pow(2).mean().backward()
    for got, ref in zip(r0["grads"], [p.grad for p in model.parameters()]):
        torch.testing.assert_close(torch.tensor(got), ref, rtol=1e-5, atol=1e-6)
