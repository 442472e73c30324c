"""A 2-stage 1F1B pipeline of the small GPT on every rank of a 2-process gloo group (CPU),
for ``test_parallel.py``: each stage planned with ``ckptfx.pipeline_stage_options`` (a peak
budget with its microbatches in flight) or without the in-flight option, and its peak
measured while the schedule runs: the storages ops create
(:class:`ckptfx.testing.CompiledLiveStorages`), from the start of a step to its end."""

from __future__ import annotations

import torch

import dist_scenarios as scenarios

MICROBATCHES, STAGES = 4, 2


def _stage(rank: int) -> torch.nn.Module:
    return (scenarios._Stage0 if rank == 0 else scenarios._Stage1)(scenarios.gpt())


def _example(rank: int) -> torch.Tensor:
    """One microbatch of the stage's input (token ids, or the first stage's output)."""
    ids = scenarios.batch(0)[: scenarios.CFG.batch // MICROBATCHES]
    if rank == 0:
        return ids
    return scenarios._Stage0(scenarios.gpt())(ids).detach().requires_grad_()


def probe(rank: int) -> dict:
    """One microbatch planned without a budget: its saved bytes, simulated peak and output
    bytes."""
    import ckptfx

    stage, backend, x = _stage(rank), ckptfx.CkptBackend(inner="eager"), _example(rank)
    out = torch.compile(stage, backend=backend)(x)
    out.float().sum().backward()
    (report,) = backend.reports
    return {"saved": report.saved_bytes, "peak": report.predicted_peak_bytes,
            "output": out.untyped_storage().nbytes(), "input": x.untyped_storage().nbytes()}


def device_memory(rank: int, p: dict) -> int:
    """The stage's memory for activations (bytes), from its :func:`probe` ``p``: the
    no-budget plan's simulated peak, what the schedule holds, and half the no-budget saved
    bytes of each waiting microbatch. Planned without the in-flight option, the stage would
    not fit; with it, the plan must save at most about half as much."""
    import ckptfx

    m = ckptfx.pipeline_stage_options("1F1B", rank, STAGES, 2**40, MICROBATCHES)[
        "microbatches_in_flight"]
    held = ckptfx.stages.schedule_held_bytes(rank, MICROBATCHES, p["output"], p["input"])
    # the loss function's outputs (not modelled): each microbatch's fp32 loss, kept to the
    # end of the step, and the seed of the running one's backward
    losses = (MICROBATCHES + 1) * 4 if rank == STAGES - 1 else 0
    return p["peak"] + held + losses + (m - 1) * (p["saved"] // 2)


def _receive_buffers(pipe) -> list[torch.Tensor]:
    """The buffers the stage receives activations and gradients into: one per microbatch,
    allocated at the first step and kept (resident, like the parameters: Note [What the
    schedule holds] in ckptfx/stages.py). torch 2.13's PipelineStage keeps them in
    ``args_recv_info`` and ``grad_recv_info``."""
    infos = [*pipe.args_recv_info.values(), *pipe.grad_recv_info.values()]
    return [i.buffer for recv in infos for i in recv if getattr(i, "buffer", None) is not None]


def measured_pipeline(rank: int) -> dict:
    """The stage trained 2 steps under the schedule, planned with the options of
    ``pipeline_stage_options`` (``"in_flight"``) and without ``microbatches_in_flight``
    (``"alone"``); each step measured."""
    return {"in_flight": _measured(rank, True), "alone": _measured(rank, False)}


def _measured(rank: int, in_flight: bool) -> dict:
    import ckptfx
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from ckptfx.testing import CompiledLiveStorages

    torch._dynamo.reset()
    p = probe(rank)
    torch._dynamo.reset()
    memory = device_memory(rank, p)
    options = ckptfx.pipeline_stage_options(Schedule1F1B, rank, STAGES, memory, MICROBATCHES,
                                            output_bytes=p["output"], input_bytes=p["input"])
    if not in_flight:
        options.pop("microbatches_in_flight")
    stage = _stage(rank)
    backend = ckptfx.CkptBackend(inner="eager", **options)
    pipe = PipelineStage(torch.compile(stage, backend=backend), rank, STAGES,
                         torch.device("cpu"))
    schedule = Schedule1F1B(pipe, MICROBATCHES, loss_fn=scenarios._loss)
    peaks = []
    for step in range(scenarios.STEPS):
        stage.zero_grad(set_to_none=False)  # gradients allocated after the first step
        ids = scenarios.batch(step)
        kept = [ids, *stage.parameters(), *_receive_buffers(pipe),
                *(w.grad for w in stage.parameters() if w.grad is not None)]
        with CompiledLiveStorages(exclude=kept) as live:
            if rank == 0:
                schedule.step(ids)
            else:
                schedule.step(target=ids, losses=[])
        peaks.append(live.peak)
    (report,) = backend.reports
    torch._dynamo.reset()
    return {"memory": memory, "options": options, "peaks": peaks,
            "saved": report.saved_bytes, "predicted_peak": report.predicted_peak_bytes,
            "notes": list(report.notes)}
