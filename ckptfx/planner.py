"""plan_remat: joint graph + config -> RematPlan (analysis, votes, problem, solve).

Call tree (each step a small function, tested alone)::

    plan_remat(joint, config)
    ├── size_hints(joint, config)        SizeHints from the graph's ShapeEnv
    ├── build_table(joint, hints)        NodeFacts per node             (analysis/table.py)
    ├── collect_votes(table, config)     Vote per node from policies    (policies.py)
    ├── build_problem(joint, table, votes, config)  SolveProblem        (plain data)
    ├── resolve budget                   fraction of no_remat_bytes(problem), or bytes
    ├── solver.solve(problem)            Solution                       (solvers/)
    └── to_plan(problem, solution)       RematPlan, validated           (plan.py)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from ckptfx import _torch_compat as compat
from ckptfx.analysis.sizes import SizeHints
from ckptfx.analysis.table import NodeTable, build_table
from ckptfx.config import RematConfig
from ckptfx.errors import InfeasibleBudgetError
from ckptfx.joint import JointGraph, Role
from ckptfx.plan import BACKWARD, FORWARD_ONLY, RECOMPUTE, SAVE, Decision, RematPlan
from ckptfx.policies import Vote, VoteKind, checked_vote, first_of, resolve, respect_checkpoint_tags
from ckptfx.solvers import registry
from ckptfx.solvers.base import ProblemNode, SolveProblem, Solution, needed_closure

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
    return SizeHints(compat.symbol_hints(shape_env), config.unbacked_size_hint)


def collect_votes(table: NodeTable, config: RematConfig) -> dict[str, Vote]:
    """Runs the policy chain on every forward-computable call node.

    The model's own ``torch.utils.checkpoint`` tags vote first; the configured policy after.
    """
    user = resolve(config.policy)
    policy = first_of(respect_checkpoint_tags(), *([user] if user is not None else []))
    votes = {}
    for row in table.rows:
        if row.fw_computable and row.target is not None:
            vote = checked_vote(policy, row)
            if vote is not None:
                votes[row.name] = vote
    return votes


def build_problem(joint: JointGraph, table: NodeTable, votes: dict[str, Vote],
                  config: RematConfig) -> SolveProblem:
    """Describes the forward-computable part of the joint graph as a SolveProblem."""
    bw_outputs = _backward_output_names(joint)
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
        needed = node.name in bw_outputs or any(
            u.op != "output" and u.name not in joint.fw_computable for u in node.users)
        in_forward = row.role in (Role.FORWARD, Role.PRIMAL)
        static = node.name in joint.static_input_names
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
        ))
    return SolveProblem(nodes=tuple(nodes), budget_kind=config.budget_kind,
                        time_limit_s=float(config.time_limit_s))


def _backward_output_names(joint: JointGraph) -> set[str]:
    import torch.utils._pytree as pytree

    out = joint.graph.find_nodes(op="output")[0]
    leaves = pytree.arg_tree_leaves(*out.args)[joint.num_fwd_outputs:]
    return {x.name for x in leaves if hasattr(x, "name")}


def no_remat_saved(problem: SolveProblem) -> tuple[str, ...]:
    """The saved set that recomputes nothing: every forward value the backward reads, directly
    or through backward-native nodes (which are computed in the backward anyway)."""
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
        if node.in_forward and (node.can_save or node.is_input):
            saved.add(name)
        else:
            stack.extend(node.inputs)
    return tuple(n.name for n in problem.nodes if n.name in saved)


def to_plan(problem: SolveProblem, solution: Solution, solver: str, solve_time_s: float,
            no_remat_bytes: int = 0) -> RematPlan:
    """Turns a Solution into a validated RematPlan with a decision for every candidate."""
    by_name = problem.by_name()
    saved = set(solution.saved)
    recomputed, _ = needed_closure(problem, saved)
    reasons = dict(solution.reasons)
    decisions = {}
    for node in problem.nodes:
        if node.name in saved:
            decisions[node.name] = Decision(SAVE, reasons.get(node.name, f"{solver}: saved"),
                                            node.nbytes)
        elif node.name in recomputed and node.in_forward:
            decisions[node.name] = Decision(RECOMPUTE, reasons.get(node.name, f"{solver}: recomputed"))
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
        saved_bytes=sum(by_name[s].nbytes for s in saved),
        no_remat_bytes=no_remat_bytes,
        budget_bytes=problem.budget_bytes,
        feasible=solution.feasible,
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
    config = config or RematConfig()
    hints = size_hints(joint, config)
    table = build_table(joint, hints, cost_model=config.cost_model)
    votes = collect_votes(table, config)
    problem = build_problem(joint, table, votes, config)
    full = sum(problem.by_name()[s].nbytes for s in no_remat_saved(problem))
    if config.memory_budget is not None:
        problem = dataclasses.replace(problem, budget_bytes=config.memory_budget.resolve(full))
    solver_name = config.effective_solver
    solver = registry.get(solver_name, **_solver_kwargs(solver_name, config))
    start = time.perf_counter()
    solution = solver.solve(problem)
    elapsed = time.perf_counter() - start
    remat_plan = to_plan(problem, solution, solver_name, elapsed, full)
    if not remat_plan.feasible:
        _infeasible(remat_plan, config)
    return Planned(remat_plan, problem, table, votes)


def _solver_kwargs(name: str, config: RematConfig) -> dict[str, Any]:
    if name == "uniform":
        return {"layers_per_checkpoint": config.layers_per_checkpoint}
    if name == "mincut":
        return {"recompute_expensive": config.recompute_expensive}
    return {}


def _infeasible(plan: RematPlan, config: RematConfig) -> None:
    msg = (f"memory_budget={config.memory_budget} ({plan.budget_bytes} B, kind "
           f"{config.budget_kind!r}) cannot be met; the closest plan keeps {plan.saved_bytes} B "
           f"saved. Raise the budget to at least that, or allow more recomputation")
    if config.strict:
        raise InfeasibleBudgetError(msg, budget_bytes=plan.budget_bytes or 0,
                                    smallest_bytes=plan.saved_bytes)
    log.warning("ckptfx: %s (strict=False: using the closest plan)", msg)
