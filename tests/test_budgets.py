"""Memory budgets end to end: saved-bytes and peak budgets, strictness, the frontier."""

from __future__ import annotations

import logging

import pytest
import torch

import ckptfx
from ckptfx import InfeasibleBudgetError, RematConfig

from ckptfx.testing import ops_of
from conftest import assert_bitwise, grads_of, run_partitioned

KIB = 1024


def mlp(x, w1, w2):
    return torch.tanh(torch.relu(x @ w1) @ w2).exp().sin().sum()


def _inputs():
    torch.manual_seed(0)
    return [torch.randn(128, 128, requires_grad=True) for _ in range(3)]  # 64 KiB each


def _joint():
    return ckptfx.trace_joint(mlp, *_inputs())


def cfg(options):
    """Options for saved-bytes budgets below the no-budget plan: they recompute matmuls here,
    which ``recompute_expensive=False`` forbids every solver (tests/test_solvers_budget.py)."""
    return RematConfig.from_options({"recompute_expensive": True, "budget_kind": "saved",
                                     **options})


@pytest.mark.parametrize("budget", [1.0, 0.8, 0.6, 0.0, "250KiB", 200 * KIB])
def test_saved_bytes_within_budget_and_gradients_exact(budget):
    config = cfg({"memory_budget": budget})
    plan = ckptfx.plan_remat(_joint(), config)
    assert plan.solver == "budget" and plan.feasible
    assert plan.saved_bytes <= plan.budget_bytes
    inputs = _inputs()
    _, ref = grads_of(mlp, inputs)
    _, got, reports = run_partitioned(mlp, inputs, config)
    assert_bitwise(got, ref)
    assert reports[0].saved_bytes == plan.saved_bytes and not reports[0].fallback


def test_fraction_zero_is_least_achievable():
    joint = _joint()
    least = ckptfx.plan_remat(joint, cfg({"memory_budget": 0.0}))
    assert least.feasible
    # only the three inputs: everything else, matmuls included, is recomputed from them
    assert ops_of(least, least.saved) == ("primal",) * 3
    assert least.saved_bytes == 3 * 64 * KIB
    for b in (1.0, 0.7, 0.5):
        other = ckptfx.plan_remat(joint, cfg({"memory_budget": b}))
        assert other.saved_bytes >= least.saved_bytes


@pytest.mark.parametrize("recompute_expensive", [False, True])
def test_less_saved_budget_never_costs_less_recompute(recompute_expensive):
    """Saved-bytes budgets: 1.0 is the no-budget plan exactly; below it, the no-budget plan
    already saves the fewest bytes the solvers may reach (recompute_expensive=False forbids
    recomputing the matmuls; True makes the min-cut the least-bytes plan), so it is the
    closest plan and no smaller budget changes the plan."""
    joint = _joint()
    plans = [ckptfx.plan_remat(joint, cfg(
        {"memory_budget": b, "recompute_expensive": recompute_expensive}))
        for b in (1.0, 0.8, 0.6, 0.5, 0.4, 0.0)]
    costs = [ckptfx.apply_plan(joint, p)[2].extra_cost_s for p in plans]
    assert costs == sorted(costs)
    # 1.0 is what the pass keeps without a budget (Note [Budget fractions])
    default = ckptfx.plan_remat(joint, RematConfig(recompute_expensive=recompute_expensive))
    assert plans[0].budget_bytes == default.saved_bytes and plans[0].feasible
    assert all(p.saved == default.saved for p in plans)
    assert all(p.feasible for p in plans)  # 0.0: the least the solvers may reach
    if not recompute_expensive:  # a byte budget below it says how far True would go
        below = ckptfx.plan_remat(joint, RematConfig(
            memory_budget=ckptfx.MemoryBudget(nbytes=200_000), budget_kind="saved",
            recompute_expensive=False))
        assert not below.feasible
        assert any(n.startswith("recompute_expensive=True would allow down to 196608 B")
                   for n in below.notes)


def test_less_peak_budget_never_costs_less_recompute():
    joint = _joint()
    costs = []
    for b in (1.0, 0.8, 0.6, 0.5, 0.4, 0.0):
        _, _, report = ckptfx.apply_plan(joint, ckptfx.plan_remat(
            joint, RematConfig.from_options({"memory_budget": b, "budget_kind": "peak"})))
        costs.append(report.extra_cost_s)
    assert costs == sorted(costs)
    # 1.0 is the no-budget plan itself (Note [Budget fractions])
    default = ckptfx.plan_remat(joint)
    one = ckptfx.plan_remat(joint, RematConfig.from_options({"memory_budget": 1.0,
                                                             "budget_kind": "peak"}))
    assert one.saved == default.saved and one.budget_bytes == one.predicted_peak_bytes


def test_infeasible_budget_warns_or_raises(caplog):
    joint = _joint()
    with caplog.at_level(logging.WARNING, logger="ckptfx"):
        plan = ckptfx.plan_remat(joint, cfg({"memory_budget": "1KiB"}))
    assert not plan.feasible and plan.saved_bytes == 3 * 64 * KIB  # the closest plan
    assert any("cannot be met" in r.getMessage() for r in caplog.records)
    with pytest.raises(InfeasibleBudgetError) as info:
        ckptfx.plan_remat(joint, cfg({"memory_budget": "1KiB", "strict": True}))
    assert info.value.smallest_bytes == 3 * 64 * KIB and info.value.budget_bytes == 1024
    assert "memory_budget" in str(info.value)


def three_layers(x, w1, w2, w3):
    h = torch.tanh(x @ w1).exp()
    h = torch.sin(h @ w2).exp()
    return torch.cos(h @ w3).sum()


def test_peak_budget_is_met_by_simulated_peak():
    torch.manual_seed(0)
    shapes = [(512, 64), (64, 256), (256, 256), (256, 64)]
    inputs = [torch.randn(*s, requires_grad=True) for s in shapes]
    joint = ckptfx.trace_joint(three_layers, *inputs)
    full = ckptfx.plan_remat(joint, RematConfig.from_options(
        {"memory_budget": 1.0, "budget_kind": "peak"}))
    least = ckptfx.plan_remat(joint, RematConfig.from_options(
        {"memory_budget": 0.0, "budget_kind": "peak"}))
    assert full.feasible and least.feasible
    assert least.predicted_peak_bytes <= least.budget_bytes
    assert least.predicted_peak_bytes < full.predicted_peak_bytes
    # a byte budget between the two is met, and the peak never rises as the budget falls
    mid_budget = (least.predicted_peak_bytes + full.predicted_peak_bytes) // 2
    mid = ckptfx.plan_remat(joint, RematConfig(memory_budget=ckptfx.MemoryBudget(
        nbytes=mid_budget), budget_kind="peak"))
    assert mid.feasible and mid.predicted_peak_bytes <= mid_budget
    assert least.predicted_peak_bytes <= mid.predicted_peak_bytes <= full.predicted_peak_bytes
    # the plan's peak is what the memory model says of the emitted graphs
    _, _, report = ckptfx.apply_plan(joint, least)
    assert report.predicted_peak_bytes == least.predicted_peak_bytes
    # below the least peak: closest plan, or an error naming the smallest figure
    with pytest.raises(InfeasibleBudgetError) as info:
        ckptfx.plan_remat(joint, RematConfig(memory_budget=ckptfx.MemoryBudget(nbytes=1000),
                                             budget_kind="peak", strict=True))
    assert info.value.smallest_bytes == least.predicted_peak_bytes
    _, ref = grads_of(three_layers, inputs)
    _, got, _ = run_partitioned(three_layers, inputs, RematConfig.from_options(
        {"memory_budget": 0.0, "budget_kind": "peak"}))
    assert_bitwise(got, ref)


def test_pareto_frontier_rows():
    rows = ckptfx.pareto(_joint(), budgets=(1.0, 0.6, 0.4, 0.0))
    assert [r.budget for r in rows] == ["1.0", "0.6", "0.4", "0.0"]
    peaks = [r.predicted_peak_bytes for r in rows]  # a peak budget by default
    assert peaks == sorted(peaks, reverse=True)
    # saved-bytes budgets cannot go below the no-budget plan (Note [A budget the no-budget
    # plan meets] in ckptfx/planner.py): 1.0 is that plan, and no smaller budget trades more
    saved_kind = ckptfx.pareto(_joint(), budgets=(1.0, 0.6, 0.4, 0.0, "1KiB"),
                               config=RematConfig(solver="budget", budget_kind="saved",
                                                  memory_budget=1.0))
    saved = [r.saved_bytes for r in saved_kind]
    assert saved == sorted(saved, reverse=True)
    assert saved[0] == ckptfx.plan_remat(_joint()).saved_bytes
    flops = [r.extra_flops for r in saved_kind]
    assert flops == sorted(flops)
    assert all(r.predicted_peak_bytes is not None for r in rows)
    from ckptfx.frontier import format_frontier

    assert "budget" in format_frontier(rows)


def test_greedy_solver_through_the_pipeline():
    config = cfg({"memory_budget": 0.5, "solver": "greedy"})
    plan = ckptfx.plan_remat(_joint(), config)
    assert plan.solver == "greedy" and plan.saved_bytes <= plan.budget_bytes
    inputs = _inputs()
    _, ref = grads_of(mlp, inputs)
    _, got, _ = run_partitioned(mlp, inputs, config)
    assert_bitwise(got, ref)


def test_peak_search_keeps_to_the_time_limit():
    torch.manual_seed(0)
    shapes = [(512, 64), (64, 256), (256, 256), (256, 64)]
    joint = ckptfx.trace_joint(three_layers, *[torch.randn(*s, requires_grad=True) for s in shapes])
    roomy = ckptfx.plan_remat(joint, cfg(
        {"memory_budget": 0.0, "budget_kind": "peak"}))
    hurried = ckptfx.plan_remat(joint, cfg(
        {"memory_budget": 0.0, "budget_kind": "peak", "time_limit_s": 1e-6}))

    def simulated(plan):
        (note,) = [n for n in plan.notes if n.startswith("peak search")]
        return int(note.split()[2])

    # past the deadline only the least-bytes plan and the no-budget plan are simulated
    assert simulated(hurried) == 2 < simulated(roomy)
    assert hurried.predicted_peak_bytes <= hurried.budget_bytes


# ---- a budget the no-budget plan meets is that plan --------------------------------------------

def _same_plan(got, want):
    assert (got.saved, got.recomputed, got.saved_bytes) == (want.saved, want.recomputed,
                                                           want.saved_bytes)
    assert got.feasible


@pytest.mark.parametrize("name", sorted(ckptfx.testing.TOY_GRAPHS))
def test_fraction_one_and_any_larger_bytes_are_the_no_budget_plan(name):
    """Note [A budget the no-budget plan meets] in ckptfx/planner.py: 1.0, the no-budget
    plan's bytes and more give exactly the plan without a budget, whatever the solver."""
    fn, inputs = ckptfx.testing.TOY_GRAPHS[name]()
    joint = ckptfx.trace_joint(fn, *inputs)
    default = ckptfx.plan_remat(joint)
    for budget, solver in ((1.0, "auto"), (1.0, "greedy"), (default.saved_bytes, "budget"),
                           (default.saved_bytes + 4096, "auto")):
        config = RematConfig(memory_budget=budget if isinstance(budget, float) else
                             ckptfx.MemoryBudget(nbytes=budget), budget_kind="saved",
                             solver=solver)
        _same_plan(ckptfx.plan_remat(joint, config), default)


@pytest.mark.parametrize("recompute_expensive", [False, True])
def test_fraction_one_on_a_gpt_is_the_no_budget_plan(recompute_expensive):
    from toy_models import gpt

    model, inputs = gpt()
    joint = ckptfx.trace_joint(model, *inputs)
    default = ckptfx.plan_remat(joint, RematConfig(recompute_expensive=recompute_expensive))
    one = ckptfx.plan_remat(joint, RematConfig(memory_budget=1.0, budget_kind="saved",
                                               recompute_expensive=recompute_expensive))
    _same_plan(one, default)
    assert one.notes[0].startswith(f"budget {default.saved_bytes} B >= the no-budget plan's")
    if not recompute_expensive:  # no matmul recomputed, as without a budget
        assert not {"addmm", "bmm", "mm"} & set(ops_of(one, one.recomputed))
