"""Pipeline stages: budgets that count the microbatches a stage keeps in flight
(Note [Microbatches in flight] in ckptfx/stages.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ckptfx
from ckptfx.errors import ConfigError
from ckptfx.stages import schedule_in_flight


def _model():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64),
                                         nn.Tanh()) for _ in range(3)])


def _report(**options):
    backend = ckptfx.CkptBackend(inner="eager", **options)
    torch.compile(_model(), backend=backend)(torch.randn(32, 64)).sum().backward()
    (report,) = backend.reports
    return report


def test_one_f_one_b_keeps_stages_minus_index_and_gpipe_all():
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    assert [schedule_in_flight("1F1B", i, 4, 8) for i in range(4)] == [4, 3, 2, 1]
    assert schedule_in_flight(Schedule1F1B, 0, 4, 2) == 2  # never more than there are
    assert schedule_in_flight(ScheduleGPipe, 3, 4, 8) == 8
    assert ckptfx.pipeline_stage_options("gpipe", 0, 2, 2**30, 4) == {
        "memory_budget": 2**30, "budget_kind": "peak", "microbatches_in_flight": 4}
    # what the schedule holds besides one step (Note [What the schedule holds]): every
    # microbatch's output, and past the first stage one input gradient being sent back
    first = ckptfx.pipeline_stage_options("1F1B", 0, 2, 2**20, 4, output_bytes=100,
                                          input_bytes=10)
    last = ckptfx.pipeline_stage_options("1F1B", 1, 2, 2**20, 4, output_bytes=100,
                                         input_bytes=10)
    assert (first["memory_budget"], last["memory_budget"]) == (2**20 - 400, 2**20 - 410)
    with pytest.raises(ConfigError, match="holds 4000 B"):
        ckptfx.pipeline_stage_options("1F1B", 0, 2, 3000, 4, output_bytes=1000)
    with pytest.raises(ConfigError, match="input_bytes=-1"):
        ckptfx.pipeline_stage_options("1F1B", 1, 2, 3000, 4, input_bytes=-1)
    with pytest.raises(ConfigError, match="ScheduleInterleaved1F1B"):
        schedule_in_flight("ScheduleInterleaved1F1B", 0, 2, 4)
    with pytest.raises(ConfigError, match="microbatches_in_flight"):
        ckptfx.RematConfig(microbatches_in_flight=0)


def test_saved_budget_holds_every_microbatch_in_flight():
    full = _report().saved_bytes
    budget = full  # one microbatch's default plan fits, three in flight do not
    one = _report(memory_budget=budget, budget_kind="saved")
    three = _report(memory_budget=budget, budget_kind="saved", microbatches_in_flight=3)
    assert 3 * one.saved_bytes > budget  # planned without the option: exceeds in flight
    assert 3 * three.saved_bytes <= budget
    assert f"in flight: saved {3 * three.saved_bytes} B" in " ".join(three.notes)


def test_peak_budget_counts_waiting_microbatches_and_one_step():
    one = _report(memory_budget=1.0, budget_kind="peak")
    budget = one.predicted_peak_bytes + one.saved_bytes // 2
    alone = _report(memory_budget=budget, budget_kind="peak")
    two = _report(memory_budget=budget, budget_kind="peak", microbatches_in_flight=2)
    assert alone.saved_bytes + alone.predicted_peak_bytes > budget
    assert two.saved_bytes + two.predicted_peak_bytes <= budget
    note = [n for n in two.notes if n.startswith("microbatches in flight: 2")]
    assert note and f"peak {two.saved_bytes + two.predicted_peak_bytes} B" in note[0]
