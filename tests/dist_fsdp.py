"""FSDP2 on every rank of a 2-process gloo group (CPU), for ``test_parallel.py``: the small
GPT with ``fully_shard`` per block and on the root, compiled per block or as a whole, each
block call's saved bytes measured; and a graph of functional collectives planned for the
least memory."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_scenarios import COLLECTIVES, _train, gpt, plans_of, recomputed_ops


class _SavedBytes:
    """Counts what autograd saves during a block's call, over unique storages, the block's
    parameters (unsharded while it runs) excluded; appends each call's bytes to ``log``."""

    def __init__(self, block: torch.nn.Module, log: list[int]) -> None:
        self.block, self.log, self.seen = block, log, {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in {p.untyped_storage().data_ptr()
                                      for p in self.block.parameters()}:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def start(self, *_) -> None:
        self.seen = {}
        self.hooks.__enter__()

    def stop(self, *_) -> None:
        self.hooks.__exit__(None, None, None)
        self.log.append(sum(self.seen.values()))


class _MeasuredBlock(torch.nn.Module):
    """Runs a compiled block under saved-tensor hooks (outside the compiled region, so
    Dynamo does not trace them): :class:`_SavedBytes` of each call."""

    def __init__(self, block: torch.nn.Module, compiled, log: list[int]) -> None:
        super().__init__()
        self.block, self.compiled, self.meter = block, compiled, _SavedBytes(block, log)

    def forward(self, x):
        self.meter.start()
        try:
            return self.compiled(x)
        finally:
            self.meter.stop()


def _measure_calls(block: torch.nn.Module, log: list[int]) -> None:
    """:class:`_SavedBytes` of each call of ``block`` inside a model compiled as a whole:
    forward hooks that Dynamo never traces (run eagerly: FSDP2's own hooks graph-break, so
    the block's code is a frame compiled on its own, called between them), registered after
    FSDP2's (its pre-forward has unsharded the parameters when the count starts)."""
    from ckptfx import _torch_compat as compat

    meter = _SavedBytes(block, log)
    block.register_forward_pre_hook(compat.dynamo_disable(meter.start))
    block.register_forward_hook(compat.dynamo_disable(meter.stop), always_call=True)


def fsdp(rank: int, options: dict, compile: str) -> dict:
    """FSDP2: ``fully_shard`` per block and on the root; torch.compile per block or of the
    whole model; each block call's saved bytes measured."""
    import ckptfx
    from torch.distributed.fsdp import fully_shard

    model = gpt()
    backend = ckptfx.CkptBackend(**options)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    measured: list[int] = []
    if compile == "block":
        for i, block in enumerate(model.blocks):
            model.blocks[i] = _MeasuredBlock(block, torch.compile(block, backend=backend),
                                             measured)
        wrapped = model
    else:
        for block in model.blocks:
            _measure_calls(block, measured)
        wrapped = torch.compile(model, backend=backend)
    losses, grads = _train(wrapped, model.parameters())
    grads = {n.replace("block.", ""): g for n, g in grads.items()}
    return {"losses": losses, "grads": grads, "plans": plans_of(backend),
            "recomputed_ops": recomputed_ops(backend), "measured": measured,
            "reported": [r.saved_bytes for r in backend.reports],
            "fingerprints": backend.fingerprints,
            "notes": [list(r.notes) for r in backend.reports],
            "collectives": _collectives_never_recomputed()}


def _collectives_never_recomputed() -> dict:
    """A graph holding all_gather, reduce_scatter, all_reduce and their waits, planned for
    the least memory: which collective nodes the joint graph had and which were recomputed."""
    import torch.distributed._functional_collectives as funcol
    from unittest import mock

    import ckptfx
    import ckptfx.pipeline as pipeline

    def f(x, w):
        full = funcol.all_gather_tensor(w, 0, dist.group.WORLD)  # the unsharded weight
        h = torch.tanh(x @ full.t())
        h = funcol.all_reduce(h, "sum", dist.group.WORLD).exp()
        return funcol.reduce_scatter_tensor(h, "sum", 0, dist.group.WORLD).sum()

    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, generator=g, requires_grad=True)
    w = torch.randn(4, 16, generator=g, requires_grad=True)
    seen = []
    original = pipeline.plan

    def spy(joint, config=None):
        seen.append(original(joint, config))
        return seen[-1]

    backend = ckptfx.CkptBackend(inner="eager", memory_budget=0.0)
    with mock.patch.object(pipeline, "plan", spy):
        torch.compile(f, backend=backend)(x, w).backward()
    decisions = {n: d for planned in seen for n, d in planned.plan.decisions.items()}
    coll = {n: d.action.value for n, d in decisions.items()
            if any(k in d.op for k in COLLECTIVES)}
    return {"collective_ops": sorted({decisions[n].op for n in coll}),
            "collective_actions": sorted(set(coll.values())),
            "recomputed_ops": recomputed_ops(backend),
            "fallback": [r.fallback for r in backend.reports],
            "x_grad": x.grad.tolist(), "w_grad": w.grad.tolist()}
