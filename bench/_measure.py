"""Measuring one training step the same way for every contender (bench only).

API:

* :func:`measure_step`: runs one step under the profiler and returns a :class:`StepMeasure`:
  the step's peak at the allocator, the matmul-class FLOPs it ran, and the bytes saved for
  the backward.
* :func:`rss_peak`: the peak resident memory of one step above the memory before it (a
  cross-check of the allocator figure; CPU only).
* :func:`max_rel_err`: the gradient check against eager.
* :func:`largest_fitting`: the largest batch whose measured peak fits a limit (doubling, then
  bisection).

# Note [Allocator peak on CPU]
A ``TorchDispatchMode`` (the live-storage tracker of ``tests/test_memory.py``) cannot measure
a compiled step: Dynamo does not run compiled code while a non-infra dispatch mode is on the
stack (``convert_frame``: "non-infra torch dispatch mode present"), so the step runs eagerly
and the frame stays skipped afterwards; and Inductor's CPU wrapper allocates its buffers with
``torch._C._dynamo.guards._empty_strided_cpu``, which bypasses the dispatcher, so a mode would
not see them anyway. ``torch.utils.flop_counter.FlopCounterMode`` is a dispatch mode too. The
profiler is not: with ``profile_memory=True`` c10's CPU allocator reports every allocation and
free (``[memory]`` events, signed ``nbytes``), Inductor's included, and ``with_flops=True``
counts mm/addmm/bmm/baddbmm/conv2d from the recorded shapes, the extern kernels of
compiled code included (fused attention kernels are not counted). On CUDA the caching
allocator's ``max_memory_allocated`` is the figure; the profiler still counts FLOPs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ckptfx.measure import peak_rss_delta, peak_rss_supported, saved_tensor_bytes


# the ops whose FLOPs the profiler computes and Inductor leaves as extern kernels (it also
# computes aten::add/mul, which Inductor fuses into its own kernels: not comparable)
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::conv2d"})


@dataclasses.dataclass(frozen=True)
class StepMeasure:
    """What one measured step allocated, computed and saved.

    Attributes:
        peak_bytes: the largest number of bytes live at the allocator during the step, above
            those live when it started (gradients are released before, so they count).
        flops: FLOPs of the matmul-class ops the profiler counted in the step.
        saved_bytes: bytes saved for the backward (unique storages, parameters excluded).
    """

    peak_bytes: int
    flops: int
    saved_bytes: int


def synchronize(device: str) -> None:
    """Waits for the device's queued work (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def _cpu_peak(events: Iterable[Any]) -> int:
    """Peak of the running sum of the profiler's ``[memory]`` events on CPU, bytes."""
    live = peak = 0
    for event in events:
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def measure_step(forward: Callable[[], torch.Tensor], params: list[torch.Tensor],
                 device: str) -> StepMeasure:
    """Runs ``forward().backward()`` once, measured (Note [Allocator peak on CPU]).

    Args:
        forward: returns the loss of one forward pass.
        params: the model's parameters (their gradients are released first; their storages
            are not counted as saved).
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        The step's :class:`StepMeasure`.
    """
    from torch.profiler import ProfilerActivity, profile

    for p in params:
        p.grad = None
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=device == "cpu",
                 with_flops=True) as prof:
        loss, saved = saved_tensor_bytes(forward, exclude=params)
        loss.backward()
        synchronize(device)
    events = prof.profiler.kineto_results.events()  # raw events: no tree building
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = _cpu_peak(events)
    flops = sum(e.flops() for e in events if e.name() in MATMUL_OPS)
    return StepMeasure(peak_bytes=peak, flops=int(flops), saved_bytes=saved)


def rss_peak(step: Callable[[], Any]) -> int | None:
    """Peak resident bytes of ``step()`` above the memory before it, or None off Linux."""
    if not peak_rss_supported():
        return None
    return peak_rss_delta(step)[1]


def max_rel_err(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Max over parameters of max|g - g_ref| / max|g_ref| (computed in fp32)."""
    return max(float((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30))
               for g, r in zip(grads, ref))


def largest_fitting(peak_of: Callable[[int], int | None], limit_bytes: int, start: int,
                    max_batch: int = 4096) -> tuple[int, dict[int, int | None]]:
    """The largest batch whose measured peak is at most ``limit_bytes``.

    Doubles from ``start`` while the batch fits (or halves while it does not), then bisects
    between the largest batch that fits and the smallest that does not. Assumes the peak
    grows with the batch.

    Args:
        peak_of: measures one step at a batch size; its peak in bytes, or None when the step
            failed (out of memory counts as not fitting).
        limit_bytes: the memory limit, bytes.
        start: the first batch size to try (>= 1).
        max_batch: stop doubling here.

    Returns:
        (the batch, 0 when not even one fits; {batch: measured peak} of every probe).
    """
    probes: dict[int, int | None] = {}

    def fits(batch: int) -> bool:
        if batch not in probes:
            probes[batch] = peak_of(batch)
        return probes[batch] is not None and probes[batch] <= limit_bytes

    lo, hi = 0, None  # lo fits (0: nothing yet), hi does not
    batch = max(1, start)
    if fits(batch):
        lo = batch
        while hi is None and lo < max_batch:
            batch = min(2 * lo, max_batch)
            lo, hi = (batch, None) if fits(batch) else (lo, batch)
    else:
        hi = batch
        while lo == 0 and hi > 1:
            batch = hi // 2
            lo, hi = (batch, hi) if fits(batch) else (0, batch)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, probes
