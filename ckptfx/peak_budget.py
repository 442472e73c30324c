"""Peak budgets (``budget_kind="peak"``, the default): the least recompute whose simulated
step peak fits.

A search stage: it composes the stages below it (solve and plan, :mod:`ckptfx.planner`;
apply, :mod:`ckptfx.passes.rewrite`; simulate, :mod:`ckptfx.memory`, through
:mod:`ckptfx.candidates`) and none of them calls it; :func:`ckptfx.pipeline.plan` calls it
for a peak budget.

A bound on the *peak* of the step depends on the emitted graphs' schedule, so it is met by
simulating a fixed set of candidate plans and keeping the cheapest that fits:

    1. Candidates: with repeated blocks, the block chain's (:mod:`ckptfx.peak_chain`, Note
       [Peak search paths]); without, the budget solver's plans for SWEEP + 1 evenly spaced
       saved-bytes bounds from the least saved bytes to the no-budget plan's. The no-budget
       plan is always one. Each is applied and its peak simulated.
    2. P = the peak budget in bytes: absolute, or a fraction f on the scale least peak among
       the candidates (0) .. the no-budget plan's peak (1).
    3. If the no-budget plan fits P, it is the answer (a fraction of 1.0 is the no-budget
       plan exactly). Else the answer is the fitting candidate with the least recompute
       cost; if none fits, the candidate with the least peak, reported infeasible.

The candidates do not depend on the budget, so a smaller budget only excludes candidates:
its plan never has a higher simulated peak (``tests/test_peak_budget.py`` checks this as a
property). The search keeps to ``time_limit_s``: the no-budget plan and the layer-wise plans
are always simulated, the rest stop at the deadline (the notes say how many ran), which is
the one way the candidate set can depend on the machine.

A candidate whose peak the simulation cannot predict (a node without ``meta["val"]``) is
unknown, not 0 bytes: it is neither the least peak nor a fit; when no candidate has a known
peak the search raises (the partitioner's safety net then falls back).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ckptfx.errors import UnsupportedGraphError
from ckptfx.joint import JointGraph
from ckptfx.candidates import Candidate, evaluate
from ckptfx.peak_chain import chain_candidates, layerwise_candidates
from ckptfx.planner import Planned, Prepared, finish, mincut_saved
from ckptfx.solvers.base import SolveProblem, Solution, saved_bytes

log = logging.getLogger("ckptfx")

SWEEP = 8  # evenly spaced saved-bytes bounds between the least and the no-budget plan's


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

    config = prep.config
    chain = name == "budget" and config.solver == "auto"  # the user chose no solver or policy
    solution, peak, target = solve_for_peak(joint, problem, solver, config.memory_budget,
                                            prep.full_bytes, to_plan, default,
                                            recompute_expensive=config.recompute_expensive,
                                            chain=chain)
    problem = dataclasses.replace(problem, budget_bytes=target)
    return finish(prep, problem, solution, name, time.perf_counter() - start, peak)


def _evaluate(joint, problem: SolveProblem, solver, bound: int, to_plan,
              deadline: float | None = None) -> Candidate:
    limit = problem.time_limit_s if deadline is None else max(0.5, deadline - time.monotonic())
    sub = dataclasses.replace(problem, budget_bytes=bound, budget_kind="saved",
                              time_limit_s=min(problem.time_limit_s, limit))
    return evaluate(joint, sub, solver.solve(sub), to_plan, bound)


def solve_for_peak(joint, problem: SolveProblem, solver, budget, full_saved: int, to_plan,
                   default: Solution, extra: tuple[Solution, ...] = (),
                   recompute_expensive: bool = False, chain: bool = True
                   ) -> tuple[Solution, int, int]:
    """Finds the cheapest plan whose simulated peak fits (Note [Peak search paths]).

    Args:
        joint: the JointGraph.
        problem: the SolveProblem (its budget fields are ignored).
        solver: a saved-bytes solver (the budget solver) for the sweep.
        budget: a MemoryBudget: bytes of peak, or a fraction on the scale least peak found
            (0) .. the no-budget plan's peak (1) (Note [Budget fractions]).
        full_saved: bytes the no-recompute plan saves (unused by the block chain).
        to_plan: ``(problem, solution) -> RematPlan`` (the planner's converter; the plan
            carries the size hints the simulation uses).
        default: the no-budget plan (the 1.0 end of the fraction scale; also a candidate).
        extra: more candidate solutions to simulate (e.g. layer-wise plans).
        recompute_expensive: the inner min-cut's option for what blocks leave open.
        chain: plan repeated blocks with the block chain when the graph has them.

    Returns:
        (solution, its simulated peak in bytes, the peak budget in bytes).

    Raises:
        UnsupportedGraphError: no candidate's peak could be simulated.
    """
    deadline = time.monotonic() + problem.time_limit_s
    anchor = evaluate(joint, problem, default, to_plan)
    if chain and len(problem.layers) >= 2 and anchor.peak is not None:
        seen, notes = chain_candidates(joint, problem, anchor, to_plan, recompute_expensive,
                                       deadline)
    else:
        seen, notes = [anchor] + _sweep(joint, problem, solver, default, to_plan, deadline), ()
    seen += [evaluate(joint, problem, sol, to_plan) for sol in extra]
    known = [c.peak for c in seen if c.peak is not None]
    if not known:
        raise UnsupportedGraphError(
            "budget_kind='peak': no candidate plan's peak could be simulated (nodes without "
            "meta['val']); trace with fake tensors, or use budget_kind='saved'")
    least_peak = min(known)
    anchor_peak = anchor.peak if anchor.peak is not None else max(known)
    target = budget.resolve(least_peak, max(anchor_peak, least_peak))
    if anchor.fits(target):  # Note [Peak search paths]: at or above 1.0, the no-budget plan
        best, feasible = anchor, True
    else:
        fitting = [c for c in seen if c.fits(target)]
        feasible = bool(fitting)
        best = (min(fitting, key=lambda c: (c.cost, c.peak)) if fitting else
                min((c for c in seen if c.peak is not None), key=lambda c: (c.peak, c.cost)))
    relation = "<=" if feasible else ">"
    note = (f"peak search: {len(seen)} plans simulated; "
            f"{'peak' if feasible else 'least peak'} {best.peak} B {relation} {target} B")
    solution = dataclasses.replace(best.solution, feasible=feasible,
                                   notes=best.solution.notes + notes + (note,))
    return solution, best.peak, target


def _sweep(joint, problem: SolveProblem, solver, default: Solution, to_plan,
           deadline: float) -> list[Candidate]:
    """The saved-bytes sweep: the budget solver's plans for SWEEP + 1 bounds from the least
    bytes to the no-budget plan's bytes, plus the layer-wise plans."""
    low = _evaluate(joint, problem, solver, 0, to_plan, deadline)
    least = saved_bytes(problem, low.solution.saved)
    top = max(least, saved_bytes(problem, default.saved))
    seen = [low]
    for i in range(1, SWEEP + 1):
        if time.monotonic() > deadline:
            break
        seen.append(_evaluate(joint, problem, solver, least + (top - least) * i // SWEEP,
                              to_plan, deadline))
    return seen + [evaluate(joint, problem, sol, to_plan)
                   for sol in layerwise_candidates(problem)]
