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
    """A saved value.

    Attributes:
        name: the joint-graph node.
        op: its op.
        nbytes: bytes it counts against the budget (0: a parameter or a size).
        module: the module path that produced it ("" if the graph has none).
        reason: why it is saved.
        source: ``file.py:line`` of the code that produced it ("" if unknown).
        detail: what sets it apart: which backward ops read it, or why it may not be
            recomputed.
    """

    name: str
    op: str
    nbytes: int
    module: str
    reason: str
    source: str = ""
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class RecomputedValue:
    """A recomputed forward node: FLOPs and cost-model seconds of one recompute, module,
    reason, source line and what it is recomputed from (``detail``)."""

    name: str
    op: str
    flops: int
    cost_s: float
    module: str
    reason: str
    source: str = ""
    detail: str = ""


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
        formula: saved bytes and peak as expressions in the input sizes (graphs with
            symbolic sizes), or None; see :meth:`evaluate`.
        timeline: live bytes through the step for this plan, no recompute and PyTorch's
            partitioner (:func:`ckptfx.timeline.memory_timeline`), or None.
        policy: the policy the plan was made under ("" for none or a hand-built plan).
        budget_kind: what ``budget_bytes`` bounds: ``"saved"`` bytes or the ``"peak"`` (""
            without a budget).

    ``saved_bytes`` counts activations and the inputs and sizes the backward reads, not
    parameters (as the budget counts them); ``formula.saved`` counts the same.
    ``predicted_peak_bytes`` and the timeline count neither parameters nor inputs.
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
    formula: Any = None
    timeline: Any = None
    policy: str = ""
    budget_kind: str = ""

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
        """Plain data (JSON-serialisable): every field, plus ``gap``; the formula and the
        timeline as nested dicts. :meth:`from_dict` reads it back."""
        d = dataclasses.asdict(self)
        d["gap"] = self.gap
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RematReport":
        """The report :meth:`to_dict` wrote (also after a JSON round trip)."""
        from ckptfx.formula import SizeFormula
        from ckptfx.timeline import Timeline

        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["saved"] = tuple(SavedValue(**v) for v in d.get("saved", ()))
        kw["recomputed"] = tuple(RecomputedValue(**v) for v in d.get("recomputed", ()))
        kw["notes"] = tuple(d.get("notes", ()))
        if d.get("formula") is not None:
            kw["formula"] = SizeFormula.from_dict(d["formula"])
        if d.get("timeline") is not None:
            kw["timeline"] = Timeline.from_dict(d["timeline"])
        return cls(**kw)

    def evaluate(self, **sizes: int):
        """Saved and predicted peak bytes at other input sizes, from :attr:`formula`
        (``report.evaluate(batch=16, seq=8192).saved_bytes``).

        Raises:
            ConfigError: the graph had static sizes (compile with ``dynamic=True`` or
                ``torch._dynamo.mark_dynamic``), or an unknown size name.
        """
        if self.formula is None:
            from ckptfx.errors import ConfigError

            raise ConfigError(
                f"graph {self.graph_id} has no size formula: its sizes were static; compile "
                f"with dynamic=True or torch._dynamo.mark_dynamic(x, dim) to get one")
        return self.formula.evaluate(**sizes)

    def summary(self) -> str:
        """One line: policy, solver, budget, saved and peak bytes, recomputed ops."""
        from ckptfx.report_text import budget_words, size

        peak = (f", predicted peak {size(self.predicted_peak_bytes)}"
                if self.predicted_peak_bytes is not None else "")
        fb = f" (fallback: {self.fallback})" if self.fallback else ""
        return (f"ckptfx graph {self.graph_id}: policy={self.policy or 'none'}, "
                f"solver={self.solver}, budget={budget_words(self)}{fb}, saved "
                f"{size(self.saved_bytes)} of {size(self.saved_bytes_no_remat)}"
                f"{peak}, {len(self.recomputed)} ops recomputed")

    def __str__(self) -> str:
        from ckptfx.report_text import render

        return render(self)

    def plot(self, path: str | None = None):
        """Bar charts of saved bytes per module (per op when the graph has no module paths)
        and recompute work per op.

        Args:
            path: where to write a PNG; None returns the figure without writing.

        Returns:
            The matplotlib Figure.
        """
        from ckptfx.report_text import byte_unit, flops, pyplot, size, user_path

        plt = pyplot()

        def group(items, key, value):
            out: dict[str, float] = {}
            for it in items:
                out[key(it) or "(top level)"] = out.get(key(it) or "(top level)", 0) + value(it)
            return sorted(out.items(), key=lambda kv: -kv[1])[:20]

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
        by_module = any(s.module for s in self.saved)  # graphs traced without Dynamo have none
        unit, scale = byte_unit(max([s.nbytes for s in self.saved] + [1]))
        saved = group(self.saved, lambda s: user_path(s.module) if by_module else s.op,
                      lambda s: s.nbytes / scale)
        ax1.barh([k for k, _ in saved][::-1], [v for _, v in saved][::-1], color="tab:blue")
        ax1.set_xlabel(f"saved for backward ({unit}), by {'module' if by_module else 'op'}")
        ax1.set_title(f"saved: {size(self.saved_bytes)} of {size(self.saved_bytes_no_remat)}")
        rec = group(self.recomputed, lambda r: r.op, lambda r: r.flops / 1e6)
        ax2.barh([k for k, _ in rec][::-1], [v for _, v in rec][::-1], color="tab:orange")
        ax2.set_xlabel("recompute work (MFLOP)")
        ax2.set_title(f"recomputed: {len(self.recomputed)} ops, {flops(self.extra_flops)}")
        from ckptfx.report_text import budget_words

        fig.suptitle(f"ckptfx graph {self.graph_id}: policy={self.policy or 'none'}, "
                     f"solver={self.solver}, budget={budget_words(self)}")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig


def build_report(graph_id: int, plan, plan_time_s: float,
                 predicted_peak: int | None = None, fallback: str = "", *,
                 joint=None, graphs=None) -> RematReport:
    """Builds a RematReport from a RematPlan alone: its decisions carry the op, module path,
    FLOPs, cost, source line and detail of every value (a hand-built decision without an op
    shows the node's name).

    Args:
        graph_id: the graph's running number.
        plan: the RematPlan.
        plan_time_s: seconds spent planning and rewriting.
        predicted_peak: the simulated peak, bytes.
        fallback: why the pass fell back ("" if it did not).
        joint: the JointGraph: with ``graphs`` and symbolic sizes, the formula (optional).
        graphs: the emitted (fw, bw) (optional).
    """
    from ckptfx.report_text import policy_name, user_path

    def value(name: str, kind):
        d = plan.decisions[name]
        module = user_path(d.module)  # as the user writes it, not Dynamo's L['self'].x
        if kind is SavedValue:
            return SavedValue(name, d.op or name, d.nbytes, module, d.reason, d.source,
                              d.detail)
        return RecomputedValue(name, d.op or name, d.flops, d.cost_s, module, d.reason,
                               d.source, d.detail)

    saved = tuple(value(s, SavedValue) for s in plan.saved)
    recomputed = tuple(value(r, RecomputedValue) for r in plan.recomputed)
    return RematReport(
        graph_id=graph_id, solver=plan.solver, saved=saved, recomputed=recomputed,
        saved_bytes_no_remat=plan.no_remat_bytes, saved_bytes=plan.saved_bytes,
        budget_bytes=plan.budget_bytes, extra_flops=sum(r.flops for r in recomputed),
        extra_cost_s=sum(r.cost_s for r in recomputed), solve_time_s=plan.solve_time_s,
        plan_time_s=plan_time_s, objective=plan.objective, lower_bound=plan.lower_bound,
        predicted_peak_bytes=predicted_peak, feasible=plan.feasible, fallback=fallback,
        notes=plan.notes + _module_note(plan), formula=_formula(joint, graphs, plan),
        policy=policy_name(getattr(plan.config, "policy", None)),
        budget_kind=(plan.config.effective_budget_kind
                     if plan.budget_bytes is not None and plan.config is not None
                     else "saved" if plan.budget_bytes is not None else ""))


def _module_note(plan) -> tuple[str, ...]:
    if any(d.module for d in plan.decisions.values()):
        return ()
    return ("the graph carries no module paths (ops outside every module, such as a loss, "
            "or a graph traced without Dynamo): module-based policies (megatron_selective, "
            "save_modules) cannot act on it; repeated blocks are found from its structure",)


def _saved_expr(joint, plan):
    """The plan's saved bytes as an expression in the size symbols, counted as the plan
    counts them: each saved value with bytes (a parameter counts 0), its value's bytes."""
    import sympy

    from ckptfx.analysis.sizes import value_bytes

    nodes = {n.name: n for n in joint.graph.nodes}
    terms = []
    for name in plan.saved:
        d = plan.decisions[name]
        if d.nbytes <= 0:
            continue
        val = nodes[name].meta.get("val") if name in nodes else None
        expr = value_bytes(val) if val is not None else sympy.Integer(d.nbytes)
        terms.append(expr if plan.hints is None or plan.hints.evaluate(expr) == d.nbytes
                     else sympy.Integer(d.nbytes))  # counted otherwise by the plan: its bytes
    return sympy.Add(*terms) if terms else sympy.Integer(0)


def _formula(joint, graphs, plan):
    """The SizeFormula of the emitted graphs when their sizes are symbolic, else None (a
    failure is logged, never raised: the report is informative)."""
    if joint is None or graphs is None:
        return None
    hints = plan.hints
    from ckptfx import _torch_compat as compat

    shape_env = compat.shape_env_of(joint.graph)
    if shape_env is None:
        return None
    import logging

    from ckptfx.formula import size_formula
    from ckptfx.memory import storage_timeline

    try:
        return size_formula(storage_timeline(*graphs, hints), shape_env, hints,
                            saved_expr=_saved_expr(joint, plan))
    except Exception as exc:  # informative only
        logging.getLogger("ckptfx").debug("ckptfx: no size formula (%s: %s)",
                                          type(exc).__name__, exc)
        return None
