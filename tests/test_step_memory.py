"""The predicted peak of a compiled training step against the allocator's live bytes.

A residual MLP compiled with ``CkptBackend`` trains one step under the profiler, whose CPU
allocator events count every allocation and free, Inductor's included (Note [Allocator peak
on CPU] in ``bench/_measure.py``); gradients are released before the step, so they count,
as they do in the simulation. The step returns the loss and the logits, and the caller
backpropagates from the loss and drops the logits (``model(x).loss.backward()``). The
report's ``predicted_peak_bytes`` must be within 5% of the measured peak: the compiled code
frees each input after its last use, and the logits die when the forward returns (their
zero tangent is what the backward holds), as Note [Memory model] of ``ckptfx/memory.py``
assumes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import ckptfx

BATCH, WIDTH, HIDDEN, BLOCKS = 256, 64, 256, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class Net(nn.Module):
    """Residual MLP blocks and a head: (the loss, the logits, a fifth of the step's peak)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, HIDDEN)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return logits.pow(2).mean(), logits


def allocator_peak(model: nn.Module, fn, x: torch.Tensor) -> int:
    """Peak bytes live at the CPU allocator during one step, above those live before it."""
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x)[0].backward()
    live = peak = 0
    events = prof.profiler.kineto_results.events()
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def measured_and_predicted(inner: str) -> tuple[int, int]:
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(BATCH, WIDTH)
    backend = ckptfx.CkptBackend(memory_budget=0.0, inner=inner)
    fn = torch.compile(model, backend=backend)
    fn(x)[0].backward()  # compiles
    measured = allocator_peak(model, fn, x)
    (report,) = backend.reports
    return measured, report.predicted_peak_bytes


def test_eager_inner_peak_within_5_percent_of_allocator():
    """``inner="eager"`` runs the graphs boxed: each saved tensor dies after its last use in
    the backward. Unpacked into positional arguments, every saved tensor would live until the
    backward returns and the measured peak would exceed the prediction by them."""
    measured, predicted = measured_and_predicted("eager")
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


@pytest.mark.inductor
def test_inductor_peak_within_5_percent_of_allocator():
    measured, predicted = measured_and_predicted("inductor")
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
