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
from ckptfx.candidates import Candidate, Simulator, evaluate
from ckptfx.peak_chain import chain_candidates, layerwise_candidates
from ckptfx.planner import Planned, Prepared, finish, mincut_saved
from ckptfx.solvers.base import SolveProblem, Solution, saved_bytes

log = logging.getLogger("ckptfx")

SWEEP = 8  # evenly spaced saved-bytes bounds between the least and the no-budget plan's


@dataclasses.dataclass(frozen=True)
class PeakCandidates:
    """The simulated candidates of one graph and options: what every peak budget chooses
    from (the same set whatever the budget; Note [Peak search paths]).

    Attributes:
        seen: every candidate, the no-budget plan first.
        notes: what the search ran (path, model error), for the plan's notes.
        solver: the registry name of the solver the plans are reported under.
        elapsed_s: seconds spent finding and simulating them.
    """

    seen: tuple[Candidate, ...]
    notes: tuple[str, ...]
    solver: str
    elapsed_s: float

    @property
    def anchor(self) -> Candidate:
        """The no-budget plan."""
        return self.seen[0]


def peak_candidates(joint: JointGraph, prep: Prepared) -> PeakCandidates:
    """Finds and simulates the candidates of a peak budget (its value is not used).

    Raises:
        UnsupportedGraphError: no candidate's peak could be simulated.
    """
    name, solver = prep.solver()
    problem = prep.problem
    start = time.perf_counter()
    default = Solution(mincut_saved(problem, prep.config.mincut_recompute_expensive))

    def to_plan(p, s):
        return prep.to_plan(p, s, name, detail=False)  # simulated; finish() reports

    config = prep.config
    # the user chose no solver or policy, and allows checkpointed blocks' recomputed matmuls
    chain = name == "budget" and config.solver == "auto" and config.budget_recompute_expensive
    deadline = time.monotonic() + problem.time_limit_s
    simulator = Simulator(joint)
    anchor = evaluate(simulator, problem, default, to_plan)
    if chain and len(problem.layers) >= 2 and anchor.peak is not None:
        seen, notes = chain_candidates(simulator, problem, anchor, to_plan,
                                       config.mincut_recompute_expensive, deadline)
    else:
        seen = [anchor] + _sweep(simulator, problem, solver, default, to_plan, deadline,
                                 layerwise=config.budget_recompute_expensive)
        notes = ()
    if all(c.peak is None for c in seen):
        raise UnsupportedGraphError(
            "budget_kind='peak': no candidate plan's peak could be simulated (nodes without "
            "meta['val']); trace with fake tensors, or use budget_kind='saved'")
    return PeakCandidates(tuple(seen), tuple(notes), name, time.perf_counter() - start)


def plan_for_peak(joint: JointGraph, prep: Prepared,
                  candidates: PeakCandidates | None = None) -> Planned:
    """Plans for ``memory_budget`` bounding the simulated peak (``budget_kind="peak"``).

    Args:
        joint: the JointGraph.
        prep: the preparation (its config has the budget).
        candidates: :func:`peak_candidates` of the same graph and options, to reuse across
            budgets (a frontier); found here when None.

    Raises:
        InfeasibleBudgetError: ``strict=True`` and no candidate's peak fits.
        UnsupportedGraphError: no candidate's peak could be simulated.
    """
    start = time.perf_counter()
    if candidates is None:
        candidates = peak_candidates(joint, prep)
    solution, peak, target = choose(candidates, prep.config.memory_budget)
    problem = dataclasses.replace(prep.problem, budget_bytes=target)
    elapsed = time.perf_counter() - start
    return finish(prep, problem, solution, candidates.solver, elapsed, peak)


def choose(candidates: PeakCandidates, budget) -> tuple[Solution, int, int]:
    """The cheapest candidate whose simulated peak fits the budget (Note [Peak search paths]).

    Args:
        candidates: the graph's PeakCandidates.
        budget: a MemoryBudget: bytes of peak, or a fraction on the scale least peak found
            (0) .. the no-budget plan's peak (1) (Note [Budget fractions]).

    Returns:
        (solution, its simulated peak in bytes, the peak budget in bytes): the no-budget plan
        when it fits; else the fitting candidate of least recompute cost; else the one of
        least peak, marked infeasible.
    """
    seen, anchor = candidates.seen, candidates.anchor
    known = [c.peak for c in seen if c.peak is not None]
    least_peak = min(known)
    anchor_peak = anchor.peak if anchor.peak is not None else max(known)
    target = budget.resolve(least_peak, max(anchor_peak, least_peak))
    if anchor.fits(target):  # at or above 1.0: the no-budget plan itself
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
                                   notes=best.solution.notes + candidates.notes + (note,))
    return solution, best.peak, target


def _evaluate(simulator, problem: SolveProblem, solver, bound: int, to_plan,
              deadline: float | None = None) -> Candidate:
    limit = problem.time_limit_s if deadline is None else max(0.5, deadline - time.monotonic())
    sub = dataclasses.replace(problem, budget_bytes=bound, budget_kind="saved",
                              time_limit_s=min(problem.time_limit_s, limit))
    return evaluate(simulator, sub, solver.solve(sub), to_plan, bound)


def _sweep(simulator, problem: SolveProblem, solver, default: Solution, to_plan,
           deadline: float, layerwise: bool = True) -> list[Candidate]:
    """The saved-bytes sweep: the budget solver's plans for SWEEP + 1 bounds from the least
    bytes to the no-budget plan's bytes, plus the layer-wise plans unless ``layerwise`` is
    False (``recompute_expensive=False``: they recompute every block's matmuls)."""
    low = _evaluate(simulator, problem, solver, 0, to_plan, deadline)
    least = saved_bytes(problem, low.solution.saved)
    top = max(least, saved_bytes(problem, default.saved))
    seen = [low]
    for i in range(1, SWEEP + 1):
        if time.monotonic() > deadline:
            break
        seen.append(_evaluate(simulator, problem, solver, least + (top - least) * i // SWEEP,
                              to_plan, deadline))
    return seen + [evaluate(simulator, problem, sol, to_plan)
                   for sol in (layerwise_candidates(problem) if layerwise else ())]
