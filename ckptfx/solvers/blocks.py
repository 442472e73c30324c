"""One repeated block as a problem of its own, and the Pareto set of its plans.

Nothing here imports torch. Rockmate (Zhao et al., ICML 2023) solves each distinct block of
a chain exactly on the block's own small graph, then chooses one of those plans per block
along the chain; this module is the first half (the second is :mod:`ckptfx.solvers.chain`).

Call tree::

    block_problem(problem, block, needed)   the block's SolveProblem
    block_options(local, ...)               its Pareto set: (saved bytes, recompute cost)
    ├── MinCutSolver                         the no-budget plan (option "keep")
    └── BudgetSolver at saved-bytes bounds   exact least recompute per bound (HiGHS)

Note [Block problems]
    A block's problem holds its forward nodes and, as inputs (``is_input``: never
    recomputed, kept at their bytes when the block's backward reads them), the values it
    reads from outside: the previous block's output, parameters (0 bytes: resident), values
    shared between blocks. A node is ``needed_by_backward`` when the *block's own* backward
    reads it (the caller says which: backward nodes are attributed to blocks by the forward
    values they read); a value only the next block's backward reads is that block's
    business. The block's saved bytes are what its plan keeps, its inputs included: the
    bytes a block holds from its forward until its backward, counted at the block that
    reads them.
"""

from __future__ import annotations

import dataclasses

from ckptfx.solvers.base import (
    ProblemNode,
    SolveProblem,
    Solution,
    needed_closure,
    recompute_cost,
    saved_bytes,
)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """One plan of a block's problem.

    Attributes:
        saved: names the plan saves (the block's nodes and inputs).
        saved_bytes: bytes kept from the block's forward to its backward.
        cost: recompute cost, cost-model seconds.
        recomputed_bytes: bytes of the block's values its backward recomputes (views
            excluded): a measure of the recompute working set.
    """

    saved: frozenset[str]
    saved_bytes: int
    cost: float
    recomputed_bytes: int


def block_problem(problem: SolveProblem, block: tuple[str, ...], needed: set[str],
                  natives: tuple[str, ...] = ()) -> SolveProblem:
    """The SolveProblem of one block (Note [Block problems]).

    Args:
        problem: the whole graph's problem.
        block: the block's node names (``problem.layers[i]``).
        needed: the names the block's own backward reads.
        natives: the backward-native nodes (``in_forward=False``) that belong to the block;
            they keep their own ``needed_by_backward``.

    Returns:
        A problem over the block's nodes and its inputs, no budget, no layers.
    """
    by_name = problem.by_name()
    inside = set(block) | set(natives)
    outside: dict[str, None] = {}
    for name in (*block, *natives):
        outside.update((i, None) for i in by_name[name].inputs if i not in inside)
    nodes = [ProblemNode(name=e, nbytes=by_name[e].nbytes, recompute_cost=0.0, is_input=True,
                         needed_by_backward=e in needed, can_save=True, reason="block input")
             for e in outside]
    order = [n.name for n in problem.nodes if n.name in inside]
    nodes += [dataclasses.replace(by_name[n], needed_by_backward=n in needed or (
                                      n in natives and by_name[n].needed_by_backward),
                                  inputs=tuple(i for i in by_name[n].inputs
                                               if i in inside or i in outside))
              for n in order]
    return SolveProblem(nodes=tuple(nodes), time_limit_s=problem.time_limit_s)


def describe_plan(local: SolveProblem, saved: tuple[str, ...]) -> BlockPlan:
    """The BlockPlan of a valid saved set of ``local``."""
    by_name = local.by_name()
    recomputed, _ = needed_closure(local, set(saved))
    rec_bytes = sum(by_name[r].nbytes for r in recomputed
                    if by_name[r].in_forward and not by_name[r].storage_owner)
    return BlockPlan(frozenset(saved), saved_bytes(local, saved), recompute_cost(local, saved),
                     rec_bytes)


def block_options(local: SolveProblem, recompute_expensive: bool, bounds: int = 4,
                  budget_recompute_expensive: bool = True) -> tuple[BlockPlan, ...]:
    """The Pareto set of a block's plans: fewer bytes kept, or less recompute.

    The no-budget min-cut plan (``recompute_expensive`` as configured) and the budget
    solver's least-recompute plans at ``bounds`` saved-bytes bounds evenly spaced from the
    least bytes (0) to the min-cut plan's bytes; dominated plans and duplicates dropped.

    Args:
        local: a block's problem (:func:`block_problem`).
        recompute_expensive: the min-cut's option.
        bounds: how many saved-bytes bounds the budget solver is run at.
        budget_recompute_expensive: the budget solver's option (Note [Recomputing expensive
            ops] in ckptfx/config.py).

    Returns:
        BlockPlans by increasing saved bytes (so by decreasing cost).
    """
    from ckptfx.solvers.budget import BudgetSolver
    from ckptfx.solvers.mincut import MinCutSolver

    keep = MinCutSolver(recompute_expensive=recompute_expensive).solve(local)
    plans = [describe_plan(local, keep.saved)]
    top = plans[0].saved_bytes
    for k in range(bounds):
        bound = top * k // bounds
        sub = dataclasses.replace(local, budget_bytes=bound, budget_kind="saved")
        solution: Solution = BudgetSolver(
            recompute_expensive=budget_recompute_expensive).solve(sub)
        plans.append(describe_plan(local, solution.saved))
    plans.sort(key=lambda p: (p.saved_bytes, p.cost, sorted(p.saved)))
    front: list[BlockPlan] = []
    for plan in plans:
        if not front or plan.cost < front[-1].cost:
            front.append(plan)
    return tuple(front)
