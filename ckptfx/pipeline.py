"""The pipeline: plan (with the peak search above it), apply, simulate, report.

The public entry points compose the stages in their one direction::

    plan(joint, config) -> Planned
    ├── planner.prepare            analysis, votes, problem
    ├── peak_budget.plan_for_peak  budget_kind="peak": solve, apply, simulate candidates
    │   (plan_budgets: one graph, many budgets, the candidates simulated once)
    └── planner.solve              otherwise: solve once
    apply_plan(joint, plan) -> (fw, bw, report)
    ├── rewrite(joint, plan)       forward and backward graphs, verified  (passes/rewrite.py)
    ├── predict_peak(fw, bw, plan.hints)                                  (memory.py)
    └── build_report(plan, ...)    from the plan alone                    (report.py)

A plan is self-contained (its decisions carry what the report shows; it carries its size
hints and options), so applying it never re-analyses the graph.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ckptfx import stages
from ckptfx.config import RematConfig
from ckptfx.joint import JointGraph
from ckptfx.memory import predict_peak
from ckptfx.passes.rewrite import rewrite
from ckptfx.peak_budget import peak_candidates, plan_for_peak
from ckptfx.plan import RematPlan
from ckptfx.planner import Planned, prepare, size_hints, solve
from ckptfx.report import build_report

log = logging.getLogger("ckptfx")


def plan(joint: JointGraph, config: RematConfig | dict | None = None) -> Planned:
    """Like :func:`plan_remat`, returning every artifact (table, votes, problem) too.

    With ``microbatches_in_flight`` m > 1 and a byte budget, the budget is one microbatch's
    share (Note [Microbatches in flight] in :mod:`ckptfx.stages`): B // m for a saved
    budget; for a peak budget, the peak search for B, then saved budgets
    (B - peak) // (m - 1) until the plan fits (at most MAX_IN_FLIGHT_ROUNDS rounds).
    """
    config = RematConfig.coerce(config)
    if not stages.applies(config) or config.effective_budget_kind == "saved":
        return _plan_once(joint, stages.per_microbatch_config(config))
    planned = _plan_once(joint, config)
    for _ in range(MAX_IN_FLIGHT_ROUNDS):
        peak = _in_flight_peak(joint, config, planned)
        if peak is None or peak[0] <= config.memory_budget.nbytes:
            return planned
        planned = _plan_once(joint, stages.per_microbatch_config(config, peak[1]))
    peak = _in_flight_peak(joint, config, planned)
    if peak is None or peak[0] > config.memory_budget.nbytes:
        log.warning("ckptfx: memory_budget=%s with microbatches_in_flight=%d: no plan found "
                    "whose in-flight peak fits; the report gives the closest one's figures",
                    config.memory_budget, stages.in_flight(config))
    return planned


MAX_IN_FLIGHT_ROUNDS = 3


def _plan_once(joint: JointGraph, config: RematConfig) -> Planned:
    prep = prepare(joint, config)
    if config.memory_budget is not None and config.effective_budget_kind == "peak":
        return plan_for_peak(joint, prep)
    return solve(prep)


def plan_budgets(joint: JointGraph, config: RematConfig, budgets) -> list[Planned]:
    """Plans one graph for several memory budgets (a frontier), analysing it once and, for
    peak budgets, simulating the candidates once: every budget chooses from the same set.

    Args:
        joint: a JointGraph.
        config: options (its ``memory_budget`` is replaced by each budget).
        budgets: MemoryBudget values (:func:`ckptfx.config.parse_budget`).

    Returns:
        One Planned per budget, in order.

    Raises:
        What :func:`plan` raises.
    """
    import dataclasses

    config = RematConfig.coerce(config)
    prep = prepare(joint, config)
    if not budgets:
        return []
    shared = None
    out = []
    for budget in budgets:
        cfg = dataclasses.replace(config, memory_budget=budget)
        one = dataclasses.replace(prep, config=cfg)
        if cfg.effective_budget_kind == "peak":
            shared = shared or peak_candidates(joint, one)
            out.append(plan_for_peak(joint, one, shared))
        else:
            out.append(solve(one))
    return out


def _in_flight_peak(joint: JointGraph, config: RematConfig,
                    planned: Planned) -> tuple[int, int] | None:
    """(in-flight peak, one step's peak) of a plan in bytes; None if not simulated."""
    fw, bw = rewrite(joint, planned.plan)
    step = _safe_peak(fw, bw, planned.plan.hints)
    if step is None:
        return None
    return stages.in_flight_peak(config, planned.plan.saved_bytes, step), step


def plan_remat(joint: JointGraph, config: RematConfig | dict | None = None) -> RematPlan:
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
        config: options (a RematConfig or a dict of options); defaults to ``RematConfig()``
            (min-cut, no budget).

    Returns:
        The validated RematPlan.

    Raises:
        InfeasibleBudgetError: ``strict=True`` and no plan meets the budget.
        UnsupportedGraphError: constraints that no plan satisfies (explained as a path).
        PlanValidationError: the solver returned an invalid plan (a bug; please report).
    """
    return plan(joint, config).plan


def apply_plan(joint: JointGraph, plan: RematPlan, config: RematConfig | dict | None = None,
               graph_id: int = 0) -> tuple:
    """Applies a plan and reports on it: the public ``ckptfx.apply_plan``.

    Args:
        joint: the JointGraph the plan was made for.
        plan: a RematPlan (from :func:`ckptfx.plan_remat` or built by hand).
        config: options for a hand-built plan, which carries no size hints (its
            ``unbacked_size_hint``); a planned plan uses its own hints.
        graph_id: the report's graph number.

    Returns:
        (fw_module, bw_module, report): forward and backward GraphModules in AOTAutograd's
        calling convention, and a RematReport.

    Raises:
        PlanValidationError: the plan or the emitted graphs break an invariant.
    """
    start = time.perf_counter()
    fw, bw = rewrite(joint, plan)
    hints = plan.hints
    if hints is None and config is not None:
        hints = size_hints(joint, RematConfig.coerce(config))
    elapsed = time.perf_counter() - start
    return fw, bw, build_report(graph_id, plan, elapsed, predicted_peak=_safe_peak(fw, bw, hints),
                                joint=joint, graphs=(fw, bw))


def partition_joint(joint: JointGraph, config: RematConfig, graph_id: int = 0,
                    return_plan: bool = False):
    """Plans and applies: returns (fw, bw, report[, plan]). Raises what planning or rewriting
    raises."""
    start = time.perf_counter()
    planned = plan(joint, config)
    fw, bw = rewrite(joint, planned.plan)
    elapsed = time.perf_counter() - start
    peak = _safe_peak(fw, bw, planned.plan.hints)
    report = build_report(graph_id, planned.plan, elapsed, predicted_peak=peak, joint=joint,
                          graphs=(fw, bw))
    note = stages.in_flight_note(config, report.saved_bytes, peak)
    if note:
        report = dataclasses.replace(report, notes=report.notes + (note,))
    return (fw, bw, report, planned.plan) if return_plan else (fw, bw, report)


def _safe_peak(fw, bw, hints=None) -> int | None:
    """The simulated peak for the report (under the plan's size hints, so data-dependent
    sizes get the values the plan assumed); a simulation failure never fails the partition:
    the report says "no prediction" (None) instead."""
    try:
        return predict_peak(fw, bw, hints)
    except Exception as exc:  # noqa: BLE001 - informative only
        log.warning("ckptfx: peak simulation failed (%s: %s); report has no predicted peak",
                    type(exc).__name__, exc)
        return None

