"""Cost model: FLOPs from torch.utils.flop_counter, roofline seconds, profiled seconds."""

from __future__ import annotations

import logging

import torch

import ckptfx
from ckptfx.analysis import costs, profile
from ckptfx.analysis.costs import DEFAULT_MACHINE
from ckptfx.analysis.sizes import SizeHints
from ckptfx.analysis.table import build_table

aten = torch.ops.aten


def _table(cost_model="roofline"):
    torch.manual_seed(0)
    x = torch.randn(256, 512, requires_grad=True)
    w = torch.randn(512, 512, requires_grad=True)
    joint = ckptfx.trace_joint(lambda x, w: torch.relu(x @ w).t().sum(), x, w)
    return joint, build_table(joint, SizeHints(), cost_model=cost_model)


def _forward_row(table, op):
    """The one forward row whose op is ``op`` (an overload packet)."""
    (row,) = [r for r in table.rows if r.role is ckptfx.Role.FORWARD
              and getattr(r.target, "overloadpacket", None) is op]
    return row


def test_flops_and_roofline():
    _, table = _table()
    mm, relu, t = (_forward_row(table, op) for op in (aten.mm, aten.relu, aten.t))
    assert mm.flops == 2 * 256 * 512 * 512  # flop_counter's matmul formula
    assert relu.flops == 256 * 512  # one FLOP per element for pointwise ops
    assert t.is_view and t.cost_s == 0.0 and t.flops == 0
    assert mm.compute_intensive and not relu.compute_intensive
    # roofline: the matmul is compute-bound, relu memory-bound
    assert abs(mm.cost_s - (mm.flops / DEFAULT_MACHINE.peak_flops + DEFAULT_MACHINE.launch_s)) < 1e-12
    relu_bytes = 2 * 256 * 512 * 4
    assert abs(relu.cost_s - (relu_bytes / DEFAULT_MACHINE.bandwidth + DEFAULT_MACHINE.launch_s)) < 1e-12
    assert mm.cost_s > 10 * relu.cost_s


def test_a_failing_flop_formula_is_not_free(monkeypatch, caplog):
    """A formula that raises falls back to one FLOP per element, with a warning, never 0."""
    def broken(*args, **kwargs):
        raise TypeError("unexpected arguments")

    real = costs.compat.flop_registry()
    monkeypatch.setattr(costs.compat, "flop_registry", lambda: {**real, aten.mm: broken})
    with caplog.at_level(logging.WARNING, logger="ckptfx.costs"):
        _, table = _table()
    mm = _forward_row(table, aten.mm)
    assert mm.flops == 512 * 512  # the largest tensor among its arguments and result
    assert mm.cost_s > DEFAULT_MACHINE.launch_s
    assert any("FLOP formula" in r.getMessage() for r in caplog.records)


def test_profiled_costs_are_measured_and_cached():
    profile._CACHE.clear()
    joint, table = _table("profile")
    n_cached = len(profile._CACHE)
    assert n_cached >= 2
    mm, relu = _forward_row(table, aten.mm), _forward_row(table, aten.relu)
    assert mm.cost_s > 0 and relu.cost_s > 0
    build_table(joint, SizeHints(), cost_model="profile")
    assert len(profile._CACHE) == n_cached  # second table: every op a cache hit


def test_a_timing_lasts_the_minimum_measured_duration():
    """A fast op is run many times per timing (a single microsecond run is timer noise)."""
    calls = []
    per_call = profile.seconds_per_run(lambda: calls.append(1), repeats=3, min_measured_s=1e-3)
    assert per_call > 0
    assert len(calls) > 100  # a no-op call lasts far less than 10 us


def test_profile_cost_model_plans_and_keeps_gradients():
    from conftest import assert_bitwise, grads_of, run_partitioned

    torch.manual_seed(0)
    x = torch.randn(64, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)
    fn = lambda x, w: torch.tanh(x @ w).exp().sum()  # noqa: E731
    _, ref = grads_of(fn, [x, w])
    config = ckptfx.RematConfig(cost_model="profile")
    _, got, reports = run_partitioned(fn, [x, w], config)
    assert_bitwise(got, ref)
    assert reports[0].solver == "mincut" and not reports[0].fallback
