"""RematReport: what one compiled graph saves, what it recomputes, why, and at what cost.

``str(report)`` is a table for humans; ``to_dict()`` is plain data for tools and tests;
``plot(path)`` draws saved bytes per value and the recompute cost (matplotlib, imported only
there).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class SavedValue:
    """A saved value: name, op, bytes, module path, reason."""

    name: str
    op: str
    nbytes: int
    module: str
    reason: str


@dataclasses.dataclass(frozen=True)
class RecomputedValue:
    """A recomputed forward node: name, op, FLOPs and cost-model seconds of one recompute."""

    name: str
    op: str
    flops: int
    cost_s: float
    module: str
    reason: str


@dataclasses.dataclass(frozen=True)
class RematReport:
    """Report of one partitioned joint graph.

    Attributes:
        graph_id: a running number of the graph within its backend.
        solver: the solver that made the plan ("torch-fallback" when the pass fell back).
        saved: the saved values (bytes each).
        recomputed: the recomputed nodes (FLOPs each).
        saved_bytes_no_remat: bytes saved by the plan that recomputes nothing (bytes).
        saved_bytes: bytes saved by this plan (bytes).
        budget_bytes: the budget asked for, bytes, or None.
        extra_flops: FLOPs added to the backward by recomputation.
        extra_cost_s: cost-model seconds added by recomputation.
        solve_time_s: seconds in the solver; plan_time_s: whole planning + rewrite, seconds.
        lower_bound / objective: the solver's bound and objective (gap = objective - bound).
        predicted_peak_bytes: liveness-simulated peak of forward+backward, bytes, or None.
        feasible: whether the budget was met.
        fallback: why the pass fell back to PyTorch's partitioner ("" if it did not).
        notes: solver notes.
    """

    graph_id: int
    solver: str
    saved: tuple[SavedValue, ...] = ()
    recomputed: tuple[RecomputedValue, ...] = ()
    saved_bytes_no_remat: int = 0
    saved_bytes: int = 0
    budget_bytes: int | None = None
    extra_flops: int = 0
    extra_cost_s: float = 0.0
    solve_time_s: float = 0.0
    plan_time_s: float = 0.0
    objective: float = 0.0
    lower_bound: float | None = None
    predicted_peak_bytes: int | None = None
    feasible: bool = True
    fallback: str = ""
    notes: tuple[str, ...] = ()

    @property
    def gap(self) -> float | None:
        """(objective - lower bound) / objective, or None without a bound. For the budget
        MILP the bound is the LP relaxation's, so a proven-optimal plan can still show a gap;
        the min-cut's gap is 0."""
        if self.lower_bound is None:
            return None
        if self.objective == 0:
            return 0.0
        return max(0.0, (self.objective - self.lower_bound) / abs(self.objective))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gap"] = self.gap
        return d

    def __str__(self) -> str:
        mib = 2 ** 20
        lines = [
            f"ckptfx graph {self.graph_id}: solver={self.solver}"
            + (f" (fallback: {self.fallback})" if self.fallback else ""),
            f"  saved for backward: {self.saved_bytes / mib:.2f} MiB "
            f"(no recompute: {self.saved_bytes_no_remat / mib:.2f} MiB"
            + (f", budget {self.budget_bytes / mib:.2f} MiB" if self.budget_bytes is not None else "")
            + ")",
            f"  recomputed: {len(self.recomputed)} ops, {self.extra_flops / 1e6:.2f} MFLOP, "
            f"~{self.extra_cost_s * 1e3:.3f} ms (cost model)",
            f"  solve {self.solve_time_s * 1e3:.1f} ms, plan+rewrite {self.plan_time_s * 1e3:.1f} ms"
            + (f", {self.gap:.1%} above the LP-relaxation bound" if self.gap else "")
            + (f", predicted peak {self.predicted_peak_bytes / mib:.2f} MiB"
               if self.predicted_peak_bytes is not None else ""),
        ]
        if self.saved:
            lines.append(f"  {'saved':<28}{'op':<28}{'KiB':>10}  reason")
            for s in sorted(self.saved, key=lambda s: -s.nbytes)[:25]:
                lines.append(f"  {s.name:<28}{s.op[:27]:<28}{s.nbytes / 1024:>10.1f}  {s.reason}")
            if len(self.saved) > 25:
                lines.append(f"  ... {len(self.saved) - 25} more saved values")
        if self.recomputed:
            lines.append(f"  {'recomputed':<28}{'op':<28}{'MFLOP':>10}  reason")
            for r in sorted(self.recomputed, key=lambda r: -r.cost_s)[:25]:
                lines.append(f"  {r.name:<28}{r.op[:27]:<28}{r.flops / 1e6:>10.2f}  {r.reason}")
            if len(self.recomputed) > 25:
                lines.append(f"  ... {len(self.recomputed) - 25} more recomputed ops")
        return "\n".join(lines)

    def plot(self, path: str | None = None):
        """Bar charts of saved bytes per module (per op when the graph has no module paths)
        and recompute work per op.

        Args:
            path: where to write a PNG; None returns the figure without writing.

        Returns:
            The matplotlib Figure.
        """
        plt = pyplot()

        def group(items, key, value):
            out: dict[str, float] = {}
            for it in items:
                out[key(it) or "(top level)"] = out.get(key(it) or "(top level)", 0) + value(it)
            return sorted(out.items(), key=lambda kv: -kv[1])[:20]

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
        by_module = any(s.module for s in self.saved)  # graphs traced without Dynamo have none
        saved = group(self.saved, lambda s: _short_module(s.module) if by_module else s.op,
                      lambda s: s.nbytes / 2 ** 20)
        ax1.barh([k for k, _ in saved][::-1], [v for _, v in saved][::-1], color="tab:blue")
        ax1.set_xlabel(f"saved for backward (MiB), by {'module' if by_module else 'op'}")
        ax1.set_title(f"saved: {self.saved_bytes / 2**20:.1f} of "
                      f"{self.saved_bytes_no_remat / 2**20:.1f} MiB")
        rec = group(self.recomputed, lambda r: r.op, lambda r: r.flops / 1e6)
        ax2.barh([k for k, _ in rec][::-1], [v for _, v in rec][::-1], color="tab:orange")
        ax2.set_xlabel("recompute work (MFLOP)")
        ax2.set_title(f"recomputed: {len(self.recomputed)} ops, {self.extra_flops / 1e6:.1f} MFLOP")
        fig.suptitle(f"ckptfx graph {self.graph_id} ({self.solver})")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'ckptfx[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short_module(path: str) -> str:
    """A module path without Dynamo's ``L['self'].`` prefix."""
    for prefix in ("L['self'].", "L['self']"):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def build_report(graph_id: int, plan, table, plan_time_s: float,
                 predicted_peak: int | None = None, fallback: str = "") -> RematReport:
    """Builds a RematReport from a RematPlan and the NodeTable it was planned on."""
    saved = tuple(
        SavedValue(s, table[s].op_name, plan.decisions[s].nbytes, table[s].module_path,
                   plan.decisions[s].reason)
        for s in plan.saved)
    recomputed = tuple(
        RecomputedValue(r, table[r].op_name, table[r].flops, table[r].cost_s, table[r].module_path,
                        plan.decisions[r].reason)
        for r in plan.recomputed)
    return RematReport(
        graph_id=graph_id, solver=plan.solver, saved=saved, recomputed=recomputed,
        saved_bytes_no_remat=plan.no_remat_bytes, saved_bytes=plan.saved_bytes,
        budget_bytes=plan.budget_bytes, extra_flops=sum(r.flops for r in recomputed),
        extra_cost_s=sum(r.cost_s for r in recomputed), solve_time_s=plan.solve_time_s,
        plan_time_s=plan_time_s, objective=plan.objective, lower_bound=plan.lower_bound,
        predicted_peak_bytes=predicted_peak, feasible=plan.feasible, fallback=fallback,
        notes=plan.notes)
