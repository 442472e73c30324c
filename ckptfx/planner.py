"""The plan stage: joint graph + config -> RematPlan for a saved-bytes bound or no budget.

Call tree (each step a small function, tested alone)::

    prepare(joint, config)               Prepared: every artifact a solver runs on
    ├── size_hints(joint, config)        SizeHints from the graph's ShapeEnv
    ├── build_table(joint, hints)        NodeFacts per node             (analysis/table.py)
    ├── collect_votes(table, config)     Vote per node from policies    (problem.py)
    └── build_problem(table, ...)        SolveProblem                   (problem.py)
    solve(prepared)                      Planned
    ├── saved_budget(problem, budget)    fraction of the saved-bytes scale, or bytes
    ├── select_solver(config)            name + options; a structural policy picks its own
    ├── solver.solve(problem)            Solution                       (solvers/)
    └── finish(...)                      RematPlan via to_plan, validated; infeasible budgets

A peak budget (``budget_kind="peak"``) is a search over saved-bytes bounds that applies and
simulates candidate plans: :mod:`ckptfx.peak_budget`, a stage above this one and above the
rewrite and the simulation; :func:`ckptfx.pipeline.plan` chooses between the two.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

from ckptfx.analysis.sizes import SizeHints
from ckptfx.analysis.table import NodeTable, build_table
from ckptfx.config import RematConfig
from ckptfx.errors import ConfigError, InfeasibleBudgetError
from ckptfx.joint import JointGraph, Role
from ckptfx.plan import Action, Decision, RematPlan
from ckptfx.policies import Vote, solver_request
from ckptfx.problem import build_problem, collect_votes
from ckptfx.solvers import registry
from ckptfx.solvers.base import (
    Force,
    ProblemNode,
    SolveProblem,
    Solution,
    least_recompute_saved,
    needed_closure,
    recompute_cost,
    saved_bytes,
    saved_storages,
)

log = logging.getLogger("ckptfx")

MIN_SOLVE_S = 0.05  # seconds a solver gets even when the budget's min-cuts used the limit


@dataclasses.dataclass(frozen=True)
class Planned:
    """Everything planning produced: the plan and the artifacts it was derived from."""

    plan: RematPlan
    problem: SolveProblem
    table: NodeTable
    votes: dict[str, Vote]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a solver runs on, and what turning its Solution into a plan needs.

    Attributes:
        config: the options.
        table: the NodeTable (its ``hints`` are the plan's).
        votes: the policies' votes.
        problem: the SolveProblem (no budget set yet).
        full_bytes: bytes the no-recompute plan saves.
        notes: the data-dependent sizes the byte counts assumed (for the plan's notes).
    """

    config: RematConfig
    table: NodeTable
    votes: dict[str, Vote]
    problem: SolveProblem
    full_bytes: int
    notes: tuple[str, ...]

    def solver(self) -> tuple[str, Any]:
        """(registry name, instance) of the configured solver.

        Raises:
            ConfigError: a memory budget for a solver that takes none (the min-cut).
        """
        name, kwargs = select_solver(self.config)
        solver = registry.get(name, **kwargs)
        if self.config.memory_budget is not None and not getattr(solver, "takes_budget", True):
            raise ConfigError(
                f"solver={name!r} finds the fewest saved bytes and takes no memory_budget "
                f"(memory_budget={self.config.memory_budget}); use solver='auto' (min-cut "
                f"without a budget, the budget MILP with one), 'budget', 'greedy' or 'uniform'")
        return name, solver

    def to_plan(self, problem: SolveProblem, solution: Solution, solver: str,
                solve_time_s: float = 0.0, detail: bool = True) -> RematPlan:
        """:func:`to_plan` with this preparation's table and options; ``detail=False``
        leaves out the decisions only a report reads, for candidate plans that are
        simulated, not reported."""
        return to_plan(problem, solution, solver, solve_time_s, self.full_bytes, self.table,
                       self.config, detail)


def size_hints(joint: JointGraph, config: RematConfig) -> SizeHints:
    """SizeHints from the joint graph's ShapeEnv (empty for static shapes)."""
    return SizeHints.from_graphs(joint.graph, unbacked_default=config.unbacked_size_hint)


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


def prepare(joint: JointGraph, config: RematConfig) -> Prepared:
    """Analysis, votes and problem: everything up to the solver."""
    table = build_table(joint, size_hints(joint, config), cost_model=rank_safe_cost_model(config),
                        regather_params=config.regather_params)
    notes = size_notes(table)
    votes = collect_votes(table, config)
    problem = build_problem(table, joint, votes, config)
    full = saved_bytes(problem, least_recompute_saved(problem))
    return Prepared(config, table, votes, problem, full, notes)


def solve(prep: Prepared) -> Planned:
    """Plans for no budget or a saved-bytes budget (``budget_kind="saved"``).

    Raises:
        InfeasibleBudgetError: ``strict=True`` and no plan meets the budget.
    """
    problem = prep.problem
    budget = prep.config.memory_budget
    name, solver = prep.solver()
    start = time.perf_counter()
    if budget is not None:
        problem = dataclasses.replace(problem, budget_bytes=saved_budget(problem, budget,
                                                                         prep.config))
        default = no_budget_within(problem, name, prep.config)
        if default is not None:
            return finish(prep, problem, default, name, time.perf_counter() - start)
        left = prep.config.time_limit_s - (time.perf_counter() - start)
        problem = dataclasses.replace(problem, time_limit_s=max(left, MIN_SOLVE_S))
    solution = solver.solve(problem)
    return finish(prep, problem, solution, name, time.perf_counter() - start)


def no_budget_within(problem: SolveProblem, solver: str, config: RematConfig) -> Solution | None:
    """The no-budget plan when ``solver`` is a built-in budget solver and the plan meets
    ``problem.budget_bytes``, or no plan the solver may make saves fewer bytes (then
    infeasible); else None (Note [A budget the no-budget plan meets]).

    Note [A budget the no-budget plan meets]
        A saved-bytes budget at or above what the plan without a budget saves (the min-cut
        with the config's ``recompute_expensive``; fraction 1.0 is exactly its bytes, Note
        [Budget fractions]) asks for nothing that plan does not give, so it *is* that plan,
        not the budget solver's answer at that bound: the MILP would spend the same bytes
        on other values by its cost model, so ``memory_budget=1.0`` would plan differently
        from no budget at all. A budget below it that no plan meets without recomputing
        what ``recompute_expensive=False`` forbids (Note [recompute_expensive binds every
        solver] in ckptfx/solvers/rules.py) gets the no-budget plan too, as the closest
        plan: a smaller budget never changes the plan by a tie-break. The uniform solver
        applies the first rule to its inner solver; a user's registered solver gets every
        budget.
    """
    from ckptfx.solvers.rules import bind_expensive, expensive_note, least_bytes_plan
    from ckptfx.solvers.mincut import MinCutSolver

    budget = problem.budget_bytes
    if budget is None or solver not in ("budget", "greedy") or not registry.is_builtin(solver):
        return None
    nbytes = saved_bytes(problem, mincut_saved(problem, config.mincut_recompute_expensive))
    bound = bind_expensive(problem, config.budget_recompute_expensive)
    feasible = nbytes <= budget
    if not feasible and saved_bytes(bound, least_bytes_plan(bound)) < nbytes:
        return None
    solution = MinCutSolver(config.mincut_recompute_expensive).solve(problem)
    which = f"(min-cut, recompute_expensive={config.recompute_expensive})"
    if feasible:
        notes = (f"budget {budget} B >= the no-budget plan's {nbytes} B: the no-budget plan "
                 f"{which}",)
    else:
        notes = (f"infeasible: budget {budget} B is below the least bytes any plan saves "
                 f"({nbytes} B); the closest plan is the no-budget plan {which}",)
        notes += tuple(n for n in (expensive_note(problem, bound, budget),) if n)
    return dataclasses.replace(solution, feasible=feasible, notes=notes + solution.notes,
                               objective=float(recompute_cost(problem, solution.saved)),
                               lower_bound=None)


def finish(prep: Prepared, problem: SolveProblem, solution: Solution, solver: str,
           elapsed_s: float, peak: int | None = None) -> Planned:
    """The validated plan of ``solution`` with its notes and predicted peak; an infeasible
    budget raises (``strict``) or warns."""
    plan = prep.to_plan(problem, solution, solver, elapsed_s)
    notes = plan.notes + prep.notes + regather_notes(plan, prep.table, prep.config)
    plan = dataclasses.replace(plan, notes=notes, predicted_peak_bytes=peak)
    if not plan.feasible:
        _infeasible(plan, prep.config)
    return Planned(plan, problem, prep.table, prep.votes)


def regather_notes(plan: RematPlan, table: NodeTable, config: RematConfig) -> tuple[str, ...]:
    """What ``regather_params`` saved and what it costs, for the plan's notes; () when off.

    The all-gathers of parameter shards the backward runs again, with the bytes they
    deliver (communication added per step), and the bytes of unsharded parameters (their
    waits' results) the plan no longer keeps from forward to backward.
    """
    if not config.regather_params:
        return ()
    rows = [r for r in table.rows if r.regathers]
    names = {r.name for r in rows}
    gathers = [r.name for r in rows if not names.intersection(r.inputs)]
    waits = [r.name for r in rows if names.intersection(r.inputs)]
    if not gathers:
        return ("regather_params: this graph all-gathers no parameter shard; nothing to "
                "re-gather",)
    redone = set(plan.recomputed)
    sent = sum(table.bytes_of(g) for g in gathers if g in redone)
    freed = sum(table.bytes_of(w) for w in waits if w in redone)
    return (f"regather_params: {sum(g in redone for g in gathers)} of {len(gathers)} "
            f"all-gathers re-run in the backward ({sent / 2**20:.2f} MiB communicated), "
            f"{freed / 2**20:.2f} MiB of unsharded parameters not kept",)


def _policy_reason(node: ProblemNode, force: Force, solver_reason: str) -> str:
    """The reason of a decision: a policy's own where its MUST vote decided, the solver's
    (noting the preference) where a PREFER vote agreed, else the solver's."""
    if node.force is force:
        return node.reason or solver_reason
    if node.prefer and (node.prefer > 0) == (force is Force.SAVE) and node.reason:
        return f"{solver_reason} (preferred: {node.reason})"
    return solver_reason


def _decision(node: ProblemNode, saved: set[str], recomputed: set[str],
              reasons: dict[str, str], solver: str) -> Decision:
    if node.name in saved:
        why = _policy_reason(node, Force.SAVE, reasons.get(node.name, f"{solver}: saved"))
        return Decision(Action.SAVE, why, node.nbytes)
    if node.name in recomputed and node.in_forward:
        why = reasons.get(node.name, f"{solver}: recomputed")
        return Decision(Action.RECOMPUTE, _policy_reason(node, Force.RECOMPUTE, why))
    if node.name in recomputed:
        return Decision(Action.BACKWARD, "computed in the backward only")
    return Decision(Action.FORWARD_ONLY, "the backward does not need it")


def _names(names, limit: int = 3) -> str:
    more = f" +{len(names) - limit}" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _detail(row, table: NodeTable, action: Action) -> str:
    """What the report shows beside a decision: which backward ops read a saved value or why
    it may not be recomputed; what a recomputed node is recomputed from."""
    if action is Action.RECOMPUTE:
        return f"from {_names(row.inputs)}" if row.inputs else ""
    if action is not Action.SAVE:
        return ""
    if row.ban_reason and row.ban_reason != "graph input":
        return f"may not be recomputed: {row.ban_reason}"
    readers = [u for u in row.users if table[u].role is Role.BACKWARD]
    if row.compute_intensive:
        why = f"{row.op_name} is compute-bound (kept rather than recomputed unless a budget needs it)"
        return why + (f"; read by {_names(readers)}" if readers else "")
    return f"read by {_names(readers)}" if readers else "inputs of recomputed ops"


def to_plan(problem: SolveProblem, solution: Solution, solver: str, solve_time_s: float,
            no_remat_bytes: int = 0, table: NodeTable | None = None,
            config: RematConfig | None = None, detail: bool = True) -> RematPlan:
    """Turns a Solution into a validated RematPlan with a decision for every candidate.

    With ``table`` the plan has the table's size hints and each decision carries the op,
    module path, FLOPs and cost the report shows; ``detail=False`` leaves the decisions out
    (a candidate plan, simulated but not reported). ``config`` is recorded on the plan.
    """
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
    for node in problem.nodes if detail else ():
        decision = _decision(node, saved, recomputed, reasons, solver)
        if table is not None:
            row = table[node.name]
            decision = dataclasses.replace(decision, op=row.op_name, module=row.module_path,
                                           flops=row.flops, cost_s=row.cost_s,
                                           source=row.source,
                                           detail=_detail(row, table, decision.action))
        decisions[node.name] = decision
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
        hints=table.hints if table is not None else None,
        config=config,
    )
    plan.validate(problem)
    return plan


def mincut_saved(problem: SolveProblem, recompute_expensive: bool) -> tuple[str, ...]:
    """The min-cut's saved set: with ``recompute_expensive`` the fewest bytes any valid plan
    saves; without, what the pass keeps when there is no budget.

    It depends on the nodes alone, so it is computed once per node set (a budget asks for
    both cuts, and the no-budget plan again)."""
    return _mincut_saved(problem.nodes, recompute_expensive)


@functools.lru_cache(maxsize=4)
def _mincut_saved(nodes: tuple[ProblemNode, ...], recompute_expensive: bool) -> tuple[str, ...]:
    from ckptfx.solvers.mincut import MinCutSolver

    return MinCutSolver(recompute_expensive=recompute_expensive).solve(SolveProblem(nodes)).saved


def saved_budget(problem: SolveProblem, budget, config: RematConfig) -> int:
    """A saved-bytes budget in bytes (Note [Budget fractions] in ckptfx/config.py)."""
    if budget.fraction is None:
        return budget.nbytes
    from ckptfx.solvers.rules import bind_expensive, least_bytes_plan

    # 0.0 is the least any plan the solvers may make saves: with recompute_expensive=False,
    # the least without recomputing a compute-bound op
    bound = bind_expensive(problem, config.budget_recompute_expensive)
    least = saved_bytes(problem, least_bytes_plan(bound))
    default = saved_bytes(problem, mincut_saved(problem, config.mincut_recompute_expensive))
    return budget.resolve(least, max(least, default))


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
    """The config's options for a built-in solver: the min-cut (and the uniform solver's inner
    min-cut) take ``mincut_recompute_expensive``, the budget solvers
    ``budget_recompute_expensive`` (Note [Recomputing expensive ops] in ckptfx/config.py;
    Note [recompute_expensive binds every solver] in ckptfx/solvers/rules.py)."""
    if not registry.is_builtin(name):
        return {}
    if name == "uniform":
        return {"layers_per_checkpoint": config.layers_per_checkpoint,
                "recompute_expensive": config.mincut_recompute_expensive,
                "bind_expensive": config.recompute_expensive is False}
    if name in ("budget", "greedy"):
        return {"recompute_expensive": config.budget_recompute_expensive}
    return {"recompute_expensive": config.mincut_recompute_expensive}


def _infeasible(plan: RematPlan, config: RematConfig) -> None:
    """Raises (``strict``) or warns that the budget cannot be met. An infeasible plan has a
    budget; under a peak budget its peak is known (the search never picks an unknown one)."""
    if config.effective_budget_kind == "peak":
        figure, what = plan.predicted_peak_bytes, "has a simulated peak of"
    else:
        figure, what = plan.saved_bytes, "keeps"
    hint = next((n for n in plan.notes if n.startswith("recompute_expensive=True")), "")
    msg = (f"memory_budget={config.memory_budget} ({plan.budget_bytes} B, kind "
           f"{config.effective_budget_kind!r}) cannot be met; the closest plan {what} {figure} B. Raise "
           f"the budget to at least that, or allow more recomputation (solver, policy"
           f"{', recompute_expensive' if hint else ''})" + (f"; {hint}" if hint else ""))
    if config.strict:
        raise InfeasibleBudgetError(msg, budget_bytes=plan.budget_bytes,
                                    smallest_bytes=figure)
    log.warning("ckptfx: %s (strict=False: using the closest plan)", msg)
