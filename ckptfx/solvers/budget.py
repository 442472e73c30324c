"""Budget solver: least recompute cost with saved bytes <= budget, exactly, as a 0-1 program.

Call tree::

    BudgetSolver.solve(problem)
    ├── least_bytes_plan(problem)      exact least bytes (min-cut): decides feasibility
    ├── _exact(problem, target, ...)   the MILP at target = budget (or the least bytes)
    │   ├── build_model(problem)       Note [Budget MILP formulation]
    │   ├── _run(model, ...)           scipy.optimize.milp (HiGHS) under the time limit
    │   ├── _decode(...)               round, prune, check with needed_closure and bytes
    │   ├── descend(..., None)         polish: free byte-saving moves (exact ties)
    │   └── _lp_bound(...)             LP relaxation of the plain recompute cost
    └── greedy_search(...)             fallback, Note [Budget fallbacks]

Every step shares one :class:`~ckptfx.solvers.knapsack.Clock` (Note [Keeping the time
limit]); compute-bound nodes are recomputed only with ``recompute_expensive`` (Note
[recompute_expensive binds every solver] in rules.py).

Note [Budget MILP formulation]
    Over the candidates that are ancestors of a backward read (the others never matter),
    binaries ``s_v`` (v is saved) and ``r_v`` (v is computed in the backward: a recomputed
    forward node, or a backward-native node, whose cost is 0)::

        min  sum_v (c_v + max(p_v, 0)) r_v + max(-p_v, 0) s_v + eps_v s_v
        s.t. s_v + r_v >= 1                    v needed_by_backward
             s_u + r_u >= r_v                  u an input of v
             sum_v nbytes_v s_v <= budget      budget row (absent for budget None)
             r_v = 0    v is_input, force is SAVE, or in_forward and not can_recompute
             s_v = 0    not can_save, or force is RECOMPUTE

    ``c_v`` is the recompute cost (0 if not in_forward), ``p_v`` the preference
    (Note [Preference penalties] in rules.py), ``eps_v`` the byte tie-break below. Any
    feasible (s, r) has r containing the closure of needed_closure(s), so its s is a valid
    saved set; conversely a valid set with r = its closure is feasible: the optimum over
    the program is the optimum over valid plans. ``force is RECOMPUTE`` forbids saving
    even a backward-native node (as the min-cut does; needed_closure only checks in_forward).

Note [Budget objective scaling]
    Cost coefficients are scaled so that all of them sum to ``COST_UNITS`` (1e3); the byte
    tie-break ``eps_v = TIE_UNITS * nbytes_v / sum(nbytes)`` sums to ``TIE_UNITS`` (1e-3).
    So the tie-break can never overturn a cost difference of more than 1e-6 of the graph's
    total recompute cost (plus penalties), which is also about what HiGHS resolves (absolute
    gap 1e-6, ``mip_rel_gap`` 1e-9 of an objective <= 1e3); smaller differences are ties,
    decided by bytes. HiGHS resolves bytes only to ~1e-3 of the total, so the plan is then
    polished with the greedy's free moves (recompute at no added cost when that frees bytes),
    which settles exact ties. When every coefficient is 0 the tie-break is the objective,
    scaled to ``COST_UNITS``. The budget row is divided by the largest ``nbytes``.

Note [Budget fallbacks]
    * budget below the least-bytes plan: the MILP runs at budget = least bytes, returning
      the cheapest least-bytes plan, with ``feasible=False``.
    * more than ``max_nodes`` (default 5000, i.e. 10k binaries, where HiGHS takes from
      seconds to minutes) candidates, no incumbent within ``time_limit_s``, or an incumbent
      that fails repair (rounding, closure or bytes): the greedy heuristic, said in notes.
    * too little time left for the MILP (Note [Keeping the time limit]): the greedy.
    * rounding can overshoot the budget by the solver's tolerances (~1e-6 of the largest
      tensor per node); then the MILP is re-solved with the budget lowered by the overshoot,
      twice at most, before falling back.

Note [Keeping the time limit]
    ``problem.time_limit_s`` bounds the whole solve, not only HiGHS: the least-bytes min-cut,
    the MILP, its repair re-solves, the polishing descent, the LP bound and the greedy
    fallback share one deadline. HiGHS keeps its ``time_limit`` only between presolve
    passes: on a 10k-binary ladder its presolve ran ~0.6 s past a 0.05 s limit (2-core CPU
    under load), about ``SETUP_S_PER_NONZERO`` (2e-5 s) per nonzero of the constraint
    matrix (building the model costs about as much again). So each HiGHS call gets the time
    left minus that estimate, and the MILP is not started with less than three times the
    estimate left (a re-solve: twice): the greedy (whose loops check the
    deadline before every move) plans instead, and the notes say the limit was hit. What
    cannot stop midway (the min-cut, one HiGHS presolve, one descent step) is what may run
    past the limit: well under a second at the ``max_nodes`` cap
    (tests/test_solvers_budget.py::test_time_limit_is_kept).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from ckptfx.solvers.base import SolveProblem, Solution, needed_closure, recompute_cost, saved_bytes
from ckptfx.solvers.knapsack import descend, describe, greedy_search, prune_unused
from ckptfx.solvers.rules import (
    Clock,
    backward_penalty,
    bind_expensive,
    can_be_saved,
    can_run_in_backward,
    expensive_note,
    least_bytes_plan,
    save_penalty,
)

COST_UNITS = 1e3  # cost coefficients sum to this; Note [Budget objective scaling]
TIE_UNITS = 1e-3  # the byte tie-break sums to this
MIP_REL_GAP = 1e-9  # HiGHS's relative gap (its absolute gap stays at 1e-6)
MAX_MILP_NODES = 5000  # above: greedy; Note [Budget fallbacks]
MIN_SLICE_S = 0.05  # seconds any HiGHS call gets, even past the time limit
SETUP_S_PER_NONZERO = 2e-5  # Note [Keeping the time limit]
_REPAIR_TRIES = 3


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """The program of Note [Budget MILP formulation] as scipy arrays.

    Attributes:
        names: the modelled nodes (ancestors of backward reads), problem order; variable i is
            ``s`` of ``names[i]``, variable ``n + i`` its ``r``.
        objective: scaled objective, shape (2n,), Note [Budget objective scaling].
        plain_cost: scaled recompute cost without penalties or tie-break, shape (2n,).
        closure: the needed and input rows (scipy ``LinearConstraint``).
        bounds: variable bounds (scipy ``Bounds``), 0 where a constraint fixes a variable.
        byte_row: ``nbytes / byte_scale``, shape (n,).
        byte_scale: bytes per unit of ``byte_row``.
        cost_scale: objective units per cost-model second (0 when all costs are 0).
        has_prefer: whether any modelled node has a preference.
    """

    names: tuple[str, ...]
    objective: np.ndarray
    plain_cost: np.ndarray
    closure: object
    bounds: object
    byte_row: np.ndarray
    byte_scale: float
    cost_scale: float
    has_prefer: bool


def relevant_nodes(problem: SolveProblem) -> tuple[str, ...]:
    """Names of the nodes that are, or feed, a backward read, in problem order."""
    nodes = problem.by_name()
    keep: set[str] = set()
    stack = [n.name for n in problem.nodes if n.needed_by_backward]
    while stack:
        name = stack.pop()
        if name not in keep:
            keep.add(name)
            stack.extend(nodes[name].inputs)
    return tuple(n.name for n in problem.nodes if n.name in keep)


def build_model(problem: SolveProblem) -> Model:
    """Builds the 0-1 program of Note [Budget MILP formulation] for ``problem``."""
    from scipy.optimize import Bounds, LinearConstraint
    from scipy.sparse import coo_matrix

    by_name = problem.by_name()
    names = relevant_nodes(problem)
    index = {name: i for i, name in enumerate(names)}
    nodes = [by_name[name] for name in names]
    n = len(nodes)
    rows, cols, vals, lower = [], [], [], []
    for i, node in enumerate(nodes):
        if node.needed_by_backward:  # s_v + r_v >= 1
            rows += [len(lower)] * 2
            cols += [i, n + i]
            vals += [1.0, 1.0]
            lower.append(1.0)
        for u in node.inputs:  # s_u + r_u - r_v >= 0
            j = index[u]
            rows += [len(lower)] * 3
            cols += [j, n + j, n + i]
            vals += [1.0, 1.0, -1.0]
            lower.append(0.0)
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(lower), 2 * n)).tocsr()
    closure = LinearConstraint(matrix, np.array(lower), np.full(len(lower), np.inf))
    upper = [1.0 if can_be_saved(v) else 0.0 for v in nodes]
    upper += [1.0 if can_run_in_backward(v) else 0.0 for v in nodes]
    nbytes = np.array([float(v.nbytes) for v in nodes])
    rec = np.array([backward_penalty(v) for v in nodes])
    sav = np.array([save_penalty(v) for v in nodes])
    plain = np.array([v.recompute_cost if v.in_forward else 0.0 for v in nodes])
    total_cost, total_bytes = float(rec.sum() + sav.sum()), float(nbytes.sum())
    cost_scale = COST_UNITS / total_cost if total_cost > 0 else 0.0
    tie_units = TIE_UNITS if total_cost > 0 else COST_UNITS
    tie = tie_units * nbytes / total_bytes if total_bytes > 0 else np.zeros(n)
    return Model(
        names=names,
        objective=np.concatenate([sav * cost_scale + tie, rec * cost_scale]),
        plain_cost=np.concatenate([np.zeros(n), plain * cost_scale]),
        closure=closure,
        bounds=Bounds(np.zeros(2 * n), np.array(upper)),
        byte_row=nbytes / max(1.0, float(nbytes.max(initial=0.0))),
        byte_scale=max(1.0, float(nbytes.max(initial=0.0))),
        cost_scale=cost_scale,
        has_prefer=any(v.prefer != 0.0 for v in nodes),
    )


def _run(model: Model, objective: np.ndarray, target: int | None, seconds: float,
         *, integral: bool = True, gap: float = MIP_REL_GAP):
    """Runs HiGHS on the model with ``objective`` and ``sum(nbytes s) <= target`` (bytes)."""
    from scipy.optimize import LinearConstraint, milp

    constraints = [model.closure]
    if target is not None:
        row = np.concatenate([model.byte_row, np.zeros(len(model.names))])[None, :]
        constraints.append(LinearConstraint(row, -np.inf, target / model.byte_scale))
    integrality = np.full(objective.shape, 1 if integral else 0)
    return milp(objective, integrality=integrality, bounds=model.bounds, constraints=constraints,
                options={"time_limit": max(seconds, MIN_SLICE_S), "mip_rel_gap": gap,
                         "presolve": True, "disp": False})


def setup_seconds(problem: SolveProblem, names: tuple[str, ...]) -> float:
    """Seconds building the model of ``names`` and HiGHS's presolve may take beyond its
    own time limit (Note [Keeping the time limit]), from the nonzeros of the program."""
    nodes = problem.by_name()
    nonzeros = sum(2 * nodes[v].needed_by_backward + 3 * len(nodes[v].inputs) + 2 for v in names)
    return SETUP_S_PER_NONZERO * nonzeros


def _decode(problem: SolveProblem, model: Model, x: np.ndarray,
            target: int | None) -> tuple[tuple[str, ...] | None, int, str]:
    """Rounds a MILP point to a saved set and checks it.

    Returns:
        (saved, overshoot_bytes, problem_text): ``saved`` is None when the rounded set is
        invalid (``problem_text`` says why) or over ``target`` by ``overshoot_bytes``.
    """
    chosen = {name for i, name in enumerate(model.names) if x[i] > 0.5}
    saved = prune_unused(problem, chosen)
    _, violations = needed_closure(problem, set(saved))
    if violations:
        return None, 0, "; ".join(violations[:5])
    over = saved_bytes(problem, saved) - target if target is not None else 0
    if over > 0:
        return None, over, f"{over} B over the budget after rounding"
    return saved, 0, ""


def _lp_bound(model: Model, target: int | None, seconds: float) -> float | None:
    """LP relaxation of the plain recompute cost: a lower bound, cost-model seconds."""
    if model.cost_scale == 0.0:
        return 0.0
    res = _run(model, model.plain_cost, target, seconds, integral=False)
    if res.status != 0 or res.fun is None:
        return None
    return max(0.0, float(res.fun) / model.cost_scale)


@dataclasses.dataclass(frozen=True)
class _Exact:
    """What the MILP stage produced: a plan (or None, then ``notes`` say why), a bound."""

    saved: tuple[str, ...] | None
    lower_bound: float | None
    notes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BudgetSolver:
    """Least recompute cost with saved bytes within ``problem.budget_bytes``, exactly.

    See Note [Budget MILP formulation]; infeasible budgets, large problems and time limits
    are handled as in Note [Budget fallbacks]. ``budget_bytes=None`` is an unbounded budget.

    Example:
        >>> from ckptfx.solvers.base import ProblemNode, SolveProblem
        >>> p = SolveProblem((ProblemNode("x", 4, 0.0, is_input=True),
        ...                   ProblemNode("a", 8, 1.0, ("x",), needed_by_backward=True)),
        ...                  budget_bytes=4)
        >>> BudgetSolver().solve(p).saved
        ('x',)

    Attributes:
        max_nodes: above this many modelled nodes, use the greedy heuristic.
        mip_rel_gap: HiGHS's relative optimality gap (Note [Budget objective scaling]).
        recompute_expensive: let the plan recompute compute-bound nodes (Note
            [recompute_expensive binds every solver] in rules.py). True by default: the
            solver alone is unconstrained; the planner passes ``RematConfig``'s.

    Raises:
        UnsupportedGraphError: no valid plan exists whatever the budget (from :meth:`solve`;
            the message is the offending path of the min-cut construction).
    """

    name: ClassVar[str] = "budget"
    max_nodes: int = MAX_MILP_NODES
    mip_rel_gap: float = MIP_REL_GAP
    recompute_expensive: bool = True

    def solve(self, problem: SolveProblem) -> Solution:
        """Solves ``problem`` within ``problem.time_limit_s``; see the class docstring."""
        clock = Clock(problem.time_limit_s)
        if not any(n.needed_by_backward for n in problem.nodes):
            return Solution(saved=(), objective=0.0, lower_bound=0.0,
                            notes=("backward reads no forward value",))
        notes = []
        if problem.budget_kind != "saved":
            notes.append(f"budget_kind={problem.budget_kind!r}: the budget bounds saved bytes here")
        bound = bind_expensive(problem, self.recompute_expensive)
        floor_bytes = saved_bytes(bound, least_bytes_plan(bound))
        budget = problem.budget_bytes
        feasible = budget is None or floor_bytes <= budget
        target = budget if feasible else floor_bytes
        if not feasible:
            notes.append(f"infeasible: budget {budget} B is below the least-bytes plan "
                         f"({floor_bytes} B); returning the cheapest least-bytes plan")
            notes += [n for n in (expensive_note(problem, bound, budget),) if n]
        exact = self._exact(bound, target, clock)
        notes += exact.notes
        saved = exact.saved
        if saved is None:
            sub = dataclasses.replace(bound, budget_bytes=target)
            saved, found, more = greedy_search(sub, clock)
            feasible = feasible and found
            notes += more
        if clock.hit:
            notes.append(f"time limit: stopped at time_limit_s={problem.time_limit_s:g} with "
                         f"the best plan found so far")
        objective = float(recompute_cost(problem, saved))
        lower = None if exact.lower_bound is None else min(exact.lower_bound, objective)
        return Solution(saved=saved, objective=objective, lower_bound=lower, feasible=feasible,
                        reasons=describe(bound, saved, "budget"), notes=tuple(notes))

    def _exact(self, problem: SolveProblem, target: int | None, clock: Clock) -> _Exact:
        """The MILP stage: solve, repair, polish; None with a note when it cannot."""
        names = relevant_nodes(problem)
        if len(names) > self.max_nodes:
            return _Exact(None, None, (f"heuristic: {len(names)} nodes exceed "
                                       f"max_nodes={self.max_nodes} for the MILP",))
        setup = setup_seconds(problem, names)
        late = _Exact(None, None, (f"heuristic: the MILP ({len(names)} nodes, ~{setup:.2g} s "
                                   f"to set up) does not fit the time left",))
        if clock.left() < 3.0 * setup:
            clock.hit = True
            return late
        model = build_model(problem)
        margin = 0
        for _ in range(_REPAIR_TRIES):
            if clock.left() < 2.0 * setup:
                clock.hit = True
                return late
            bound = None if target is None else target - margin
            res = _run(model, model.objective, bound, clock.left() - setup, gap=self.mip_rel_gap)
            if res.x is None:
                return _Exact(None, None, (f"heuristic: the MILP found no plan ({res.message})",))
            saved, over, why = _decode(problem, model, res.x, target)
            if saved is not None:
                break
            if over == 0:
                return _Exact(None, None, (f"heuristic: the MILP plan failed repair ({why})",))
            margin += over
        else:
            return _Exact(None, None, ("heuristic: the MILP plan stays over budget",))
        saved = descend(problem, saved, None, clock)
        lower = _lp_bound(model, target, clock.left() - setup) if clock.left() > 2.0 * setup else None
        if res.status == 0:
            note = f"MILP optimal ({len(model.names)} nodes, {res.mip_node_count} B&B nodes)"
        else:
            note = f"MILP time limit: gap {100.0 * (res.mip_gap or 0.0):.3g}%"
            dual = getattr(res, "mip_dual_bound", None)
            if dual is not None and not model.has_prefer and model.cost_scale > 0:
                lower = max(lower or 0.0, (float(dual) - TIE_UNITS) / model.cost_scale)
        return _Exact(saved, lower, (note,))
