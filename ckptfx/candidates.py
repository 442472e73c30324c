"""Candidate plans of the peak search: a Solution applied, simulated and priced.

A search stage's building block (above plan, apply and simulate; below the searches of
:mod:`ckptfx.peak_budget` and :mod:`ckptfx.peak_chain`, which both evaluate candidates).
"""

from __future__ import annotations

import dataclasses
import logging

from ckptfx import _torch_compat as compat
from ckptfx.analysis.sizes import SizeHints
from ckptfx.memory import MemoryTimeline, _Memo, missing_vals, simulate, simulate_views
from ckptfx.passes.emitted import EmittedLayout
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


class Simulator:
    """Simulates the candidate plans of one joint graph.

    From the node orders the rewrite would emit (Note [Emitted graphs without building
    them] in :mod:`ckptfx.passes.emitted`), which costs no fx graph; where those rules do not
    cover the graph, by rewriting (the emitted graphs themselves). Either way the timeline
    is the one :func:`ckptfx.memory.simulate` gives for the emitted graphs.

    Args:
        joint: the JointGraph (unchanged while the simulator is used).
        emitted: False to always rewrite (what the checks of the fast path compare with).
    """

    def __init__(self, joint, emitted: bool = True) -> None:
        self.joint = joint
        self.layout = EmittedLayout(joint) if emitted else None
        self._memos: dict[int, tuple[object, _Memo]] = {}
        self.rewrites = 0  # candidates that needed the rewrite
        self._last: tuple[tuple[str, ...] | None, object] = (None, None)

    def _views(self, saved: tuple[str, ...]):
        if self.layout is None:
            return None
        if self._last[0] != saved:
            self._last = (saved, self.layout.views(saved))
        return self._last[1]

    def unread(self, plan) -> frozenset[str]:
        """The saved tensors of ``plan`` that its backward never reads: the extractor does
        not save them (a plan listing them fails verification). Empty when unknown."""
        views = self._views(plan.saved)
        if views is None:
            return frozenset()
        return frozenset(s for s in plan.saved if s not in views.saved
                         and not compat.is_sym_node(self.layout.by_name[s]))

    def timeline(self, plan) -> MemoryTimeline | None:
        """The simulated timeline of ``plan`` under its size hints, or None when a node
        lacks ``meta["val"]`` (unknown, never a number).

        Raises:
            UnsupportedGraphError: the emitted graphs do not pair up (a rewrite bug).
        """
        views = self._views(plan.saved)
        if views is None:
            self.rewrites += 1
            with compat.lazy_graph_modules():  # simulated, never run: no code generation
                fw, bw = rewrite(self.joint, plan)
            missing = missing_vals(fw) + missing_vals(bw)
            if missing:
                log.debug("ckptfx: peak search: no prediction (nodes without meta['val']: "
                          "%s)", missing[:5])
                return None
            return simulate(fw, bw, plan.hints)
        missing = [n.name for n in views.forward.nodes + views.backward.nodes
                   if n in self.layout.no_val]
        if missing:
            log.debug("ckptfx: peak search: no prediction (nodes without meta['val']: %s)",
                      missing[:5])
            return None
        hints = plan.hints if plan.hints is not None else \
            SizeHints.from_graphs(self.joint.graph)
        held, memo = self._memos.get(id(hints), (None, None))
        if held is not hints:
            memo = _Memo()
            self._memos[id(hints)] = (hints, memo)
        return simulate_views(views.forward, views.backward, list(views.user), views.saved,
                              hints, memo=memo)


def evaluate(simulator: Simulator, problem: SolveProblem, solution: Solution, to_plan,
             bound: int | None = None) -> Candidate:
    """Applies ``solution`` (``to_plan(problem, solution)``), simulates one step under the
    plan's size hints and prices it. Saved values the backward would not read are dropped
    from the solution first (:meth:`Simulator.unread`).

    Raises:
        UnsupportedGraphError: the emitted graphs do not pair up (a rewrite bug).
    """
    plan = to_plan(problem, solution)
    unread = simulator.unread(plan)
    if unread:  # composed plans (a block's plan moved to another block) may list some
        # the plan's names: views already replaced by the storages they live in
        solution = dataclasses.replace(
            solution, saved=tuple(s for s in plan.saved if s not in unread))
        plan = to_plan(problem, solution)
        if simulator.unread(plan):  # not a plan the rewrite would accept: never chosen
            log.debug("ckptfx: peak search: a candidate saves values its backward never reads")
            return Candidate(saved_bytes(problem, solution.saved) if bound is None else bound,
                             solution, None, recompute_cost(problem, solution.saved), plan.saved)
    timeline = simulator.timeline(plan)
    return Candidate(saved_bytes(problem, solution.saved) if bound is None else bound,
                     solution, timeline.peak_bytes if timeline else None,
                     recompute_cost(problem, solution.saved), plan.saved, timeline)
