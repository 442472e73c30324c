"""Property tests (hypothesis): the solvers on random small DAGs, peak budgets on random MLPs.

Apart from the table tests so that those run where hypothesis is not installed.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

hypothesis = pytest.importorskip("hypothesis")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ckptfx  # noqa: E402
from ckptfx import RematConfig  # noqa: E402
from ckptfx.solvers.base import Force, ProblemNode, SolveProblem, needed_closure, saved_bytes  # noqa: E402
from ckptfx.solvers.budget import BudgetSolver  # noqa: E402
from ckptfx.solvers.knapsack import GreedySolver, penalised_cost  # noqa: E402
from test_solvers_budget import assert_valid, node  # noqa: E402

# --- properties on random small DAGs ----------------------------------------------------------

KINDS = ["plain"] * 6 + ["no_recompute", "no_save", "force_save", "force_recompute"]
KIND_FLAGS = {
    "plain": {},
    "no_recompute": {"can_recompute": False, "reason": "random op"},
    "no_save": {"can_save": False, "reason": "tuple"},
    "force_save": {"force": Force.SAVE, "reason": "MUST_SAVE"},
    "force_recompute": {"force": Force.RECOMPUTE, "reason": "MUST_RECOMPUTE"},
}


@st.composite
def small_problems(draw, max_nodes=10):
    """Random DAGs that always admit a valid plan: every primal may be saved, and every other
    node may be saved or computed in the backward (never banned from both)."""
    n = draw(st.integers(1, max_nodes))
    n_inputs = draw(st.integers(1, min(3, n)))
    nodes: list[ProblemNode] = []
    for i in range(n):
        nbytes = draw(st.sampled_from([0, 1, 4, 10, 25, 50, 100]))
        needed = draw(st.booleans())
        if i < n_inputs:
            nodes.append(node(f"n{i}", nbytes, is_input=True, needed_by_backward=needed))
            continue
        ins = draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=3, unique=True))
        in_forward = all(nodes[j].in_forward for j in ins) and draw(st.integers(0, 5)) > 0
        cost = float(draw(st.integers(0, 10))) if in_forward else 0.0
        prefer = draw(st.sampled_from([0.0] * 5 + [-3.0, 2.0, 5.0]))
        nodes.append(node(f"n{i}", nbytes, cost, [f"n{j}" for j in ins], in_forward=in_forward,
                          needed_by_backward=needed, prefer=prefer,
                          **KIND_FLAGS[draw(st.sampled_from(KINDS))]))
    return SolveProblem(tuple(nodes))


def brute_force(problem):
    """(bytes, penalised cost, saved) of every valid saved set (the MILP's rule: nodes forced
    to be recomputed are never saved, not even backward-native ones)."""
    names = [n.name for n in problem.nodes]
    forced = {n.name for n in problem.nodes if n.force is Force.RECOMPUTE}
    plans = []
    for k in range(len(names) + 1):
        for subset in itertools.combinations(names, k):
            saved = set(subset)
            if saved & forced or needed_closure(problem, saved)[1]:
                continue
            plans.append((saved_bytes(problem, saved), penalised_cost(problem, saved), subset))
    return plans


def optimum(plans, budget):
    """(least penalised cost, least bytes at that cost) within budget, or None."""
    fits = [(c, b) for b, c, _ in plans if budget is None or b <= budget]
    return min(fits, key=lambda cb: (round(cb[0], 9), cb[1])) if fits else None


PROPS = settings(deadline=None, max_examples=40, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(small_problems(max_nodes=12), st.sampled_from([None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]))
def test_plans_valid_and_within_budget(problem, fraction):
    total = sum(n.nbytes for n in problem.nodes)
    budget = None if fraction is None else int(fraction * total)
    problem = dataclasses.replace(problem, budget_bytes=budget)
    exact, greedy = BudgetSolver().solve(problem), GreedySolver().solve(problem)
    for sol in (exact, greedy):  # (a), (b) first half
        assert_valid(problem, sol)
    assert exact.feasible == greedy.feasible
    # (c) the exact solver is never worse than the heuristic at the same budget
    assert penalised_cost(problem, exact.saved) <= penalised_cost(problem, greedy.saved) + 1e-9


@PROPS
@given(small_problems(max_nodes=9), st.data())
def test_matches_brute_force(problem, data):
    plans = brute_force(problem)
    floor = min(b for b, _, _ in plans)
    budgets = sorted({b for b, _, _ in plans} | {max(floor - 1, 0)})
    budget = data.draw(st.sampled_from([None, *budgets]))
    problem = dataclasses.replace(problem, budget_bytes=budget)
    best = optimum(plans, budget)
    for solver in (BudgetSolver(), GreedySolver()):  # (b) feasible iff a plan fits
        sol = solver.solve(problem)
        assert sol.feasible == (best is not None), solver.name
        if best is None:
            assert saved_bytes(problem, sol.saved) == floor
    exact = BudgetSolver().solve(problem)
    target = best or optimum(plans, floor)
    cost = penalised_cost(problem, exact.saved)  # (d) optimal, then fewest bytes
    assert cost == pytest.approx(target[0], abs=1e-9)
    assert saved_bytes(problem, exact.saved) == target[1]


@settings(deadline=None, max_examples=25, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(small_problems(max_nodes=12))
def test_monotone_in_budget(problem):
    floor = saved_bytes(problem, GreedySolver().solve(
        dataclasses.replace(problem, budget_bytes=0)).saved)
    top = saved_bytes(problem, BudgetSolver().solve(problem).saved)
    budgets = sorted({top, floor, max(floor - 1, 0), (top + floor) // 2, (3 * floor + top) // 4},
                     reverse=True)
    last = -1.0
    for budget in budgets:  # (e) falling budget: bytes stay within it, cost never falls
        p = dataclasses.replace(problem, budget_bytes=budget)
        sol = BudgetSolver().solve(p)
        assert sol.feasible == (budget >= floor)
        assert saved_bytes(p, sol.saved) <= max(budget, floor)
        cost = penalised_cost(p, sol.saved)
        assert cost >= last - 1e-9
        last = cost


@settings(deadline=None, max_examples=8, derandomize=True)
@given(layers=st.integers(1, 3), width=st.sampled_from([32, 64, 128]),
       acts=st.lists(st.sampled_from(["tanh", "exp", "sin", "relu"]), min_size=3, max_size=3))
def test_peak_budgets_on_random_mlps(layers, width, acts):
    torch.manual_seed(0)
    ws = [torch.randn(width, width, requires_grad=True) * 0.1 for _ in range(layers)]
    x = torch.randn(256, width, requires_grad=True)

    def f(x, *ws):
        h = x
        for i, w in enumerate(ws):
            h = getattr(torch, acts[i % 3])(h @ w)
        return h.sum()

    joint = ckptfx.trace_joint(f, x, *ws)
    least = ckptfx.plan_remat(joint, RematConfig.from_options(
        {"memory_budget": 0.0, "budget_kind": "peak"}))
    assert least.feasible  # the least peak is always achievable
    for fraction in (1.0, 0.9, 0.7, 0.5):
        plan = ckptfx.plan_remat(joint, RematConfig.from_options(
            {"memory_budget": fraction, "budget_kind": "peak"}))
        if plan.feasible:
            assert plan.predicted_peak_bytes <= plan.budget_bytes
        else:
            assert plan.budget_bytes < least.predicted_peak_bytes
        assert least.predicted_peak_bytes <= plan.predicted_peak_bytes
