"""Greedy solver: a fast heuristic for "least recompute cost with saved bytes <= budget".

Call tree::

    GreedySolver.solve(problem)
    ├── least_recompute_plan(problem)   start: save every needed node that may be saved
    ├── bind_expensive(problem, ...)    Note [recompute_expensive binds every solver]
    │                                   in ckptfx/solvers/rules.py
    ├── descend(problem, saved, budget) un-save best bytes-freed per added cost (lazy greedy)
    └── when the descent is stuck over budget (or stopped at the time limit):
        ├── least_bytes_plan(problem)   the exact least-bytes plan (min-cut, networkx)
        └── refill(problem, saved, budget)  save back best cost-saved per added byte

``penalised_cost``, ``prune_unused``, ``least_bytes_plan``, ``descend`` and ``describe``
are shared with the exact solver, :mod:`ckptfx.solvers.budget`.

Note [Greedy rematerialization heuristic]
    The greedy baselines of checkpointing (Chen et al. 2016, "Training deep nets with
    sublinear memory cost", which Checkmate, Jain et al. MLSys 2020, compares its MILP
    against) and PyTorch's ``torch/_functorch/_activation_checkpointing/knapsack.py``
    (``greedy_knapsack``: rank items by runtime per byte, keep the best while memory lasts).
    Here the items are not independent: un-saving ``v`` forces its unavailable producers to
    be saved (or, if they may not be, computed in turn), so a move is priced from the
    current plan: ``bytes_freed = nbytes(v) - nbytes(new saves)``, ``added_cost`` = cost
    and penalties of what becomes recomputed. Free moves (bytes freed at no added cost)
    are always taken; costly ones only while over budget, best ratio first. Moves keep
    the plan valid by construction and strictly lower saved bytes, so the descent ends.
    Moves are kept in a heap and re-priced when popped (lazy greedy); a move re-enters
    when a change reaches its walk; each search stops after 50 pricings per node, or at the
    time limit (a :class:`Clock`): the descent then hands over to the refill of the
    least-bytes plan, which is within budget at every step, so a stopped search still
    returns a valid plan within any feasible budget (the notes say it stopped).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable
from typing import ClassVar

from ckptfx.errors import UnsupportedGraphError
from ckptfx.solvers.base import (
    SolveProblem,
    Solution,
    least_recompute_saved,
    needed_closure,
    recompute_cost,
    saved_bytes,
)
from ckptfx.solvers.rules import (  # noqa: F401 - re-exported: shared with budget.py
    Clock,
    backward_penalty,
    bind_expensive,
    can_be_saved,
    can_run_in_backward,
    expensive_note,
    least_bytes_plan,
    save_penalty,
)

MAX_EVALS_PER_NODE = 50  # move pricings per problem node before a search stops
_MIN_GAIN = 1e-12  # cost-model seconds; smaller refill gains are float noise


def penalised_cost(problem: SolveProblem, saved: Iterable[str]) -> float:
    """Recompute cost of ``saved`` plus the preference penalties (Note [Preference
    penalties] in rules.py).

    Returns:
        Cost-model seconds; the objective both budget solvers minimise.
    """
    nodes = problem.by_name()
    saved = set(saved)
    recomputed, _ = needed_closure(problem, saved)
    return (sum(backward_penalty(nodes[r]) for r in recomputed)
            + sum(save_penalty(nodes[s]) for s in saved))


def prune_unused(problem: SolveProblem, saved: Iterable[str]) -> tuple[str, ...]:
    """Drops saved nodes the backward never reads (not needed, not a recompute input);
    the recomputed set, validity and cost are unchanged. Returns names in problem order."""
    saved = set(saved)
    nodes = problem.by_name()
    recomputed, _ = needed_closure(problem, saved)
    used = {n.name for n in problem.nodes if n.needed_by_backward}
    for r in recomputed:
        used.update(nodes[r].inputs)
    return tuple(n.name for n in problem.nodes if n.name in saved and n.name in used)


def least_recompute_plan(problem: SolveProblem) -> tuple[str, ...]:
    """The cheapest plan (:func:`ckptfx.solvers.base.least_recompute_saved`), validated.

    Raises:
        UnsupportedGraphError: no valid plan exists (via :func:`least_bytes_plan`'s path).
    """
    saved = set(least_recompute_saved(problem))
    _, violations = needed_closure(problem, saved)
    if violations:
        least_bytes_plan(problem)  # raises with the offending path when no plan exists
        raise UnsupportedGraphError("no valid plan: " + "; ".join(violations[:10]))
    return tuple(n.name for n in problem.nodes if n.name in saved)


@dataclasses.dataclass(frozen=True)
class Move:
    """One step of the local search, as set changes and their price.

    An un-save move stops saving ``node`` (``saved_out``) and computes it in the backward
    with the producers it walks through (``rec_in``), saving those it reaches that may be
    saved (``saved_in``). A save move saves ``node`` (``saved_in``), so what only it needed
    leaves the backward (``rec_out``) and saved values only those read (``saved_out``).

    Attributes:
        node: the node the move is about.
        saved_in, saved_out, rec_in, rec_out: names entering/leaving the saved and the
            backward-computed sets.
        added_bytes: change of saved bytes (bytes; negative frees memory).
        added_cost: change of :func:`penalised_cost` (cost-model seconds).
    """

    node: str
    saved_in: tuple[str, ...]
    saved_out: tuple[str, ...]
    rec_in: tuple[str, ...]
    rec_out: tuple[str, ...]
    added_bytes: int
    added_cost: float


class _Search:
    """Mutable state of one greedy search: saved set, backward-computed set, saved bytes."""

    def __init__(self, problem: SolveProblem, saved: Iterable[str]) -> None:
        self.problem = problem
        self.nodes = problem.by_name()
        self.rank = {n.name: i for i, n in enumerate(problem.nodes)}
        self.consumers: dict[str, list[str]] = {n.name: [] for n in problem.nodes}
        for n in problem.nodes:
            for i in n.inputs:
                self.consumers[i].append(n.name)
        self.saved = set(saved)
        self.recomputed = needed_closure(problem, self.saved)[0]
        self.bytes = saved_bytes(problem, self.saved)

    def unsave_move(self, name: str) -> Move | None:
        """Stop saving ``name``; None when that cannot keep the plan valid."""
        nodes = self.nodes
        if name not in self.saved or not can_run_in_backward(nodes[name]):
            return None
        new_saved, new_rec, seen, stack = [], [name], {name}, list(nodes[name].inputs)
        while stack:
            u = stack.pop()
            if u in seen or u in self.saved or u in self.recomputed:
                continue
            seen.add(u)
            if can_be_saved(nodes[u]):
                new_saved.append(u)
            elif can_run_in_backward(nodes[u]):
                new_rec.append(u)
                stack.extend(nodes[u].inputs)
            else:
                return None
        cost = (sum(backward_penalty(nodes[w]) for w in new_rec)
                + sum(save_penalty(nodes[u]) for u in new_saved) - save_penalty(nodes[name]))
        added = sum(nodes[u].nbytes for u in new_saved) - nodes[name].nbytes
        return Move(name, tuple(new_saved), (name,), tuple(new_rec), (), added, cost)

    def save_move(self, name: str) -> Move | None:
        """Save ``name`` (computed in the backward now); None when it may not be saved."""
        nodes, rec = self.nodes, self.recomputed
        if name not in rec or not can_be_saved(nodes[name]):
            return None
        region, stack = {name}, [name]
        while stack:
            for i in nodes[stack.pop()].inputs:
                if i in rec and i not in region:
                    region.add(i)
                    stack.append(i)
        dropped = {name}  # consumers first: u leaves when no kept node reads it
        for u in sorted(region - {name}, key=self.rank.__getitem__, reverse=True):
            if not nodes[u].needed_by_backward and all(
                    c in dropped or c not in rec for c in self.consumers[u]):
                dropped.add(u)
        inputs = {i for d in dropped for i in nodes[d].inputs if i in self.saved}
        unused = tuple(s for s in sorted(inputs, key=self.rank.__getitem__)
                       if not nodes[s].needed_by_backward
                       and not any(c in rec and c not in dropped for c in self.consumers[s]))
        added = nodes[name].nbytes - sum(nodes[s].nbytes for s in unused)
        cost = (save_penalty(nodes[name]) - sum(save_penalty(nodes[s]) for s in unused)
                - sum(backward_penalty(nodes[d]) for d in dropped))
        return Move(name, (name,), unused, (), tuple(dropped), added, cost)

    def apply(self, move: Move) -> list[str]:
        """Applies ``move``; returns the saved nodes whose un-save move it may have changed
        (those whose upward walk reaches a node that stopped being free)."""
        self.saved.difference_update(move.saved_out)
        self.saved.update(move.saved_in)
        self.recomputed.difference_update(move.rec_out)
        self.recomputed.update(move.rec_in)
        self.bytes += move.added_bytes
        touched, seen = [], set()
        stack = [c for u in move.saved_in + move.rec_in for c in self.consumers[u]]
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            if c in self.saved:
                touched.append(c)
            elif c not in self.recomputed:
                stack.extend(self.consumers[c])
        return touched

    def result(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.problem.nodes if n.name in self.saved)


def _unsave_key(search: _Search, move: Move, budget: int | None) -> tuple | None:
    """Free moves first (most bytes), then, only over budget, most bytes freed per cost."""
    if move.added_bytes >= 0:
        return None
    if move.added_cost <= 0.0:
        return (1.0, -move.added_bytes, -move.added_cost)
    if budget is not None and search.bytes > budget:
        return (0.0, -move.added_bytes / move.added_cost, -move.added_bytes)
    return None


def _save_key(search: _Search, move: Move, budget: int | None) -> tuple | None:
    """Most cost saved per added byte, among moves that lower the cost within budget."""
    gain = -move.added_cost
    if gain <= _MIN_GAIN or (budget is not None and search.bytes + move.added_bytes > budget):
        return None
    return (gain / move.added_bytes if move.added_bytes > 0 else float("inf"), gain)



def _lazy_greedy(search: _Search, save: bool, budget: int | None, max_evals: int,
                 clock: Clock | None = None) -> None:
    """Applies the best move until none is left (lazy greedy: a popped move is re-priced and
    applied only if it still beats the next entry). The heap is rebuilt when it runs dry;
    the search stops when a rebuild finds no move, after ``max_evals`` pricings, or when
    ``clock`` expires (checked before every pricing; ``clock.hit`` then says so)."""
    price = search.save_move if save else search.unsave_move
    keyf = _save_key if save else _unsave_key
    heap: list = []
    evals, applied = 0, True

    def push(name: str) -> None:
        move = price(name)
        key = None if move is None else keyf(search, move, budget)
        if key is not None:
            heapq.heappush(heap, (tuple(-k for k in key), search.rank[name], name))

    while evals < max_evals:
        if clock is not None and clock.expired():
            return
        if not heap:
            if not applied:
                return
            applied = False
            pool = search.recomputed if save else search.saved
            for name in sorted(pool, key=search.rank.__getitem__):
                if clock is not None and clock.expired():
                    return
                push(name)
            evals += len(pool)
            continue
        _, rank, name = heapq.heappop(heap)
        move, evals = price(name), evals + 1
        key = None if move is None else keyf(search, move, budget)
        if key is None:
            continue
        entry = (tuple(-k for k in key), rank, name)
        if heap and entry > heap[0]:
            heapq.heappush(heap, entry)
            continue
        touched = search.apply(move)
        applied = True
        for t in [] if save else touched:
            push(t)


def _eval_cap(problem: SolveProblem) -> int:
    return MAX_EVALS_PER_NODE * len(problem.nodes) + 1000


def descend(problem: SolveProblem, saved: Iterable[str], budget: int | None,
            clock: Clock | None = None) -> tuple[str, ...]:
    """Un-saves nodes greedily (Note [Greedy rematerialization heuristic]).

    Args:
        problem: the problem.
        saved: a valid saved set to start from.
        budget: bytes; None takes only moves that free bytes at no added cost.
        clock: stop at its deadline with the moves made so far (``clock.hit`` says so).

    Returns:
        A valid saved set, in problem order, of no more bytes and (for ``budget=None``) no
        more penalised cost than ``saved``.
    """
    search = _Search(problem, saved)
    _lazy_greedy(search, False, budget, _eval_cap(problem), clock)
    return search.result()


def refill(problem: SolveProblem, saved: Iterable[str], budget: int,
           clock: Clock | None = None) -> tuple[str, ...]:
    """Saves back recomputed nodes while that lowers the penalised cost within ``budget``.

    The inverse move of :func:`descend`, for when the descent got stuck above the budget:
    start from a plan within budget (the least-bytes plan) and repeatedly save the
    recomputed node that buys the most cost per added byte.

    Args:
        problem: the problem.
        saved: a valid saved set within ``budget``.
        budget: bytes.
        clock: stop at its deadline with the moves made so far (each keeps the budget).

    Returns:
        A valid saved set within ``budget`` (if ``saved`` was), in problem order.
    """
    search = _Search(problem, prune_unused(problem, saved))
    _lazy_greedy(search, True, budget, _eval_cap(problem), clock)
    return search.result()



def describe(problem: SolveProblem, saved: Iterable[str], tag: str) -> tuple[tuple[str, str], ...]:
    """One reason per saved node and per recomputed forward node, prefixed by ``tag``."""
    nodes = problem.by_name()
    saved = set(saved)
    recomputed, _ = needed_closure(problem, saved)
    reasons = []
    for n in problem.nodes:
        if n.name in saved:
            why = (f"it may not be computed in the backward ({n.reason or 'input or banned'})"
                   if not can_run_in_backward(n) else "cheaper to keep than to recompute")
            reasons.append((n.name, f"{tag}: saved, {n.nbytes} B; {why}"))
        elif n.name in recomputed and n.in_forward:
            why = (f"it may not be saved ({n.reason or 'not a tensor'})"
                   if not can_be_saved(n) else "frees its bytes for the budget")
            reasons.append((n.name, f"{tag}: recomputed, cost {n.recompute_cost:.3g} s; {why}"))
    return tuple(reasons)


@dataclasses.dataclass(frozen=True)
class GreedySolver:
    """Fast heuristic for the budgeted problem (Note [Greedy rematerialization heuristic]).

    Always returns a valid saved set. ``feasible`` is exact: when the descent cannot reach
    the budget, the exact least-bytes plan decides whether any plan can.

    Example:
        >>> from ckptfx.solvers.base import ProblemNode, SolveProblem
        >>> p = SolveProblem((ProblemNode("x", 4, 0.0, is_input=True),
        ...                   ProblemNode("a", 8, 1.0, ("x",), needed_by_backward=True)),
        ...                  budget_bytes=4)
        >>> GreedySolver().solve(p).saved
        ('x',)

    Attributes:
        recompute_expensive: let the plan recompute compute-bound nodes (Note
            [recompute_expensive binds every solver] in rules.py). True by default: the
            solver alone is unconstrained; the planner passes ``RematConfig``'s.

    Raises:
        UnsupportedGraphError: no valid plan exists (from :meth:`solve`).
    """

    name: ClassVar[str] = "greedy"
    recompute_expensive: bool = True

    def solve(self, problem: SolveProblem) -> Solution:
        """Solves ``problem`` heuristically within ``problem.time_limit_s``; see the class
        docstring."""
        if not any(n.needed_by_backward for n in problem.nodes):
            return Solution(saved=(), objective=0.0, lower_bound=0.0,
                            notes=("backward reads no forward value",))
        clock = Clock(problem.time_limit_s)
        bound = bind_expensive(problem, self.recompute_expensive)
        saved, feasible, notes = greedy_search(bound, clock)
        if not feasible:
            notes += [n for n in (expensive_note(problem, bound, problem.budget_bytes),) if n]
        if clock.hit:
            notes.append(f"time limit: the greedy search stopped at time_limit_s="
                         f"{problem.time_limit_s:g} with the best plan found so far")
        return Solution(saved=saved, objective=float(recompute_cost(problem, saved)),
                        lower_bound=None, feasible=feasible,
                        reasons=describe(bound, saved, "greedy"), notes=tuple(notes))


def greedy_search(problem: SolveProblem, clock: Clock) -> tuple[tuple[str, ...], bool, list[str]]:
    """The greedy's search: descend from the least-recompute plan; over budget (stuck, or
    stopped by ``clock``), refill the least-bytes plan.

    Returns:
        (saved, feasible, notes).
    """
    budget = problem.budget_bytes
    saved = descend(problem, least_recompute_plan(problem), budget, clock)
    notes = ["heuristic: greedy descent from the least-recompute plan"]
    feasible = True
    if budget is not None and saved_bytes(problem, saved) > budget:
        floor = least_bytes_plan(problem)
        floor_bytes = saved_bytes(problem, floor)
        feasible = floor_bytes <= budget
        if feasible:
            notes.append("descent over budget; refilled the least-bytes plan")
        else:
            notes.append(f"infeasible: budget {budget} B is below the least-bytes plan "
                         f"({floor_bytes} B); returning a least-bytes plan")
        saved = refill(problem, floor, budget if feasible else floor_bytes, clock)
    return saved, feasible, notes
