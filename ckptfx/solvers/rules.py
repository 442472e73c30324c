"""Rules every budget solver shares: what a plan may save or compute in the backward, what
that costs, the least-bytes plan, ``recompute_expensive``, and the time limit's clock.

Used by the greedy (:mod:`ckptfx.solvers.knapsack`) and the MILP
(:mod:`ckptfx.solvers.budget`) alike, so both read a problem the same way.

Note [recompute_expensive binds every solver]
    ``RematConfig.recompute_expensive=False`` means no plan recomputes a compute-bound
    (``expensive``) forward node, whatever the solver: the min-cut ties such a node to the
    source (``ckptfx.solvers.mincut._source_reason``), and the budget solvers see it as
    ``can_recompute=False`` (:func:`bind_expensive`), with the same exceptions: a MUST_ or
    PREFER_RECOMPUTE vote (``force is RECOMPUTE`` or ``prefer < 0``) lets it be recomputed.
    The least bytes a bound problem reaches is then the min-cut's without
    ``recompute_expensive``; a budget below it is infeasible, and the notes say how far
    ``recompute_expensive=True`` would go (:func:`expensive_note`).

Note [Preference penalties]
    ``ProblemNode.prefer`` is priced as in the MILP of :mod:`ckptfx.solvers.budget`:
    ``prefer > 0`` adds ``prefer`` when the node is computed in the backward, ``prefer < 0``
    adds ``|prefer|`` when it is saved. ``penalised_cost`` is the recompute cost plus these
    penalties; ``Solution.objective`` reports the plain recompute cost.
"""

from __future__ import annotations

import dataclasses
import functools
import time

from ckptfx.solvers.base import Force, ProblemNode, SolveProblem, needed_closure, saved_bytes

EXPENSIVE_REASON = "compute-intensive op (recompute_expensive=False; True allows recomputing it)"


class Clock:
    """A wall-clock deadline shared by the steps of one solve, and whether a step hit it.

    Args:
        seconds: seconds from now (``time.monotonic``).
    """

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.hit = False

    def left(self) -> float:
        """Seconds to the deadline (negative past it)."""
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        """Whether the deadline has passed; remembers that a step stopped at it."""
        if time.monotonic() >= self.deadline:
            self.hit = True
        return self.hit


def keeps_expensive(node: ProblemNode, recompute_expensive: bool) -> bool:
    """Whether ``recompute_expensive`` forbids recomputing ``node`` (the min-cut's rule:
    a compute-bound forward node, with no MUST_ or PREFER_RECOMPUTE vote)."""
    return (node.in_forward and node.expensive and not recompute_expensive
            and node.can_recompute and node.force != Force.RECOMPUTE and node.prefer >= 0)


def bind_expensive(problem: SolveProblem, recompute_expensive: bool) -> SolveProblem:
    """The problem with compute-bound nodes made unrecomputable unless ``recompute_expensive``
    (Note [recompute_expensive binds every solver]); ``problem`` itself when nothing changes.
    """
    if recompute_expensive or not any(keeps_expensive(n, False) for n in problem.nodes):
        return problem
    nodes = tuple(dataclasses.replace(n, can_recompute=False, reason=n.reason or EXPENSIVE_REASON)
                  if keeps_expensive(n, False) else n for n in problem.nodes)
    return dataclasses.replace(problem, nodes=nodes)


def expensive_note(free: SolveProblem, bound: SolveProblem, budget: int) -> str:
    """What ``recompute_expensive=True`` would allow when the bound problem cannot meet
    ``budget`` (bytes); "" when it would not help.

    Args:
        free: the problem as given (expensive nodes recomputable).
        bound: :func:`bind_expensive` of it.
        budget: the saved-bytes budget (bytes).
    """
    if free is bound:
        return ""
    floor = least_bytes_plan(free)
    floor_bytes = saved_bytes(free, floor)
    if floor_bytes >= saved_bytes(bound, least_bytes_plan(bound)):
        return ""
    recomputed, _ = needed_closure(free, set(floor))
    nodes = free.by_name()
    heavy = sorted(r for r in recomputed if keeps_expensive(nodes[r], False))
    fits = "meets the budget" if floor_bytes <= budget else "comes closer"
    return (f"recompute_expensive=True would allow down to {floor_bytes} B ({fits}), by "
            f"recomputing compute-bound ops such as {', '.join(heavy[:3])}")


def can_be_saved(node: ProblemNode) -> bool:
    """Whether a plan may save ``node`` (the min-cut's and the MILP's rule)."""
    return node.can_save and node.force != Force.RECOMPUTE


def can_run_in_backward(node: ProblemNode) -> bool:
    """Whether the backward may compute ``node`` (recompute it, or run it if backward-native)."""
    banned = node.in_forward and not node.can_recompute
    return not node.is_input and node.force != Force.SAVE and not banned


def backward_penalty(node: ProblemNode) -> float:
    """Cost (cost-model seconds) of computing ``node`` in the backward, preference included."""
    return (node.recompute_cost if node.in_forward else 0.0) + max(node.prefer, 0.0)


def save_penalty(node: ProblemNode) -> float:
    """Cost (cost-model seconds) of saving ``node``: its ``prefer < 0`` penalty, else 0."""
    return max(-node.prefer, 0.0)


def least_bytes_plan(problem: SolveProblem) -> tuple[str, ...]:
    """The valid plan of fewest saved bytes (exact: min-cut with preferences removed).

    Among plans of equal bytes the min-cut's tie-break applies (Note [Min-cut tie-breaking]).
    It depends on the nodes alone, so it is computed once per node set: a peak search solves
    the same nodes under a dozen budgets.

    Raises:
        UnsupportedGraphError: no valid plan exists; the message is the offending path.
    """
    return _least_bytes(problem.nodes)


@functools.lru_cache(maxsize=4)
def _least_bytes(nodes: tuple[ProblemNode, ...]) -> tuple[str, ...]:
    from ckptfx.solvers.mincut import MinCutSolver

    plain = SolveProblem(tuple(dataclasses.replace(n, prefer=0.0) for n in nodes))
    return MinCutSolver(recompute_expensive=True).solve(plain).saved
