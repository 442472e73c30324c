"""Budget (MILP) and greedy solvers on hand-built SolveProblems: tables and properties.

Pure data: no torch graphs. Tables assert exact saved sets and objectives; the properties on
random small DAGs (hypothesis) are in tests/test_properties.py.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import random

import pytest

from ckptfx.errors import UnsupportedGraphError
from ckptfx.solvers import budget as budget_mod
from ckptfx.solvers import registry
from ckptfx.solvers.base import Force, ProblemNode, SolveProblem, needed_closure, saved_bytes
from ckptfx.solvers.budget import BudgetSolver
from ckptfx.solvers.knapsack import GreedySolver, penalised_cost


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Overrides conftest's Dynamo reset: these tests never touch torch."""
    yield


def node(name, nbytes, cost=0.0, inputs=(), **kw):
    return ProblemNode(name, nbytes, float(cost), tuple(inputs), **kw)


def chain(budget=None, **overrides):
    """x -> a -> b -> c; the backward reads a, b, c (100 B each; costs 1, 2, 3 s)."""
    nodes = [node("x", 10, is_input=True),
             node("a", 100, 1, ("x",), needed_by_backward=True),
             node("b", 100, 2, ("a",), needed_by_backward=True),
             node("c", 100, 3, ("b",), needed_by_backward=True)]
    nodes = [dataclasses.replace(n, **overrides.get(n.name, {})) for n in nodes]
    return SolveProblem(tuple(nodes), budget_bytes=budget)


def diamond(budget=None):
    """x -> a -> {b (cost 1), c (cost 5)} -> d; the backward reads b and c (50 B each)."""
    return SolveProblem((node("x", 10, is_input=True),
                         node("a", 100, 1, ("x",)),
                         node("b", 50, 1, ("a",), needed_by_backward=True),
                         node("c", 50, 5, ("a",), needed_by_backward=True),
                         node("d", 100, 1, ("b", "c"))), budget_bytes=budget)


def view_pair(budget=None):
    """a and a free view v of it are both read: saving a alone suffices (tie-break)."""
    return SolveProblem((node("x", 10, is_input=True),
                         node("a", 100, 1, ("x",), needed_by_backward=True),
                         node("v", 100, 0, ("a",), needed_by_backward=True)), budget_bytes=budget)


def banned(budget=None):
    """x -> r (random: never recomputed, 60 B) -> y (100 B, read by the backward)."""
    return SolveProblem((node("x", 10, is_input=True),
                         node("r", 60, 1, ("x",), can_recompute=False, reason="random op"),
                         node("y", 100, 1, ("r",), needed_by_backward=True)), budget_bytes=budget)


# (case id, problem, expected saved, expected objective, expected feasible)
BUDGET_CASES = [
    ("chain-none", chain(None), ("a", "b", "c"), 0.0, True),
    ("chain-300", chain(300), ("a", "b", "c"), 0.0, True),
    ("chain-200", chain(200), ("a", "c"), 2.0, True),
    ("chain-150", chain(150), ("x", "c"), 3.0, True),
    ("chain-50", chain(50), ("x",), 6.0, True),
    ("chain-0-infeasible", chain(0), ("x",), 6.0, False),
    ("chain-0-static-input", chain(0, x={"nbytes": 0}), ("x",), 6.0, True),
    ("diamond-none", diamond(None), ("b", "c"), 0.0, True),
    ("diamond-60", diamond(60), ("x", "c"), 2.0, True),
    ("diamond-99", diamond(99), ("x", "c"), 2.0, True),
    ("diamond-5-infeasible", diamond(5), ("x",), 7.0, False),
    ("view-tie-break", view_pair(None), ("a",), 0.0, True),
    ("banned-none", banned(None), ("y",), 0.0, True),
    ("banned-80", banned(80), ("r",), 1.0, True),
    ("banned-50-infeasible", banned(50), ("r",), 1.0, False),
    ("force-save", chain(150, b={"force": Force.SAVE}), ("x", "b"), 4.0, True),
    ("force-recompute", chain(None, a={"force": Force.RECOMPUTE}), ("x", "b", "c"), 1.0, True),
    ("prefer-save", chain(200, b={"prefer": 5.0}), ("a", "b"), 3.0, True),
    ("prefer-recompute", chain(None, c={"prefer": -10.0}), ("a", "b"), 3.0, True),
]

# The greedy where it is determined by hand; chain-200 shows it is not optimal.
GREEDY_CASES = [
    ("chain-none", chain(None), ("a", "b", "c"), 0.0, True),
    ("chain-200", chain(200), ("x", "c"), 3.0, True),
    ("chain-150", chain(150), ("x", "c"), 3.0, True),
    ("chain-0-infeasible", chain(0), ("x",), 6.0, False),
    ("diamond-60", diamond(60), ("x", "c"), 2.0, True),
    ("view-tie-break", view_pair(None), ("a",), 0.0, True),
    ("banned-80", banned(80), ("r",), 1.0, True),
    ("banned-50-infeasible", banned(50), ("r",), 1.0, False),
    ("force-save", chain(150, b={"force": Force.SAVE}), ("x", "b"), 4.0, True),
    ("force-recompute", chain(None, a={"force": Force.RECOMPUTE}), ("x", "b", "c"), 1.0, True),
]


def assert_valid(problem, solution):
    _, violations = needed_closure(problem, set(solution.saved))
    assert violations == [], violations
    order = [n.name for n in problem.nodes]
    assert list(solution.saved) == sorted(solution.saved, key=order.index)
    if solution.feasible and problem.budget_bytes is not None:
        assert saved_bytes(problem, solution.saved) <= problem.budget_bytes


@pytest.mark.parametrize("case", BUDGET_CASES, ids=[c[0] for c in BUDGET_CASES])
def test_budget_table(case):
    _, problem, saved, objective, feasible = case
    sol = BudgetSolver().solve(problem)
    assert (sol.saved, sol.objective, sol.feasible) == (saved, pytest.approx(objective), feasible)
    assert_valid(problem, sol)
    assert sol.lower_bound is not None and sol.lower_bound <= sol.objective + 1e-9
    assert any(n.startswith("MILP optimal") for n in sol.notes), sol.notes
    assert all(r.startswith("budget: ") for _, r in sol.reasons)
    assert {name for name, _ in sol.reasons} >= set(sol.saved)
    if not feasible:
        assert any("infeasible" in n for n in sol.notes)


@pytest.mark.parametrize("case", GREEDY_CASES, ids=[c[0] for c in GREEDY_CASES])
def test_greedy_table(case):
    _, problem, saved, objective, feasible = case
    sol = GreedySolver().solve(problem)
    assert (sol.saved, sol.objective, sol.feasible) == (saved, pytest.approx(objective), feasible)
    assert_valid(problem, sol)
    assert any("heuristic" in n for n in sol.notes)


def test_banned_node_never_recomputed():
    for solver in (BudgetSolver(), GreedySolver()):
        for budget in (None, 80, 50, 0):
            problem = banned(budget)
            recomputed, _ = needed_closure(problem, set(solver.solve(problem).saved))
            assert "r" not in recomputed


@pytest.mark.parametrize("solver", [BudgetSolver(), GreedySolver()], ids=lambda s: s.name)
def test_no_plan_raises(solver):
    problem = SolveProblem((node("x", 10, is_input=True),
                            node("t", 8, 1, ("x",), can_save=False, can_recompute=False,
                                 needed_by_backward=True, reason="tuple from a collective")))
    with pytest.raises(UnsupportedGraphError, match="t"):
        solver.solve(problem)


@pytest.mark.parametrize("solver", [BudgetSolver(), GreedySolver()], ids=lambda s: s.name)
def test_nothing_needed(solver):
    problem = SolveProblem((node("x", 10, is_input=True), node("a", 5, 1, ("x",))), budget_bytes=0)
    sol = solver.solve(problem)
    assert (sol.saved, sol.objective, sol.feasible) == ((), 0.0, True)


def test_registry_names():
    assert registry.get("budget").name == "budget"
    assert registry.get("greedy").name == "greedy"


def test_solvers_import_no_torch():
    root = pathlib.Path(budget_mod.__file__).parent
    for path in (root / "budget.py", root / "knapsack.py", root / "rules.py"):
        for stmt in ast.walk(ast.parse(path.read_text())):
            if isinstance(stmt, ast.Import):
                assert not any(a.name.split(".")[0] == "torch" for a in stmt.names), path
            elif isinstance(stmt, ast.ImportFrom):
                assert (stmt.module or "").split(".")[0] != "torch", path


# --- fallbacks ------------------------------------------------------------------------------


def test_too_large_falls_back_to_greedy():
    problem = chain(150)
    sol = BudgetSolver(max_nodes=2).solve(problem)
    assert any("exceed max_nodes=2" in n for n in sol.notes)
    assert (sol.saved, sol.feasible, sol.lower_bound) == (("x", "c"), True, None)


def test_no_incumbent_falls_back_to_greedy(monkeypatch):
    real = budget_mod._run

    def no_incumbent(model, objective, target, seconds, **kw):
        res = real(model, objective, target, seconds, **kw)
        if kw.get("integral", True):
            res.x, res.status, res.message = None, 1, "Time limit reached. (fake)"
        return res

    monkeypatch.setattr(budget_mod, "_run", no_incumbent)
    problem = chain(200)
    sol = BudgetSolver().solve(problem)
    assert any("found no plan" in n for n in sol.notes) and any("heuristic" in n for n in sol.notes)
    assert (sol.saved, sol.feasible) == (("x", "c"), True)


def test_invalid_incumbent_is_repaired_or_replaced(monkeypatch):
    real = budget_mod._run

    def broken(model, objective, target, seconds, **kw):
        res = real(model, objective, target, seconds, **kw)
        if kw.get("integral", True):
            res.x = res.x * 0.0  # saves nothing: the backward's reads become uncomputable
        return res

    monkeypatch.setattr(budget_mod, "_run", broken)
    sol = BudgetSolver().solve(chain(200))
    assert any("failed repair" in n for n in sol.notes)
    assert_valid(chain(200), sol)


def test_time_limit_reports_gap_and_dual_bound(monkeypatch):
    real = budget_mod._run

    def stopped(model, objective, target, seconds, **kw):
        res = real(model, objective, target, seconds, **kw)
        if kw.get("integral", True):
            res.status, res.mip_gap, res.mip_dual_bound = 1, 0.25, res.fun
        return res

    monkeypatch.setattr(budget_mod, "_run", stopped)
    sol = BudgetSolver().solve(chain(200))
    assert "MILP time limit: gap 25%" in sol.notes
    assert sol.lower_bound == pytest.approx(2.0, rel=1e-4)


def test_large_sizes_and_small_costs():
    """MiB-sized tensors and microsecond costs: the scaling keeps the MILP exact and valid."""
    rng = random.Random(0)
    nodes = [node(f"p{i}", rng.randint(1, 64) << 20, is_input=True) for i in range(4)]
    for i in range(300):
        ins = rng.sample([n.name for n in nodes], k=min(len(nodes), rng.randint(1, 2)))
        nodes.append(node(f"n{i}", rng.randint(1, 64) << 20, rng.uniform(1e-7, 1e-4), ins,
                          needed_by_backward=rng.random() < 0.4,
                          can_recompute=rng.random() > 0.05))
    base = SolveProblem(tuple(nodes))
    full = saved_bytes(base, BudgetSolver().solve(base).saved)
    for frac in (0.7, 0.4, 0.2):
        problem = dataclasses.replace(base, budget_bytes=int(full * frac))
        exact, greedy = BudgetSolver().solve(problem), GreedySolver().solve(problem)
        for sol in (exact, greedy):
            assert_valid(problem, sol)
        assert exact.feasible == greedy.feasible
        assert penalised_cost(problem, exact.saved) <= penalised_cost(problem, greedy.saved) + 1e-12
        assert exact.lower_bound <= exact.objective


# --- recompute_expensive binds every solver ---------------------------------------------------


def heavy_chain(budget=None, **overrides):
    """x -> mm (expensive, 100 B) -> act (10 B) -> out; the backward reads mm and act."""
    nodes = [node("x", 50, is_input=True),
             node("mm", 100, 8, ("x",), needed_by_backward=True, expensive=True),
             node("act", 10, 1, ("mm",), needed_by_backward=True),
             node("out", 10, 1, ("act",))]
    nodes = [dataclasses.replace(n, **overrides.get(n.name, {})) for n in nodes]
    return SolveProblem(tuple(nodes), budget_bytes=budget)


SOLVERS = [BudgetSolver, GreedySolver]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
def test_expensive_nodes_are_kept_like_the_mincut_keeps_them(solver):
    """recompute_expensive=False: the mm is never recomputed; a budget that needs it is
    infeasible, the closest plan is the min-cut's, and the notes say what True allows."""
    from ckptfx.solvers.mincut import MinCutSolver

    problem = heavy_chain(50)
    sol = solver(recompute_expensive=False).solve(problem)
    assert_valid(problem, sol)
    assert "mm" not in needed_closure(problem, set(sol.saved))[0]
    assert not sol.feasible
    assert sol.saved == MinCutSolver().solve(problem).saved == ("mm",)
    assert any(n.startswith("recompute_expensive=True would allow down to 50 B (meets the "
                            "budget), by recomputing compute-bound ops such as mm")
               for n in sol.notes), sol.notes
    allowed = solver(recompute_expensive=True).solve(problem)
    assert (allowed.saved, allowed.feasible) == (("x",), True)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
@pytest.mark.parametrize("vote", [{"force": Force.RECOMPUTE}, {"prefer": -1.0}],
                         ids=["must-recompute", "prefer-recompute"])
def test_a_recompute_vote_lets_an_expensive_node_be_recomputed(solver, vote):
    from ckptfx.solvers.mincut import MinCutSolver

    problem = heavy_chain(50, mm=vote)
    sol = solver(recompute_expensive=False).solve(problem)
    assert (sol.saved, sol.feasible) == (("x",), True)
    assert MinCutSolver().solve(problem).saved == ("x",)


# --- time limits ----------------------------------------------------------------------------


def ladder(rungs, time_limit_s, budget_share=0.25):
    """A ladder of ``rungs`` rungs (2 nodes each): a_i = f(b_{i-1}), b_i = g(a_i, b_{i-1});
    the backward reads every a_i and every other b_i; sizes and costs vary by rung."""
    nodes, prev = [node("x", 1000, is_input=True)], "x"
    for i in range(rungs):
        a = node(f"a{i}", 1000 + (i * 37) % 500, 1e-3 * (1 + (i * 13) % 7), (prev,),
                 needed_by_backward=True)
        b = node(f"b{i}", 500 + (i * 53) % 700, 1e-4 * (1 + (i * 11) % 5), (a.name, prev),
                 needed_by_backward=i % 2 == 0)
        nodes += [a, b]
        prev = b.name
    total = sum(n.nbytes for n in nodes)
    return SolveProblem(tuple(nodes), budget_bytes=int(total * budget_share),
                        time_limit_s=time_limit_s)


def _elapsed(solver, problem):
    import time

    start = time.monotonic()
    sol = solver.solve(problem)
    return time.monotonic() - start, sol


@pytest.mark.parametrize("solver, limits", [
    (BudgetSolver(), (0.2, 2.0)),  # the greedy (no time for the MILP); the MILP
    (GreedySolver(), (0.02,)),
], ids=["budget", "greedy"])
def test_time_limit_is_kept(solver, limits):
    """A contract, not a benchmark: every step of a solve shares ``time_limit_s``, so a
    2,001-node ladder is planned within the limit plus a second, validly and within budget
    (Note [Keeping the time limit] in ckptfx/solvers/budget.py)."""
    BudgetSolver().solve(ladder(5, 1.0))  # imports (networkx, scipy) before any timing
    for limit in limits:
        problem = ladder(1000, limit)
        elapsed, sol = _elapsed(solver, problem)
        assert elapsed <= limit + 1.0, (elapsed, sol.notes)
        assert_valid(problem, sol)
        assert sol.feasible


def test_uniform_keeps_the_time_limit_through_its_inner_solver():
    from ckptfx.solvers.uniform import UniformSolver

    base = ladder(500, 0.3)
    layers = tuple((f"a{i}", f"b{i}") for i in range(500))
    BudgetSolver().solve(ladder(5, 1.0))
    inners = []
    for budget in (base.budget_bytes, 0):  # the min-cut meets the first; the MILP the second
        problem = dataclasses.replace(base, layers=layers, budget_bytes=budget)
        elapsed, sol = _elapsed(UniformSolver(layers_per_checkpoint=10), problem)
        assert elapsed <= problem.time_limit_s + 1.0, (elapsed, sol.notes)
        assert_valid(problem, sol)
        inners.append(sol.notes[0].rsplit("; ", 1)[1])
    assert inners == ["mincut planned the rest", "budget planned the rest"]


def test_a_stopped_greedy_returns_a_valid_plan_within_budget_and_says_so():
    problem = ladder(200, 1e-6)
    sol = GreedySolver().solve(problem)
    assert_valid(problem, sol)
    assert sol.feasible
    assert any(n.startswith("time limit: the greedy search stopped") for n in sol.notes)
    roomy = GreedySolver().solve(dataclasses.replace(problem, time_limit_s=10.0))
    assert not any(n.startswith("time limit") for n in roomy.notes)
    assert penalised_cost(problem, roomy.saved) <= penalised_cost(problem, sol.saved)


def test_no_milp_without_time_for_it():
    sol = BudgetSolver().solve(ladder(200, 1e-6))
    assert any("does not fit the time left" in n for n in sol.notes)
    assert any(n.startswith("time limit: stopped") for n in sol.notes)
    assert_valid(ladder(200, 1e-6), sol)
