"""The solver boundary: a rematerialization problem as plain data, and the Solver protocol.

Nothing here imports torch. A :class:`SolveProblem` describes the part of a joint graph that
a solver may decide on: every node computable from the primals alone (no tangent dependence),
with its size in bytes (already evaluated under :class:`ckptfx.analysis.sizes.SizeHints`), its
recompute cost, its producers and the constraints on it. A solver returns the set of node
names to save; everything else that the backward needs is recomputed there.

Semantics shared by every solver (see ``Note [Validity of a saved set]``):

* ``in_forward`` nodes are computed by the forward graph anyway; ``needed_by_backward`` nodes
  are read by at least one backward node.
* A saved set ``S`` is valid when every node the backward needs is either in ``S`` or is
  recomputable with all its ``inputs`` valid in the same sense (recursively), and no node
  with ``can_recompute=False`` and ``in_forward=True`` would have to be recomputed.
* Nodes that are not ``in_forward`` (backward-native: they depend only on primals but only
  the backward reads them, e.g. a transposed weight) cost nothing extra to compute in the
  backward, so their ``recompute_cost`` is 0 there.

Note [Validity of a saved set]
    This is the node-splitting construction of Checkmate (Jain et al., MLSys 2020) and of
    PyTorch's min-cut partitioner: a valid saved set is exactly a finite s-t cut in the graph
    where the source feeds primals and must-compute-in-forward nodes and the backward's
    reads drain to the sink.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from typing import Literal, Protocol

from ckptfx.errors import ConfigError


class Force(enum.Enum):
    """A hard constraint on one node, from a policy's MUST vote or a structural solver."""

    SAVE = "save"
    RECOMPUTE = "recompute"


@dataclasses.dataclass(frozen=True)
class ProblemNode:
    """One candidate node of a joint graph, as the solvers see it.

    Attributes:
        name: the joint graph node's name (unique).
        nbytes: bytes kept alive if this node is saved for backward (int, evaluated sizes).
        recompute_cost: cost of recomputing this node once in the backward, in seconds of the
            cost model (0 for views and backward-native nodes).
        inputs: names of the producers of this node that are themselves ProblemNodes.
        is_input: a primal (graph input); never recomputed, saving it costs ``nbytes``.
        in_forward: the forward graph computes it (it feeds a forward output).
        needed_by_backward: a backward node reads it.
        can_save: False for values that cannot be returned as saved tensors (tuples).
        can_recompute: False for random ops, side effects, collectives and the like.
        expensive: a compute-bound op (matmul, convolution, attention); the min-cut does not
            recompute these unless asked to or a policy votes MUST_ or PREFER_RECOMPUTE.
        force: a hard constraint (:class:`Force`), or None.
        prefer: a soft bias in seconds of recompute cost: positive favours saving this node,
            negative favours recomputing it. Solvers that optimise cost add it to the
            objective when the node is recomputed.
        reason: why the constraints above are what they are (for reports and errors).
        storage_owner: the node whose storage this node's value lives in when that is another
            node (a view of it), else "" (see Note [Saved values are storages]).
    """

    name: str
    nbytes: int
    recompute_cost: float
    inputs: tuple[str, ...] = ()
    is_input: bool = False
    in_forward: bool = True
    needed_by_backward: bool = False
    can_save: bool = True
    can_recompute: bool = True
    expensive: bool = False
    force: Force | None = None
    prefer: float = 0.0
    reason: str = ""
    storage_owner: str = ""

    def forced(self, force: Force, reason: str) -> "ProblemNode":
        """This node with a hard constraint (``dataclasses.replace`` without re-checking the
        fields: constraining every node of a deep graph is a hot path)."""
        node = copy.copy(self)
        object.__setattr__(node, "force", force)
        object.__setattr__(node, "reason", reason)
        return node

    def __post_init__(self) -> None:
        if self.force is not None and not isinstance(self.force, Force):
            raise ConfigError(f"ProblemNode {self.name!r}: force={self.force!r} must be a "
                              f"ckptfx.solvers.base.Force (SAVE, RECOMPUTE) or None")


@dataclasses.dataclass(frozen=True)
class SolveProblem:
    """A rematerialization problem: nodes in topological order plus a budget.

    Attributes:
        nodes: every candidate node, producers before consumers.
        budget_bytes: the most bytes the saved set may hold (``budget_kind="saved"``) or the
            most bytes of simulated peak (``"peak"``); None means no budget.
        budget_kind: ``"saved"`` or ``"peak"``.
        time_limit_s: wall-clock limit for exact solvers, seconds.
        layers: optional block structure for layer-wise solvers: tuple of tuples of node names,
            one tuple per repeated block, in forward order.
        layers_from: where ``layers`` came from (``"module paths"`` or ``"structure"``;
            ``""`` without layers), for reports.
    """

    nodes: tuple[ProblemNode, ...]
    budget_bytes: int | None = None
    budget_kind: Literal["saved", "peak"] = "saved"
    time_limit_s: float = 10.0
    layers: tuple[tuple[str, ...], ...] = ()
    layers_from: str = ""

    def by_name(self) -> dict[str, ProblemNode]:
        """Returns the name -> node map, built once per problem (shared: read it, do not
        modify it; ``dataclasses.replace`` gives a new problem its own)."""
        index = self.__dict__.get("_by_name")
        if index is None:
            index = {n.name: n for n in self.nodes}
            object.__setattr__(self, "_by_name", index)
        return index


@dataclasses.dataclass(frozen=True)
class Solution:
    """What a solver returns.

    Attributes:
        saved: names of the nodes to save, in problem order.
        objective: the solver's objective value (bytes for min-cut, seconds for budget).
        lower_bound: a proven lower bound on the objective (LP relaxation), or None.
        feasible: False when no plan meets the budget; ``saved`` is then the closest plan.
        reasons: per saved/recomputed node, the solver's reason.
        notes: free-form facts for the report (e.g. "MILP optimal", "heuristic: time limit").
    """

    saved: tuple[str, ...]
    objective: float = 0.0
    lower_bound: float | None = None
    feasible: bool = True
    reasons: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()


class Solver(Protocol):
    """A solver maps a SolveProblem to a Solution. Solvers are pure: no torch, no globals.

    Attributes:
        name: the registry name.
        takes_budget: whether the solver bounds the saved bytes by ``budget_bytes`` (a solver
            without the attribute is assumed to; every plan is checked against the budget
            anyway, ``ckptfx.planner.to_plan``).
    """

    name: str
    takes_budget: bool

    def solve(self, problem: SolveProblem) -> Solution:  # pragma: no cover - protocol
        ...


def needed_closure(problem: SolveProblem, saved: set[str]) -> tuple[set[str], list[str]]:
    """Walks from the backward's reads through unsaved producers.

    Args:
        problem: the problem.
        saved: names assumed saved.

    Returns:
        (recomputed, violations): the names computed in the backward (forward nodes that are
        recomputed plus backward-native nodes), and human-readable reasons the set is invalid
        (empty when valid). The last few results are kept on the problem: planning a
        candidate asks for the same closure several times.
    """
    key = frozenset(saved)
    memo = problem.__dict__.get("_closures")
    if memo is None:
        memo = {}
        object.__setattr__(problem, "_closures", memo)
    if key in memo:
        recomputed, violations = memo[key]
        return set(recomputed), list(violations)
    recomputed, violations = _closure(problem, key)
    if len(memo) >= 4:
        memo.pop(next(iter(memo)))
    memo[key] = (frozenset(recomputed), tuple(violations))
    return recomputed, violations


def _closure(problem: SolveProblem, saved: frozenset[str]) -> tuple[set[str], list[str]]:
    nodes = problem.by_name()
    recomputed: set[str] = set()
    violations: list[str] = []
    stack = [n.name for n in problem.nodes if n.needed_by_backward and n.name not in saved]
    while stack:
        name = stack.pop()
        if name in recomputed:
            continue
        node = nodes[name]
        if node.is_input:
            violations.append(f"primal {name} is read by the backward but not saved")
            continue
        if node.in_forward and not node.can_recompute:
            violations.append(f"{name} must not be recomputed ({node.reason or 'banned'})")
        if node.force == Force.SAVE:
            violations.append(f"{name} is forced to be saved ({node.reason})")
        recomputed.add(name)
        stack.extend(i for i in node.inputs if i not in saved)
    for name in saved:
        node = nodes[name]
        if not node.can_save:
            violations.append(f"{name} cannot be saved ({node.reason or 'not a tensor'})")
        if node.force == Force.RECOMPUTE:
            violations.append(f"{name} is forced to be recomputed ({node.reason})")
    return recomputed, violations


def saved_bytes(problem: SolveProblem, saved: set[str] | tuple[str, ...]) -> int:
    """Sum of ``nbytes`` over the saved nodes (bytes)."""
    nodes = problem.by_name()
    return sum(nodes[s].nbytes for s in saved)


def recompute_cost(problem: SolveProblem, saved: set[str] | tuple[str, ...]) -> float:
    """Total recompute cost (cost-model seconds) of forward nodes the backward recomputes."""
    nodes = problem.by_name()
    recomputed, _ = needed_closure(problem, set(saved))
    return sum(nodes[r].recompute_cost for r in recomputed if nodes[r].in_forward)


def least_recompute_saved(problem: SolveProblem) -> tuple[str, ...]:
    """The saved set that recomputes nothing: every forward value the backward reads, directly
    or through backward-native nodes (computed in the backward anyway, at no extra cost).

    A backward-native node is saved only when a policy says MUST_SAVE or when computing it in
    the backward would need a value no plan can provide (e.g. the mask of a random op's
    tuple); a node that may not be saved (a tuple, a MUST_RECOMPUTE vote) hands the walk on
    to its producers. The result is invalid only when no plan exists (check with
    :func:`needed_closure`). Its bytes are the "no recompute" figure of reports.
    """
    for descend_backward_native in (True, False):
        saved = _least_recompute_walk(problem, descend_backward_native)
        if descend_backward_native and needed_closure(problem, set(saved))[1]:
            continue
        return saved
    return saved


def _least_recompute_walk(problem: SolveProblem, descend_backward_native: bool) -> tuple[str, ...]:
    by_name = problem.by_name()
    saved: set[str] = set()
    seen: set[str] = set()
    stack = [n.name for n in problem.nodes if n.needed_by_backward]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = by_name[name]
        savable = node.can_save and node.force != Force.RECOMPUTE
        wanted_here = (node.in_forward or node.is_input or node.force == Force.SAVE
                       or not descend_backward_native)
        if wanted_here and (savable or node.is_input):
            saved.add(name)
        else:
            stack.extend(node.inputs)
    return tuple(n.name for n in problem.nodes if n.name in saved)


def saved_storages(problem: SolveProblem, saved: set[str] | tuple[str, ...]) -> tuple[set[str], dict[str, str]]:
    """A saved set where every view is replaced by the node that owns its storage.

    Note [Saved values are storages]
        Saving a view keeps its base's whole storage alive, so the byte model already charges
        a view its base's bytes, and recomputing a view from its base costs nothing. But a
        compiler may not return a saved view as a view: Inductor realizes a view output, and
        an ``expand`` (a grouped-query attention's key/value repeat) comes back as a copy
        twice its base's size. Saving the owner of the storage instead, and recomputing the
        view in the backward, keeps the same memory in the model and makes the model exact
        under every compiler; two saved views of one storage are counted once. A view stays
        saved where the swap would break the plan (the owner may not be saved, or the path
        from it may not be recomputed, or a policy forces the view saved).

    Args:
        problem: the problem.
        saved: a valid saved set.

    Returns:
        (new saved set, {owner: view it replaces}).
    """
    nodes = problem.by_name()
    swaps = {s: nodes[s].storage_owner for s in sorted(saved)
             if nodes[s].storage_owner and nodes[s].force is None}
    if not swaps:
        return set(saved), {}
    base, _ = needed_closure(problem, set(saved))

    def only_views_added(trial: set[str]) -> bool:
        # valid, and what it adds to the backward is views of a saved storage, nothing else
        # (not a SymInt a view's size depends on, not another tensor)
        recomputed, violations = needed_closure(problem, trial)
        return not violations and all(nodes[n].storage_owner in trial for n in recomputed - base)

    every = (set(saved) - set(swaps)) | set(swaps.values())
    if only_views_added(every):  # the common case: one check
        return every, {owner: view for view, owner in reversed(swaps.items())}
    current = set(saved)
    replaced: dict[str, str] = {}
    for view, owner in swaps.items():
        trial = (current - {view}) | {owner}
        if only_views_added(trial):
            current = trial
            replaced.setdefault(owner, view)
    return current, replaced
