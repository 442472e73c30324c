"""The memory/compute Pareto frontier of one joint graph: a budget sweep.

For each budget the budget solver plans, the plan is applied, and the emitted graphs' peak is
simulated (:mod:`ckptfx.memory`). Rows: (budget, budget bytes, saved bytes, predicted peak
bytes, extra FLOPs, extra cost seconds, feasible).

Example:
    >>> import torch, ckptfx
    >>> x = torch.randn(128, 128, requires_grad=True)
    >>> joint = ckptfx.trace_joint(lambda x: x.sin().exp().tanh().sum(), x)
    >>> rows = ckptfx.pareto(joint, budgets=(1.0, 0.0))
    >>> rows[0].saved_bytes >= rows[1].saved_bytes
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from ckptfx.config import RematConfig, parse_budget
from ckptfx.joint import JointGraph

DEFAULT_BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


@dataclasses.dataclass(frozen=True)
class FrontierRow:
    """One point: the budget asked, what the plan keeps (bytes) and what it costs (FLOPs, s)."""

    budget: str
    budget_bytes: int | None
    saved_bytes: int
    predicted_peak_bytes: int | None
    extra_flops: int
    extra_cost_s: float
    feasible: bool


def pareto(joint: JointGraph, budgets: Sequence[float | int | str] = DEFAULT_BUDGETS,
           config: RematConfig | None = None,
           progress: Callable[[int, int, str], None] | None = None) -> list[FrontierRow]:
    """Sweeps memory budgets over one joint graph.

    Args:
        joint: the joint graph (``ckptfx.trace_joint``).
        budgets: memory_budget values (fractions, bytes or size strings), in any order.
        config: base options (``memory_budget`` is replaced by each budget; peak budgets by
            default, whose candidates are simulated once for the whole sweep).
        progress: called as ``progress(i, n, budget)`` before the i-th of n budgets is solved.

    Returns:
        One FrontierRow per budget, in the order given.

    Raises:
        ConfigError: a budget value is invalid.
    """
    from ckptfx.pipeline import apply_plan, plan_budgets

    base = RematConfig.coerce(config) if config is not None else RematConfig()
    base = dataclasses.replace(base, strict=False)
    parsed = [parse_budget(b) for b in budgets]  # every value checked before any work
    if progress is not None and parsed:
        progress(0, len(parsed), f"{parsed[0]} (the candidates of all budgets simulated once)")
    rows = []
    for k, (budget, planned) in enumerate(zip(parsed, plan_budgets(joint, base, parsed))):
        if progress is not None and k:
            progress(k, len(parsed), str(budget))
        plan = planned.plan
        _, _, report = apply_plan(joint, plan)
        rows.append(FrontierRow(
            budget=str(budget), budget_bytes=plan.budget_bytes,
            saved_bytes=plan.saved_bytes, predicted_peak_bytes=report.predicted_peak_bytes,
            extra_flops=report.extra_flops, extra_cost_s=report.extra_cost_s,
            feasible=plan.feasible))
    return rows


def format_frontier(rows: Sequence[FrontierRow]) -> str:
    """The frontier as a text table (MiB, MFLOP, ms)."""
    mib = 2 ** 20
    head = f"{'budget':>8}{'budget MiB':>12}{'saved MiB':>11}{'peak MiB':>10}{'extra MFLOP':>13}{'extra ms':>10}  feasible"
    lines = [head, "-" * len(head)]
    for r in rows:
        bb = f"{r.budget_bytes / mib:.2f}" if r.budget_bytes is not None else "-"
        pk = f"{r.predicted_peak_bytes / mib:.2f}" if r.predicted_peak_bytes is not None else "-"
        lines.append(f"{r.budget:>8}{bb:>12}{r.saved_bytes / mib:>11.2f}{pk:>10}"
                     f"{r.extra_flops / 1e6:>13.2f}{r.extra_cost_s * 1e3:>10.3f}  {r.feasible}")
    return "\n".join(lines)


def plot_frontier(rows: Sequence[FrontierRow], path: str | None = None):
    """Predicted peak and saved bytes against extra FLOPs (matplotlib; returns the Figure)."""
    from ckptfx.report_text import pyplot

    plt = pyplot()
    mib = 2 ** 20
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r.extra_flops / 1e6 for r in rows]
    ax.plot(xs, [r.saved_bytes / mib for r in rows], "o-", label="saved for backward")
    if all(r.predicted_peak_bytes is not None for r in rows):
        ax.plot(xs, [r.predicted_peak_bytes / mib for r in rows], "s-", label="predicted peak")
    for r, x in zip(rows, xs):
        ax.annotate(r.budget, (x, r.saved_bytes / mib), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("extra recompute work (MFLOP)")
    ax.set_ylabel("MiB")
    ax.set_title("memory budget sweep")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
