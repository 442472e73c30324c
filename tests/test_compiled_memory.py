"""Code compiled with ``inner="eager"`` frees what Note [Memory model] says it frees: the
partitioned graphs run boxed, so a saved value dies at its last use in the backward and the
measured peak of a compiled step is the simulated one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ckptfx
from ckptfx.testing import CompiledLiveStorages


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64),
                                         nn.Tanh()) for _ in range(3)])


def _measured(options: dict) -> tuple[ckptfx.RematReport, CompiledLiveStorages]:
    model, x = _model(), torch.randn(128, 64)
    backend = ckptfx.CkptBackend(inner="eager", **options)
    step = torch.compile(model, backend=backend)
    step(x).sum().backward()  # compiles; the gradients exist from here on
    kept = [x, *model.parameters(), *(p.grad for p in model.parameters())]
    with CompiledLiveStorages(exclude=kept) as live:
        step(x).sum().backward()
    (report,) = backend.reports
    return report, live


@pytest.mark.parametrize("options", [{}, {"memory_budget": 0.0, "budget_kind": "saved"}],
                         ids=["no-budget", "least-saved"])
def test_compiled_step_peaks_where_the_simulation_says(options):
    report, live = _measured(options)
    assert report.saved_bytes > 0 or options
    assert len(live.log) > 0  # the compiled graphs ran under the tracker, op by op
    # the simulation allocates the output's tangent in full; sum()'s backward hands an
    # expanded scalar (its bytes: one fp32 element; the loss and its seed gradient too)
    tangent = 128 * 64 * 4
    assert report.predicted_peak_bytes - tangent <= live.peak
    assert live.peak <= report.predicted_peak_bytes + 64
