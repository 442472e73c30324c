"""Under Inductor the backward runs in the order ckptfx planned (Note [Fusion keeps the planned order]).

Six checkpointed MLP blocks run twice in one graph: every weight is used twice, so its
gradients are summed in the backward. Inductor used to fuse the bias-gradient sum of the
first use with the one of the second, hoisting the whole input-gradient chain between them
and leaving every weight-gradient matmul, with its recomputed input, to the end.

Memory is measured at the allocator: Inductor's generated code allocates with
``empty_strided_cpu``, which no TorchDispatchMode sees, while the CPU allocator reports every
allocation and free to the profiler (``profile_memory=True``). The backward working set is
the largest live total during ``loss.backward()`` less the total when it starts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.checkpoint import checkpoint

import ckptfx

pytestmark = pytest.mark.inductor

BATCH, WIDTH, HIDDEN, BLOCKS = 512, 64, 256, 6
BACKWARD_MARK = "ckptfx_test_backward_starts"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class TwiceCheckpointed(nn.Module):
    """The same checkpointed blocks applied twice (``y = blocks(blocks(x))``)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))

    def forward(self, x):
        for _ in range(2):
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        return x


@dataclasses.dataclass(frozen=True)
class Step:
    """One measured training step.

    Attributes:
        peak: largest live bytes allocated during the step.
        backward_working_set: largest live bytes during the backward less those live
            when it starts.
        grads: the parameters' gradients.
    """

    peak: int
    backward_working_set: int
    grads: tuple[torch.Tensor, ...]


def measured_step(model: nn.Module, fn, x: torch.Tensor) -> Step:
    """Runs one step of ``fn`` (warmed up, gradients already allocated) under the profiler."""
    fn(x).pow(2).mean().backward()
    model.zero_grad(set_to_none=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = fn(x).pow(2).mean()
        with record_function(BACKWARD_MARK):
            pass
        loss.backward()
    events = prof.profiler.kineto_results.events()
    backward_starts = next(e.start_ns() for e in events if e.name() == BACKWARD_MARK)
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live, peak, at_backward, backward_peak = 0, 0, None, 0
    for event in memory:
        if at_backward is None and event.start_ns() > backward_starts:
            at_backward = live
        live += event.nbytes()
        peak = max(peak, live)
        if at_backward is not None:
            backward_peak = max(backward_peak, live)
    grads = tuple(p.grad.detach().clone() for p in model.parameters())
    return Step(peak, backward_peak - (at_backward or 0), grads)


@pytest.fixture(scope="module")
def steps():
    """(eager checkpointing, ckptfx under Inductor, the backend) on the same weights."""
    import torch._dynamo
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    eager = TwiceCheckpointed()
    compiled = TwiceCheckpointed()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(BATCH, WIDTH)
    backend = ckptfx.CkptBackend()
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        fn = torch.compile(compiled, backend=backend)
        inductor_step = measured_step(compiled, fn, x)
    torch._dynamo.reset()
    return measured_step(eager, eager, x), inductor_step, backend


def test_backward_working_set_close_to_eager_checkpointing(steps):
    eager, inductor, _ = steps
    assert inductor.backward_working_set <= 1.5 * eager.backward_working_set, (
        inductor.backward_working_set, eager.backward_working_set)


def test_gradients_match_eager_checkpointing(steps):
    eager, inductor, _ = steps
    for want, got in zip(eager.grads, inductor.grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_simulated_peak_within_5_percent_of_measured(steps):
    """The prediction counts the buffers Inductor allocates (Note [Fused values] in
    ckptfx.memory) in the planned order. Were the weight-gradient matmuls left to the end
    of the backward, the measured peak would exceed it by their recomputed inputs."""
    _, inductor, backend = steps
    report = backend.reports[-1]
    assert any("buffers Inductor allocates" in note for note in report.notes), report.notes
    predicted = report.predicted_peak_bytes
    assert abs(predicted - inductor.peak) <= 0.05 * inductor.peak, (predicted, inductor.peak)
