"""Candidate plans of the peak search: a Solution applied, simulated and priced.

A search stage's building block (above plan, apply and simulate; below the searches of
:mod:`ckptfx.peak_budget` and :mod:`ckptfx.peak_chain`, which both evaluate candidates).
"""

from __future__ import annotations

import dataclasses
import logging

from ckptfx import _torch_compat as compat
from ckptfx.memory import MemoryTimeline, missing_vals, simulate
from ckptfx.passes.rewrite import rewrite
from ckptfx.solvers.base import SolveProblem, Solution, recompute_cost, saved_bytes

log = logging.getLogger("ckptfx")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One evaluated plan.

    Attributes:
        bound: the saved-bytes bound it was solved for, or its own saved bytes (bytes).
        solution: the Solution.
        peak: the simulated peak of the step, bytes; None when the simulation could not
            predict it (unknown, never a number).
        cost: recompute cost, cost-model seconds.
        saved: the plan's saved names (views replaced by their storages' owners).
        timeline: the simulated MemoryTimeline (None when unknown).
    """

    bound: int
    solution: Solution
    peak: int | None
    cost: float
    saved: tuple[str, ...] = ()
    timeline: MemoryTimeline | None = None

    def fits(self, target: int) -> bool:
        """Whether the simulated peak is known and at most ``target`` bytes."""
        return self.peak is not None and self.peak <= target


def evaluate(joint, problem: SolveProblem, solution: Solution, to_plan,
             bound: int | None = None) -> Candidate:
    """Applies ``solution`` (``to_plan(problem, solution)``), simulates one step under the
    plan's size hints and prices it.

    Raises:
        UnsupportedGraphError: the emitted graphs do not pair up (a rewrite bug).
    """
    plan = to_plan(problem, solution)
    with compat.lazy_graph_modules():  # simulated, never run: no code generation
        fw, bw = rewrite(joint, plan)
    missing = missing_vals(fw) + missing_vals(bw)
    timeline = None if missing else simulate(fw, bw, plan.hints)
    if missing:
        log.debug("ckptfx: peak search: no prediction (nodes without meta['val']: %s)",
                  missing[:5])
    return Candidate(saved_bytes(problem, solution.saved) if bound is None else bound,
                     solution, timeline.peak_bytes if timeline else None,
                     recompute_cost(problem, solution.saved), plan.saved, timeline)
