"""plan_remat: joint graph + config -> RematPlan (analysis, votes, problem, solve).

Call tree (each step a small function, tested alone)::

    plan_remat(joint, config)
    ├── size_hints(joint, config)        SizeHints from the graph's ShapeEnv
    ├── build_table(joint, hints)        NodeFacts per node             (analysis/table.py)
    ├── collect_votes(table, config)     Vote per node from policies    (policies.py)
    ├── build_problem(joint, table, votes, config)  SolveProblem        (plain data)
    │   └── find_blocks(table)           repeated blocks -> layers      (analysis/layers.py)
    ├── resolve budget                   fraction of no_remat_bytes(problem), or bytes
    ├── select_solver(config)            name + options; a structural policy picks its own
    ├── solver.solve(problem)            Solution                       (solvers/)
    └── to_plan(problem, solution)       RematPlan, validated           (plan.py)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from ckptfx import _torch_compat as compat
from ckptfx.analysis.layers import find_blocks
from ckptfx.analysis.sizes import SizeHints
from ckptfx.analysis.table import NodeTable, build_table
from ckptfx.config import RematConfig
from ckptfx.errors import ConfigError, InfeasibleBudgetError
from ckptfx.joint import JointGraph, Role
from ckptfx.plan import BACKWARD, FORWARD_ONLY, RECOMPUTE, SAVE, Decision, RematPlan
from ckptfx.policies import (
    Vote,
    VoteKind,
    checked_vote,
    resolve,
    respect_checkpoint_tags,
    solver_request,
    strongest,
)
from ckptfx.solvers import registry
from ckptfx.solvers.base import (
    ProblemNode,
    SolveProblem,
    Solution,
    least_recompute_saved,
    needed_closure,
    saved_bytes,
    saved_storages,
)

log = logging.getLogger("ckptfx")


@dataclasses.dataclass(frozen=True)
class Planned:
    """Everything planning produced: the plan and the artifacts it was derived from."""

    plan: RematPlan
    problem: SolveProblem
    table: NodeTable
    votes: dict[str, Vote]


def size_hints(joint: JointGraph, config: RematConfig) -> SizeHints:
    """SizeHints from the joint graph's ShapeEnv (empty for static shapes)."""
    shape_env = compat.shape_env_of(joint.graph)
    return SizeHints.from_shape_env(shape_env, config.unbacked_size_hint)


def size_notes(table: NodeTable) -> tuple[str, ...]:
    """The data-dependent sizes this graph's byte counts assumed (Note [Unbacked sizes] in
    ``ckptfx.analysis.sizes``), logged once as a warning; () when there are none."""
    symbols = {str(s) for row in table.rows for s in getattr(row.nbytes, "free_symbols", ())}
    note = table.hints.describe(symbols)
    if not note:
        return ()
    log.warning("ckptfx: %s; the plan is valid for every value, only its cost assumes these",
                note)
    return (note,)


def collect_votes(table: NodeTable, config: RematConfig) -> dict[str, Vote]:
    """Runs the policy chain on every forward call node (``Role.FORWARD``).

    Backward-native nodes get no vote: they are computed in the backward by nature, and a
    MUST_SAVE there (``save_ops(aten.sin)`` matching the ``sin`` of ``cos``'s derivative)
    would move backward work into the forward and save it.

    The model's own ``torch.utils.checkpoint`` tags and the configured policy are combined
    with :class:`ckptfx.policies.strongest`: a MUST vote beats a PREFER vote, and between
    votes of equal strength the model's tag wins. So a user's ``save_ops`` still saves inside
    a plain checkpoint region (tagged PREFER_RECOMPUTE), and never overrides a MUST tag.
    """
    user = resolve(config.policy)
    policy = strongest(respect_checkpoint_tags(), *([user] if user is not None else []))
    votes = {}
    for row in table.rows:
        if row.role is Role.FORWARD and row.target is not None:
            vote = checked_vote(policy, row)
            if vote is not None:
                votes[row.name] = vote
    return votes


def alias_votes(joint: JointGraph, table: NodeTable, votes: dict[str, Vote]) -> dict[str, Vote]:
    """Extends recompute votes to the views of the voted nodes that have no vote of their own.

    A view (``view``, ``expand``, ``getitem``; or a backward-native ``detach``/``t`` of a
    forward value) aliases its base: saving it keeps the very same memory, so a MUST_ or
    PREFER_RECOMPUTE vote on the base covers it too (else a solver optimising recompute
    cost under a budget could keep the value by another name).

    Returns:
        A new dict: ``votes`` plus the inherited votes (reason ``"alias of <base>: ..."``).
    """
    out = dict(votes)
    for node in joint.graph.nodes:
        row = table[node.name] if node.op != "output" else None
        if row is None or node.name in out or not row.fw_computable or not row.is_view:
            continue
        base = next((p.name for p in node.all_input_nodes if p.name in out), None)
        if base is not None and out[base].kind in (VoteKind.MUST_RECOMPUTE,
                                                   VoteKind.PREFER_RECOMPUTE):
            out[node.name] = Vote(out[base].kind, f"alias of {base}: {out[base].reason}")
    return out


def build_problem(joint: JointGraph, table: NodeTable, votes: dict[str, Vote],
                  config: RematConfig) -> SolveProblem:
    """Describes the forward-computable part of the joint graph as a SolveProblem."""
    votes = alias_votes(joint, table, votes)
    bw_outputs = _backward_output_names(joint)
    static_storages = {_storage_id(n) for n in joint.graph.nodes
                       if n.name in joint.static_input_names} - {None}
    owners: dict[str, str] = {}  # node -> the node that owns its storage
    candidates = [n for n in joint.graph.nodes
                  if n.name in joint.fw_computable and n.op in ("placeholder", "call_function")]
    names = {n.name for n in candidates}
    nodes = []
    for node in candidates:
        row = table[node.name]
        vote = votes.get(node.name)
        is_input = row.role is Role.PRIMAL
        reason = row.ban_reason
        can_recompute = not is_input and not reason
        force = None
        prefer = 0.0
        if vote is not None:
            reason = vote.reason if not reason or vote.kind.is_must else reason
            if vote.kind is VoteKind.MUST_SAVE:
                force = SAVE
            elif vote.kind is VoteKind.MUST_RECOMPUTE:
                force = RECOMPUTE
            else:
                bias = 10.0 * row.cost_s + 1e-6
                prefer = bias if vote.kind is VoteKind.PREFER_SAVE else -bias
        elif row.widens:  # save the low-precision value, not its upcast copy too
            prefer = -(10.0 * row.cost_s + 1e-6)
            reason = reason or f"upcast of {row.widens}: cheaper to save the narrower value"
        needed = node.name in bw_outputs or any(
            u.op != "output" and u.name not in joint.fw_computable for u in node.users)
        in_forward = row.role in (Role.FORWARD, Role.PRIMAL)
        static = node.name in joint.static_input_names or _storage_id(node) in static_storages
        base = _view_base(node)
        owner = owners[node.name] = owners.get(base.name, node.name) if base is not None \
            and base.name in names else node.name
        nodes.append(ProblemNode(
            name=node.name,
            nbytes=0 if static else table.bytes_of(node.name),
            recompute_cost=row.cost_s if in_forward else 0.0,
            inputs=tuple(dict.fromkeys(p.name for p in node.all_input_nodes if p.name in names)),
            is_input=is_input,
            in_forward=in_forward,
            needed_by_backward=needed,
            can_save=row.is_tensor or row.is_sym,
            can_recompute=can_recompute,
            expensive=row.compute_intensive,
            force=force,
            prefer=prefer,
            reason=reason,
            storage_owner="" if owner == node.name else owner,
        ))
    layers = tuple(tuple(n for n in block.nodes if n in names) for block in find_blocks(table))
    return SolveProblem(nodes=tuple(nodes), budget_kind=config.effective_budget_kind,
                        time_limit_s=float(config.time_limit_s), layers=layers)


def _view_base(node):
    """The node whose storage a view op's value aliases (its first tensor argument), or None
    for a value with a storage of its own. ``getitem`` aliases only when its source does
    (``split``, ``unbind``); read from the op schema, not from fake storages, which a joint
    graph pass that re-propagates values does not keep shared."""
    import operator

    if node.op != "call_function" or not node.args:
        return None
    src = node.args[0]
    if node.target is operator.getitem:
        return _view_base(src) and src if hasattr(src, "op") else None
    if getattr(node.target, "is_view", False) is True and hasattr(src, "op"):
        return src
    return None


def _storage_id(node) -> int | None:
    """Identity of the (fake) storage a node's tensor value lives in, or None."""
    import torch

    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return id(val.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return None


def _backward_output_names(joint: JointGraph) -> set[str]:
    import torch.utils._pytree as pytree

    out = joint.graph.find_nodes(op="output")[0]
    leaves = pytree.arg_tree_leaves(*out.args)[joint.num_fwd_outputs:]
    return {x.name for x in leaves if hasattr(x, "name")}


def _policy_reason(node: ProblemNode, action: str, solver_reason: str) -> str:
    """The reason of a decision: a policy's own where its MUST vote decided, the solver's
    (noting the preference) where a PREFER vote agreed, else the solver's."""
    if node.force == action:
        return node.reason or solver_reason
    if node.prefer and (node.prefer > 0) == (action == SAVE) and node.reason:
        return f"{solver_reason} (preferred: {node.reason})"
    return solver_reason


def to_plan(problem: SolveProblem, solution: Solution, solver: str, solve_time_s: float,
            no_remat_bytes: int = 0) -> RematPlan:
    """Turns a Solution into a validated RematPlan with a decision for every candidate."""
    by_name = problem.by_name()
    saved, owners = saved_storages(problem, solution.saved)
    recomputed, _ = needed_closure(problem, saved)
    nbytes = sum(by_name[s].nbytes for s in saved)
    within = (problem.budget_bytes is None or problem.budget_kind != "saved"
              or nbytes <= problem.budget_bytes)
    reasons = dict(solution.reasons)
    for owner, view in owners.items():
        reasons[owner] = f"owns the storage of {view} ({reasons.get(view, f'{solver}: saved')})"
        reasons[view] = f"a view of saved {owner}: recomputed for free"
    decisions = {}
    for node in problem.nodes:
        if node.name in saved:
            why = _policy_reason(node, SAVE, reasons.get(node.name, f"{solver}: saved"))
            decisions[node.name] = Decision(SAVE, why, node.nbytes)
        elif node.name in recomputed and node.in_forward:
            why = reasons.get(node.name, f"{solver}: recomputed")
            decisions[node.name] = Decision(RECOMPUTE, _policy_reason(node, RECOMPUTE, why))
        elif node.name in recomputed:
            decisions[node.name] = Decision(BACKWARD, "computed in the backward only")
        else:
            decisions[node.name] = Decision(FORWARD_ONLY, "the backward does not need it")
    plan = RematPlan(
        saved=tuple(n.name for n in problem.nodes if n.name in saved),
        recomputed=tuple(n.name for n in problem.nodes
                         if n.name in recomputed and by_name[n.name].in_forward),
        decisions=decisions,
        solver=solver,
        saved_bytes=nbytes,
        no_remat_bytes=no_remat_bytes,
        budget_bytes=problem.budget_bytes,
        feasible=solution.feasible and within,
        objective=solution.objective,
        lower_bound=solution.lower_bound,
        solve_time_s=solve_time_s,
        notes=solution.notes,
    )
    plan.validate(problem)
    return plan


def plan_remat(joint: JointGraph, config: RematConfig | None = None) -> RematPlan:
    """Plans which forward values to save and which to recompute.

    Example:
        >>> import torch, ckptfx
        >>> x = torch.randn(64, 64, requires_grad=True)
        >>> joint = ckptfx.trace_joint(lambda x: x.sin().sin().sum(), x)
        >>> plan = ckptfx.plan_remat(joint)
        >>> plan.saved
        ('primals_1',)
        >>> fw, bw, report = ckptfx.apply_plan(joint, plan)

    Args:
        joint: a JointGraph (from :func:`ckptfx.trace_joint` or a partition_fn).
        config: options; defaults to ``RematConfig()`` (min-cut, no budget).

    Returns:
        The validated RematPlan.

    Raises:
        InfeasibleBudgetError: ``strict=True`` and no plan meets the budget.
        UnsupportedGraphError: constraints that no plan satisfies (explained as a path).
        PlanValidationError: the solver returned an invalid plan (a bug; please report).
    """
    return plan(joint, config).plan


def plan(joint: JointGraph, config: RematConfig | None = None) -> Planned:
    """Like :func:`plan_remat`, returning every artifact (table, votes, problem) too."""
    config = RematConfig.coerce(config)
    hints = size_hints(joint, config)
    table = build_table(joint, hints, cost_model=rank_safe_cost_model(config))
    notes = size_notes(table)
    votes = collect_votes(table, config)
    problem = build_problem(joint, table, votes, config)
    full = saved_bytes(problem, least_recompute_saved(problem))
    solver_name, kwargs = select_solver(config)
    solver = registry.get(solver_name, **kwargs)
    if config.memory_budget is not None and not getattr(solver, "takes_budget", True):
        raise ConfigError(
            f"solver={solver_name!r} finds the fewest saved bytes and takes no memory_budget "
            f"(memory_budget={config.memory_budget}); use solver='auto' (min-cut without a "
            f"budget, the budget MILP with one), 'budget', 'greedy' or 'uniform'")
    start = time.perf_counter()
    peak = None
    budget = config.memory_budget
    if budget is not None and config.effective_budget_kind == "peak":
        from ckptfx.peak_budget import solve_for_peak

        default = Solution(mincut_saved(problem, config.recompute_expensive))
        solution, peak, target = solve_for_peak(
            joint, problem, solver, budget, full,
            lambda p, s: to_plan(p, s, solver_name, 0.0, full), default)
        problem = dataclasses.replace(problem, budget_bytes=target)
    else:
        if budget is not None:
            problem = dataclasses.replace(problem, budget_bytes=saved_budget(problem, budget, config))
        solution = solver.solve(problem)
    elapsed = time.perf_counter() - start
    remat_plan = to_plan(problem, solution, solver_name, elapsed, full)
    if notes:
        remat_plan = dataclasses.replace(remat_plan, notes=remat_plan.notes + notes)
    if peak is not None:
        remat_plan = dataclasses.replace(remat_plan, predicted_peak_bytes=peak)
    if not remat_plan.feasible:
        _infeasible(remat_plan, config)
    return Planned(remat_plan, problem, table, votes)


def mincut_saved(problem: SolveProblem, recompute_expensive: bool) -> tuple[str, ...]:
    """The min-cut's saved set: with ``recompute_expensive`` the fewest bytes any valid plan
    saves; without, what the pass keeps when there is no budget."""
    from ckptfx.solvers.mincut import MinCutSolver

    return MinCutSolver(recompute_expensive=recompute_expensive).solve(problem).saved


def saved_budget(problem: SolveProblem, budget, config: RematConfig) -> int:
    """A saved-bytes budget in bytes (Note [Budget fractions] in ckptfx/config.py)."""
    if budget.fraction is None:
        return budget.nbytes
    least = saved_bytes(problem, mincut_saved(problem, True))
    default = saved_bytes(problem, mincut_saved(problem, config.recompute_expensive))
    return budget.resolve(least, default)


def rank_safe_cost_model(config: RematConfig) -> str:
    """The cost model to plan with: ``"profile"`` times ops, and timings differ between
    processes, so under an initialised process group of more than one rank the roofline is
    used instead (one warning): every rank must make the same decisions (Invariant 5)."""
    if config.cost_model != "profile":
        return config.cost_model
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        log.warning("ckptfx: cost_model='profile' is not rank-deterministic; planning with "
                    "the roofline on all %d ranks", dist.get_world_size())
        return "roofline"
    return "profile"


def select_solver(config: RematConfig) -> tuple[str, dict[str, Any]]:
    """The solver to run and its options.

    A structural policy (``policy="uniform"``; see Note [Structural policies] in
    :mod:`ckptfx.policies`) selects its own solver, which wraps the configured one: with
    ``solver="auto"`` (or the policy's own solver) the wrapped solver is min-cut, or the
    budget solver under ``memory_budget``; any other ``solver=`` names it. The policy's
    options (``uniform(layers_per_checkpoint=k)``) override the config's.

    Returns:
        (registry name, keyword options).
    """
    request = solver_request(config.policy)
    if request is None:
        name = config.effective_solver
        return name, _solver_kwargs(name, config)
    name, options = request
    inner = None if config.solver in ("auto", name) else config.solver
    return name, {**_solver_kwargs(name, config), **options, "inner": inner}


def _solver_kwargs(name: str, config: RematConfig) -> dict[str, Any]:
    if name == "uniform":
        return {"layers_per_checkpoint": config.layers_per_checkpoint,
                "recompute_expensive": config.recompute_expensive}
    if name == "mincut":
        return {"recompute_expensive": config.recompute_expensive}
    return {}


def _infeasible(plan: RematPlan, config: RematConfig) -> None:
    if config.effective_budget_kind == "peak":
        figure, what = plan.predicted_peak_bytes or 0, "has a simulated peak of"
    else:
        figure, what = plan.saved_bytes, "keeps"
    msg = (f"memory_budget={config.memory_budget} ({plan.budget_bytes} B, kind "
           f"{config.effective_budget_kind!r}) cannot be met; the closest plan {what} {figure} B. Raise "
           f"the budget to at least that, or allow more recomputation (solver, policy)")
    if config.strict:
        raise InfeasibleBudgetError(msg, budget_bytes=plan.budget_bytes or 0,
                                    smallest_bytes=figure)
    log.warning("ckptfx: %s (strict=False: using the closest plan)", msg)
