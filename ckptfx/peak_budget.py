"""Peak budgets (``budget_kind="peak"``): the least recompute whose simulated step peak fits.

A search stage: it composes the stages below it (solve and plan, :mod:`ckptfx.planner`;
apply, :mod:`ckptfx.passes.rewrite`; simulate, :mod:`ckptfx.memory`) and none of them calls
it; :func:`ckptfx.pipeline.plan` calls it for ``budget_kind="peak"``.

The budget solver is exact for a bound on *saved* bytes. A bound on the *peak* of the step
depends on the emitted graphs' schedule, so it is met by a search over saved-bytes bounds:

    1. Candidates: the budget solver's plans for SWEEP + 1 evenly spaced saved-bytes bounds
       s in [least saved bytes, no-recompute saved bytes], plus layer-wise plans (uniform,
       k = 1 and round(sqrt(n)), when the graph has repeated blocks); each is applied and
       its peak simulated (``ckptfx.memory``).
    2. P = the peak budget in bytes: absolute, or a fraction f on the scale least peak among
       the candidates (0) .. the no-budget min-cut plan's peak (1).
    3. Bisection between the largest bound whose plan fits P and the next bound that does
       not (more may be saved, so less recomputed).
    4. The answer is the feasible candidate with the least recompute cost; if none fits, the
       candidate with the least peak, reported infeasible.

The whole search keeps to ``time_limit_s``: the least-bytes plan, the no-budget plan and the
layer-wise plans are always simulated; the sweep and the bisection stop at the deadline (the
notes say how many plans were simulated).

A candidate whose peak the simulation cannot predict (a node without ``meta["val"]``) is
unknown, not 0 bytes: it is neither the least peak nor a fit; when no candidate has a known
peak the search raises (the partitioner's safety net then falls back).

The peak is not monotone in s in general (a larger saved set can shorten a recompute chain's
lifetime), which is why every candidate is simulated and the best feasible one is kept
rather than trusting the bisection's last step.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ckptfx.errors import UnsupportedGraphError
from ckptfx.joint import JointGraph
from ckptfx.memory import missing_vals, predict_peak
from ckptfx.passes.rewrite import rewrite
from ckptfx.planner import Planned, Prepared, finish, mincut_saved
from ckptfx.solvers.base import SolveProblem, Solution, recompute_cost, saved_bytes
from ckptfx.solvers.uniform import UniformSolver, default_k

log = logging.getLogger("ckptfx")

MAX_ROUNDS = 6
SWEEP = 6  # evenly spaced saved-bytes bounds simulated before refining


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One evaluated plan: its saved-bytes bound, solution, simulated peak and cost.

    ``peak`` is None when the simulation could not predict it (unknown, never a number).
    """

    bound: int
    solution: Solution
    peak: int | None
    cost: float

    def fits(self, target: int) -> bool:
        return self.peak is not None and self.peak <= target


def plan_for_peak(joint: JointGraph, prep: Prepared) -> Planned:
    """Plans for ``memory_budget`` bounding the simulated peak (``budget_kind="peak"``).

    Raises:
        InfeasibleBudgetError: ``strict=True`` and no candidate's peak fits.
        UnsupportedGraphError: no candidate's peak could be simulated.
    """
    name, solver = prep.solver()
    problem = prep.problem
    start = time.perf_counter()
    default = Solution(mincut_saved(problem, prep.config.recompute_expensive))

    def to_plan(p, s):
        return prep.to_plan(p, s, name)

    solution, peak, target = solve_for_peak(joint, problem, solver, prep.config.memory_budget,
                                            prep.full_bytes, to_plan, default)
    problem = dataclasses.replace(problem, budget_bytes=target)
    return finish(prep, problem, solution, name, time.perf_counter() - start, peak)


def _simulate(joint: JointGraph, plan) -> int | None:
    """The simulated peak of ``plan`` under its own size hints, or None (unknown)."""
    fw, bw = rewrite(joint, plan)
    peak = predict_peak(fw, bw, plan.hints)
    if peak is None:
        log.debug("ckptfx: peak search: no prediction (nodes without meta['val']: %s)",
                  (missing_vals(fw) + missing_vals(bw))[:5])
    return peak


def _evaluate(joint, problem: SolveProblem, solver, bound: int, to_plan,
              deadline: float | None = None) -> Candidate:
    limit = problem.time_limit_s if deadline is None else max(0.5, deadline - time.monotonic())
    sub = dataclasses.replace(problem, budget_bytes=bound, budget_kind="saved",
                              time_limit_s=min(problem.time_limit_s, limit))
    solution = solver.solve(sub)
    peak = _simulate(joint, to_plan(sub, solution))
    return Candidate(bound, solution, peak, recompute_cost(problem, solution.saved))


def solve_for_peak(joint, problem: SolveProblem, solver, budget, full_saved: int, to_plan,
                   default: Solution, extra: tuple[Solution, ...] = ()
                   ) -> tuple[Solution, int, int]:
    """Searches saved-bytes bounds for the cheapest plan whose simulated peak fits.

    Args:
        joint: the JointGraph.
        problem: the SolveProblem (its budget fields are ignored).
        solver: a saved-bytes solver (the budget solver).
        budget: a MemoryBudget: bytes of peak, or a fraction on the scale least peak found
            (0) .. the no-budget min-cut plan's peak (1) (Note [Budget fractions]).
        full_saved: bytes the no-recompute plan saves.
        to_plan: ``(problem, solution) -> RematPlan`` (the planner's converter; the plan
            carries the size hints the simulation uses).
        default: the no-budget plan (the 1.0 end of the fraction scale; also a candidate).
        extra: more candidate solutions to simulate (e.g. layer-wise plans).

    Returns:
        (solution, its simulated peak in bytes, the peak budget in bytes).

    Raises:
        UnsupportedGraphError: no candidate's peak could be simulated.
    """
    deadline = time.monotonic() + problem.time_limit_s
    low = _evaluate(joint, problem, solver, 0, to_plan, deadline)
    least = saved_bytes(problem, low.solution.saved)
    seen = [low]
    for i in range(1, SWEEP + 1):
        if time.monotonic() > deadline:
            break
        seen.append(_evaluate(joint, problem, solver, least + (full_saved - least) * i // SWEEP,
                              to_plan, deadline))
    anchor = _evaluate_solution(joint, problem, default, to_plan)
    seen += [anchor] + [_evaluate_solution(joint, problem, sol, to_plan)
                        for sol in tuple(extra) + layerwise_candidates(problem)]
    known = [c.peak for c in seen if c.peak is not None]
    if not known:
        raise UnsupportedGraphError(
            "budget_kind='peak': no candidate plan's peak could be simulated (nodes without "
            "meta['val']); trace with fake tensors, or use budget_kind='saved'")
    least_peak = min(known)
    anchor_peak = anchor.peak if anchor.peak is not None else max(known)
    target = budget.resolve(least_peak, max(anchor_peak, least_peak))
    seen += _refine(joint, problem, solver, to_plan, seen, target, deadline)
    feasible = [c for c in seen if c.fits(target)]
    if feasible:
        best = min(feasible, key=lambda c: (c.cost, c.peak))
        note = f"peak search: {len(seen)} plans simulated; peak {best.peak} B <= {target} B"
    else:
        best = min((c for c in seen if c.peak is not None), key=lambda c: (c.peak, c.cost))
        note = f"peak search: {len(seen)} plans simulated; least peak {best.peak} B > {target} B"
    solution = dataclasses.replace(best.solution, feasible=bool(feasible),
                                   notes=best.solution.notes + (note,))
    return solution, best.peak, target


def layerwise_candidates(problem: SolveProblem) -> tuple[Solution, ...]:
    """Uniform plans (Chen et al. 2016) for k = 1 and k = round(sqrt(n)) when the graph has
    repeated blocks: a saved-bytes bound alone never asks for block boundaries, yet saving
    them is what keeps a deep network's backward from rematerialising every block at once."""
    if len(problem.layers) < 2:
        return ()
    out = []
    for k in sorted({1, default_k(len(problem.layers))}):
        plain = dataclasses.replace(problem, budget_bytes=None, budget_kind="saved")
        out.append(UniformSolver(layers_per_checkpoint=k, inner="mincut").solve(plain))
    return tuple(out)


def _evaluate_solution(joint, problem, solution: Solution, to_plan) -> Candidate:
    peak = _simulate(joint, to_plan(problem, solution))
    return Candidate(saved_bytes(problem, solution.saved), solution, peak,
                     recompute_cost(problem, solution.saved))


def _refine(joint, problem, solver, to_plan, seen: list[Candidate], target: int,
            deadline: float) -> list[Candidate]:
    """Bisects between the largest bound that fits and the next larger one that does not."""
    bounds = sorted({c.bound for c in seen if c.bound is not None})
    fits = {c.bound: c.fits(target) for c in seen}
    lo = max((b for b in bounds if fits.get(b)), default=None)
    hi = min((b for b in bounds if lo is not None and b > lo and not fits.get(b)), default=None)
    found = []
    for _ in range(MAX_ROUNDS):
        if lo is None or hi is None or hi - lo <= max(1, hi // 100) or time.monotonic() > deadline:
            break
        mid = (lo + hi) // 2
        cand = _evaluate(joint, problem, solver, mid, to_plan, deadline)
        found.append(cand)
        lo, hi = (mid, hi) if cand.fits(target) else (lo, mid)
    return found
