"""Training scenarios run on every rank of a 2-process gloo group (CPU), for
``test_parallel.py``: a small GPT trained 2 steps under DDP, FSDP2 or a 2-stage pipeline with
ckptfx planning the compiled graphs. Each rank writes what it saw to ``rank{r}.json``."""

from __future__ import annotations

import json
import logging
import os
import weakref

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


COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "wait_tensor", "c10d")


def recomputed_ops(backend) -> list[str]:
    return [c.op for r in backend.reports for c in r.recomputed]


def _train(model, params, steps=STEPS, measured: list | None = None
           ) -> tuple[list[float], dict]:
    """SGD steps; with ``measured``, each step's saved bytes (saved-tensor hooks over unique
    storages, the parameters excluded) are appended to it."""
    from ckptfx.measure import saved_tensor_bytes

    params = list(params)
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        if measured is None:
            loss = model(batch(step))
        else:
            loss, saved = saved_tensor_bytes(lambda: model(batch(step)), exclude=params)
            measured.append(saved)
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
    measured: list[int] = []
    losses, grads = _train(wrapped, wrapped.parameters(), measured=measured)
    return {"losses": losses, "grads": grads, "plans": plans_of(backend),
            "recomputed_ops": recomputed_ops(backend), "fingerprints": backend.fingerprints,
            "measured": measured, "reported": [r.saved_bytes for r in backend.reports]}


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


def mismatch(rank: int) -> dict:
    """``verify_ranks=True`` with a budget that differs by rank: every rank raises."""
    import ckptfx

    model = gpt()
    budget = 0.0 if rank == 1 else None
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget, verify_ranks=True)
    try:
        torch.compile(model, backend=backend)(batch(0)).backward()
    except ckptfx.RankMismatchError as exc:  # raised through Dynamo as is
        return {"error": "RankMismatchError", "message": str(exc),
                "differences": list(exc.differences)}
    except Exception as exc:  # anything else: find ckptfx's error among the causes
        cause = exc
        while cause is not None and not isinstance(cause, ckptfx.errors.CkptfxError):
            cause = getattr(cause, "inner_exception", None) or cause.__cause__
        return {"error": type(cause).__name__ if cause else repr(exc),
                "message": str(cause) if cause else str(exc),
                "differences": list(cause.differences) if cause else []}
    return {"error": ""}


class _Stage0(torch.nn.Module):
    """Embeddings and the first block of the GPT (parameter names as in TinyGPT)."""

    def __init__(self, model: TinyGPT) -> None:
        super().__init__()
        self.tok, self.pos = model.tok, model.pos
        self.blocks = torch.nn.ModuleDict({"0": model.blocks[0]})

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.blocks["0"](x)


class _Stage1(torch.nn.Module):
    """The second block, the final norm and the head: logits."""

    def __init__(self, model: TinyGPT) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleDict({"1": model.blocks[1]})
        self.ln, self.head = model.ln, model.head

    def forward(self, x):
        return self.head(self.ln(self.blocks["1"](x)))


def _loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))


class _InFlight(torch.nn.Module):
    """Runs a compiled stage under ``saved_tensors_hooks`` (outside the compiled region) and
    keeps the bytes of the microbatches whose backward has not started: the stage's saved
    bytes in flight, and their most at any time."""

    def __init__(self, stage: torch.nn.Module, compiled) -> None:
        super().__init__()
        self.stage, self.compiled = stage, compiled
        self.alive: dict[int, int] = {}
        self.most, self.most_microbatches, self.per_microbatch = 0, 0, []

    def forward(self, x):
        seen: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in self.stage.parameters()}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.compiled(x)
        key = len(self.per_microbatch)
        self.per_microbatch.append(sum(seen.values()))
        self.alive[key] = self.per_microbatch[-1]
        self.most = max(self.most, sum(self.alive.values()))
        self.most_microbatches = max(self.most_microbatches, len(self.alive))
        out.register_hook(lambda g: self.alive.pop(key, None) and None)  # its backward began
        weakref.finalize(out, self.alive.pop, key, None)  # a forward with no backward
        return out


def pipeline(rank: int, inner: str = "eager", microbatches: int = 4) -> dict:
    """A 2-stage 1F1B pipeline of the GPT, 4 microbatches; stage ``rank`` on rank ``rank``,
    compiled with a saved budget of what one microbatch keeps without a budget, and the
    stage's microbatches in flight (ckptfx.pipeline_stage_options)."""
    import ckptfx
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    model = gpt()
    stage = (_Stage0 if rank == 0 else _Stage1)(model)
    probe = ckptfx.CkptBackend(inner=inner)  # one microbatch, no budget: its saved bytes
    example = batch(0)[: CFG.batch // microbatches]
    if rank == 1:
        example = _Stage0(gpt())(example).detach()
    torch.compile(stage, backend=probe)(example).float().sum().backward()
    stage.zero_grad(set_to_none=True)
    budget = probe.reports[0].saved_bytes
    alone = ckptfx.CkptBackend(inner=inner, memory_budget=budget, budget_kind="saved")
    torch.compile(stage, backend=alone)(example).float().sum().backward()
    stage.zero_grad(set_to_none=True)
    options = {**ckptfx.pipeline_stage_options("1F1B", rank, 2, budget, microbatches),
               "budget_kind": "saved", "inner": inner, "verify_ranks": False}
    backend = ckptfx.CkptBackend(**options)
    wrapped = _InFlight(stage, torch.compile(stage, backend=backend))
    pipe = PipelineStage(wrapped, rank, 2, torch.device("cpu"))
    schedule = Schedule1F1B(pipe, microbatches, loss_fn=_loss)
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        mb_losses: list = []
        if rank == 0:
            schedule.step(batch(step))
        else:
            schedule.step(target=batch(step), losses=mb_losses)
        losses.append(torch.stack(mb_losses).mean().item() if mb_losses else None)
        grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
        opt.step()
    gathered: list = [None, None]
    dist.all_gather_object(gathered, {n: g.tolist() for n, g in grads.items()})
    every: list = [None, None]
    dist.all_gather_object(every, losses)
    return {"losses": every[1], "grads": {n: torch.tensor(g) for part in gathered
                                          for n, g in part.items()},
            "budget": budget, "in_flight": options["microbatches_in_flight"],
            "saved_without_option": alone.reports[0].saved_bytes,
            "saved_bytes": [r.saved_bytes for r in backend.reports],
            "notes": [n for r in backend.reports for n in r.notes],
            "measured_most": wrapped.most, "most_microbatches": wrapped.most_microbatches,
            "measured_per_microbatch": wrapped.per_microbatch,
            "plans": plans_of(backend), "recomputed_ops": recomputed_ops(backend)}


def fsdp(rank: int, **kwargs) -> dict:
    import dist_fsdp

    return dist_fsdp.fsdp(rank, **kwargs)


def simple_fsdp(rank: int) -> dict:
    import dist_regather

    return dist_regather.simple_fsdp(rank)


def measured_pipeline(rank: int, **kwargs) -> dict:
    import dist_pipeline

    return dist_pipeline.measured_pipeline(rank, **kwargs)


SCENARIOS = {"ddp": ddp, "ddp_of_sequential": ddp_of_sequential, "fsdp": fsdp,
             "measured_pipeline": measured_pipeline, "mismatch": mismatch,
             "pipeline": pipeline, "simple_fsdp": simple_fsdp}


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
