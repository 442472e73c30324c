"""Cost model: FLOPs from torch.utils.flop_counter, roofline seconds, profiled seconds."""

from __future__ import annotations

import torch

import ckptfx
from ckptfx.analysis import profile
from ckptfx.analysis.costs import DEFAULT_MACHINE
from ckptfx.analysis.sizes import SizeHints
from ckptfx.analysis.table import build_table


def _table(cost_model="roofline"):
    torch.manual_seed(0)
    x = torch.randn(256, 512, requires_grad=True)
    w = torch.randn(512, 512, requires_grad=True)
    joint = ckptfx.trace_joint(lambda x, w: torch.relu(x @ w).t().sum(), x, w)
    return joint, build_table(joint, SizeHints(), cost_model=cost_model)


def test_flops_and_roofline():
    _, table = _table()
    mm, relu, t = table["mm"], table["relu"], table["t"]
    assert mm.flops == 2 * 256 * 512 * 512  # flop_counter's matmul formula
    assert relu.flops == 256 * 512  # one FLOP per element for pointwise ops
    assert t.is_view and t.cost_s == 0.0 and table["t"].flops == 0
    assert mm.compute_intensive and not relu.compute_intensive
    # roofline: the matmul is compute-bound, relu memory-bound
    assert abs(mm.cost_s - (mm.flops / DEFAULT_MACHINE.peak_flops + DEFAULT_MACHINE.launch_s)) < 1e-12
    relu_bytes = 2 * 256 * 512 * 4
    assert abs(relu.cost_s - (relu_bytes / DEFAULT_MACHINE.bandwidth + DEFAULT_MACHINE.launch_s)) < 1e-12
    assert mm.cost_s > 10 * relu.cost_s


def test_profiled_costs_are_measured_and_cached():
    profile._CACHE.clear()
    joint, table = _table("profile")
    n_cached = len(profile._CACHE)
    assert n_cached >= 2
    mm, relu = table["mm"], table["relu"]
    assert mm.cost_s > 0 and relu.cost_s > 0
    assert mm.cost_s > relu.cost_s  # 134 MFLOP vs a 512 KiB pointwise pass, measured
    build_table(joint, SizeHints(), cost_model="profile")
    assert len(profile._CACHE) == n_cached  # second table: every op a cache hit


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
