"""Cost model: FLOPs from torch.utils.flop_counter, roofline seconds, profiled seconds."""

from __future__ import annotations

import logging

import pytest
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


# ---- Note [Fused pointwise chains] -----------------------------------------------------------

def gelu_erf(h):
    """The exact GELU written out: five pointwise ops (mul, mul, erf, add, mul)."""
    return 0.5 * h * (1.0 + torch.erf(h * 0.7071067811865476))


def _gelu_after_matmuls():
    """x (512x64) @ w (64x1024) -> GELU -> @ w2: the GELU's tensor is the matmul's output."""
    torch.manual_seed(0)
    x, w, w2 = (torch.randn(*s, requires_grad=True) for s in ((512, 64), (64, 1024), (1024, 8)))
    joint = ckptfx.trace_joint(lambda x, w, w2: (gelu_erf(x @ w) @ w2).sum(), x, w, w2)
    return build_table(joint, SizeHints())


def test_a_fused_gelu_costs_less_than_a_matmul_of_its_size():
    table = _gelu_after_matmuls()
    fw = [r for r in table.rows if r.role is ckptfx.Role.FORWARD]
    mm = next(r for r in fw if r.compute_intensive)
    gelu = [r for r in fw if torch.Tag.pointwise in getattr(r.target, "tags", ())]
    assert [r.target.overloadpacket for r in gelu] == [
        aten.mul, aten.mul, aten.erf, aten.add, aten.mul]
    size = 512 * 1024 * 4  # bytes of the matmul's output, the GELU's input and output
    bw, launch = DEFAULT_MACHINE.bandwidth, DEFAULT_MACHINE.launch_s
    # the two heads read the matmul's output; erf and add fuse; the last op's value is
    # written for the next matmul; one launch per head
    assert [r.cost_s for r in gelu] == pytest.approx(
        [size / bw + launch, size / bw + launch, 0.0, 0.0, size / bw], rel=1e-9)
    assert sum(r.cost_s for r in gelu) < mm.cost_s
    # one roofline per op (its inputs read, its output written, a launch) priced it above
    per_op = sum((sum(table.bytes_of(i) for i in r.inputs) + table.bytes_of(r.name)) / bw + launch
                 for r in gelu)
    assert per_op > mm.cost_s


def _gpt_budget_plans(fractions):
    """The budget MILP's plans (recompute_expensive=True) for saved-bytes fractions of a GPT
    whose MLP uses GPT-2's written-out tanh GELU; ``{fraction: recomputed matmuls}``."""
    import dataclasses

    from ckptfx.planner import mincut_saved, prepare
    from ckptfx.solvers.base import needed_closure, saved_bytes
    from ckptfx.solvers.budget import BudgetSolver
    from toy_models import gpt

    joint = ckptfx.trace_joint(*_flat(gpt()))
    prep = prepare(joint, ckptfx.RematConfig(recompute_expensive=True))
    problem = prep.problem
    least = saved_bytes(problem, mincut_saved(problem, True))
    default = saved_bytes(problem, mincut_saved(problem, False))
    heavy = {r.name for r in prep.table.rows if r.compute_intensive}
    out = {}
    for f in fractions:
        bound = dataclasses.replace(problem, budget_bytes=least + int(f * (default - least)))
        solution = BudgetSolver(recompute_expensive=True).solve(bound)
        assert solution.feasible
        out[f] = heavy & needed_closure(bound, set(solution.saved))[0]
    return out


def _flat(model_and_inputs):
    model, inputs = model_and_inputs
    return (model, *inputs)


def test_budgets_on_a_gpt_recompute_pointwise_chains_before_matmuls(monkeypatch):
    """With fused chains priced as one kernel, the MILP frees bytes by recomputing the GELU
    and layer-norm chains rather than matmuls; one roofline per op made it recompute more
    matmuls at the same budgets (the issue's 1.0 case: a matmul for a GELU)."""
    fractions = (0.5, 0.65, 0.8, 0.95)
    fused = _gpt_budget_plans(fractions)
    monkeypatch.setattr(costs, "fusible", lambda node: False)  # one roofline per op
    per_op = _gpt_budget_plans(fractions)
    assert all(len(fused[f]) <= len(per_op[f]) for f in fractions), (fused, per_op)
    assert sum(map(len, fused.values())) < sum(map(len, per_op.values()))


def test_fraction_one_does_not_depend_on_the_cost_model(monkeypatch):
    """1.0 is the no-budget plan (the min-cut: bytes only), whichever way chains are priced."""
    from toy_models import gpt

    joint = ckptfx.trace_joint(*_flat(gpt()))
    config = ckptfx.RematConfig(memory_budget=1.0, budget_kind="saved")
    fused = ckptfx.plan_remat(joint, config)
    monkeypatch.setattr(costs, "fusible", lambda node: False)
    per_op = ckptfx.plan_remat(joint, config)
    assert (fused.saved, fused.recomputed) == (per_op.saved, per_op.recomputed)
    assert fused.saved == ckptfx.plan_remat(joint).saved
