"""Memory timeline: live bytes through one training step, for three partitions of one graph.

``memory_timeline(joint, plan)`` simulates (:mod:`ckptfx.memory`) the forward then the
backward of

* ``this plan``: the ckptfx plan given;
* ``no recompute``: the plan that saves everything the backward reads;
* ``PyTorch min-cut``: torch.compile's own partitioner (``min_cut_rematerialization_partition``
  at its default budget) on the same joint graph,

and returns a :class:`Timeline`: one :class:`Curve` per partition (live bytes per op), each
peak with a few words on what is live there. :func:`plot_timeline` draws it (matplotlib).

Example:
    >>> import torch, ckptfx
    >>> from ckptfx.timeline import memory_timeline
    >>> x = torch.randn(64, 64, requires_grad=True)
    >>> joint = ckptfx.trace_joint(lambda x: x.sin().exp().tanh().sum(), x)
    >>> tl = memory_timeline(joint, ckptfx.plan_remat(joint))
    >>> [c.name for c in tl.curves]
    ['this plan', 'no recompute', 'PyTorch min-cut']
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("ckptfx")

THIS_PLAN, NO_RECOMPUTE, TORCH = "this plan", "no recompute", "PyTorch min-cut"


@dataclasses.dataclass(frozen=True)
class Curve:
    """Live bytes through one step under one partition.

    Attributes:
        name: the partition (``this plan``, ``no recompute``, ``PyTorch min-cut``).
        live_bytes: bytes live at each op, forward ops first, then backward ops.
        forward_ops: how many of the points belong to the forward.
        peak_bytes: the largest point, bytes.
        peak_index: the index of the (first) largest point.
        peak_label: what is live at the peak, in a few words.
        saved_bytes: bytes kept from forward to backward, bytes.
    """

    name: str
    live_bytes: tuple[int, ...]
    forward_ops: int
    peak_bytes: int
    peak_index: int
    peak_label: str
    saved_bytes: int


@dataclasses.dataclass(frozen=True)
class Timeline:
    """The curves of one joint graph and the budget line.

    Attributes:
        curves: one Curve per partition.
        budget_bytes: the plan's budget, bytes, or None.
        budget_kind: what the budget bounds: ``"saved"`` bytes or the ``"peak"``.
        plan_saved_bytes: what the plan keeps for the backward counted as a saved-bytes budget
            counts it (activations, inputs and sizes the backward reads), bytes, or None.
            A curve's ``saved_bytes`` leaves inputs out, as its live bytes do.
    """

    curves: tuple[Curve, ...]
    budget_bytes: int | None = None
    budget_kind: str = "saved"
    plan_saved_bytes: int | None = None

    def curve(self, name: str) -> Curve:
        """The curve named ``name``.

        Raises:
            KeyError: no such curve.
        """
        for c in self.curves:
            if c.name == name:
                return c
        raise KeyError(f"no curve {name!r}; curves: {[c.name for c in self.curves]}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Timeline":
        curves = tuple(Curve(**{**c, "live_bytes": tuple(c["live_bytes"])}) for c in d["curves"])
        return cls(curves, d.get("budget_bytes"), d.get("budget_kind", "saved"),
                   d.get("plan_saved_bytes"))


def curve_of(name: str, fw, bw, hints=None, meta: dict[str, dict] | None = None) -> Curve:
    """Simulates one forward/backward pair into a Curve (see :func:`ckptfx.memory.simulate`).

    Args:
        name: the curve's name.
        fw, bw: the forward and backward GraphModules (AOTAutograd's convention).
        hints: size hints for symbolic sizes.
        meta: joint-graph node name -> its ``meta`` (module paths for the peak label).
    """
    from ckptfx.memory import FORWARD, storage_timeline

    st = storage_timeline(fw, bw, hints)
    live = tuple(s.live_bytes for s in st.steps)
    n_fw = sum(1 for s in st.steps if s.graph is FORWARD)
    idx = max(range(len(live)), key=live.__getitem__, default=0)
    label = peak_label(st, idx, meta or {}) if live else ""
    return Curve(name, live, n_fw, live[idx] if live else 0, idx, label, st.saved_bytes)


def peak_label(st, idx: int, meta: dict[str, dict]) -> str:
    """A few words on what is live at step ``idx``: the graph and op running, how many
    tensors (how many kept from the forward, how many are gradients), and the largest of
    them with its module."""
    from ckptfx.memory import BACKWARD, FORWARD
    from ckptfx.report_text import size, user_path

    step = st.steps[idx]
    live = [k for k in st.live[idx] if st.nbytes[k] > 0]
    saved = [k for k in live if k[0] is FORWARD] if step.graph is BACKWARD else []
    largest = max(live, key=lambda k: st.nbytes[k], default=None)
    n_grads = sum(1 for k in live if k in st.gradients)
    kinds = [f"{len(saved)} from the forward"] if saved else []
    kinds += [f"{n_grads} gradients"] if n_grads else []
    words = f"{step.graph.value} at {step.node}: {len(live)} tensors"
    if kinds:
        words += f" ({', '.join(kinds)})"
    if largest is not None:
        module = user_path(_module_path(meta.get(largest[1], {})))
        where = f" in {module}" if module else ""
        kind = " (a gradient)" if largest in st.gradients else ""
        words += f"; largest {largest[1]}{kind}{where}, {size(st.nbytes[largest])}"
    return words


def _module_path(meta: dict) -> str:
    stack = meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return last[0] if isinstance(last, tuple) else str(last)


def no_recompute_graphs(joint, config=None):
    """(fw, bw) of the plan that recomputes nothing: it saves every forward value the
    backward reads."""
    from ckptfx.config import RematConfig
    from ckptfx.passes.rewrite import rewrite
    from ckptfx.planner import prepare, to_plan
    from ckptfx.solvers.base import Solution, least_recompute_saved, saved_bytes

    problem = prepare(joint, RematConfig.coerce(config)).problem
    full = least_recompute_saved(problem)
    remat = to_plan(problem, Solution(full), "no-recompute", 0.0, saved_bytes(problem, full))
    return rewrite(joint, remat)


def torch_graphs(joint):
    """(fw, bw) of PyTorch's min-cut partitioner on a copy of the joint graph, or None
    when it fails (logged)."""
    from ckptfx import _torch_compat as compat

    import warnings

    with warnings.catch_warnings():  # deepcopy of pytree specs warns on some torch versions
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(joint.gm)
    try:
        return compat.torch_safe_partition(gm, joint.joint_inputs,
                                           num_fwd_outputs=joint.num_fwd_outputs)
    except Exception as exc:  # a reference curve only: the timeline goes on without it
        log.warning("ckptfx: PyTorch's partitioner failed on graph (%s: %s); the timeline "
                    "has no PyTorch curve", type(exc).__name__, exc)
        return None


def memory_timeline(joint, plan, config=None, graphs: Sequence[Any] | None = None) -> Timeline:
    """The Timeline of ``plan`` on ``joint`` next to no recompute and PyTorch's min-cut.

    Args:
        joint: the JointGraph.
        plan: the RematPlan (its ``budget_bytes`` draws the budget line).
        config: the options the plan was made with (size hints).
        graphs: the (fw, bw) already emitted for ``plan``; rebuilt when None.

    Returns:
        A Timeline with the three curves (two when PyTorch's partitioner fails).

    Raises:
        UnsupportedGraphError: the emitted graphs cannot be simulated.
    """
    from ckptfx.config import RematConfig
    from ckptfx.passes.rewrite import rewrite
    from ckptfx.planner import size_hints

    config = RematConfig.coerce(config)
    hints = plan.hints if plan.hints is not None else size_hints(joint, config)
    meta = {n.name: n.meta for n in joint.graph.nodes}
    fw, bw = graphs if graphs is not None else rewrite(joint, plan)
    curves = [curve_of(THIS_PLAN, fw, bw, hints, meta),
              curve_of(NO_RECOMPUTE, *no_recompute_graphs(joint, config), hints, meta)]
    theirs = torch_graphs(joint)
    if theirs is not None:
        curves.append(curve_of(TORCH, *theirs, hints, meta))
    kind = config.effective_budget_kind if plan.budget_bytes is not None else "saved"
    return Timeline(tuple(curves), plan.budget_bytes, kind, plan.saved_bytes)


def _budget_line(ax, timeline: Timeline, scale: int, unit: str) -> str:
    """Draws a peak budget as a horizontal line across the step, labelled on the plot and in
    the legend. A saved-bytes budget bounds what the forward keeps for the backward, not the
    live bytes drawn here, so it is not drawn on this axis: the caption it returns says so."""
    from ckptfx.report_text import size

    if timeline.budget_kind == "peak":
        y = timeline.budget_bytes / scale
        ax.axhline(y, color="tab:red", lw=1.2, ls=":",
                   label=f"peak budget {size(timeline.budget_bytes)}")
        ax.annotate(f"peak budget {size(timeline.budget_bytes)}", (0.0, y), xytext=(2, 3),
                    textcoords="offset points", ha="left", va="bottom", color="tab:red",
                    fontsize=8)  # at the left: the peaks, labelled on the right, are late
        return ""
    kept = (f" (this plan keeps {size(timeline.plan_saved_bytes)})"
            if timeline.plan_saved_bytes is not None else "")
    return (f"saved-bytes budget {size(timeline.budget_bytes)}: bounds what the forward keeps "
            f"for the backward{kept}, not the live bytes above, so it is not drawn on this axis")


def aligned_x(curve: Curve) -> list[float]:
    """x of each point: forward ops spread over [0, 1), backward ops over [1, 2], so that
    curves with different op counts line up at the start of the backward."""
    n_fw, n = curve.forward_ops, len(curve.live_bytes)
    n_bw = n - n_fw
    return [j / max(1, n_fw) if j < n_fw else 1 + (j - n_fw) / max(1, n_bw - 1)
            for j in range(n)]


def _mark_peaks(ax, timeline: Timeline, scale: int, styles: dict) -> None:
    """Marks each curve's peak with a dot and a numbered label; the labels are stacked in the
    free band above the curves, each with an arrow to its peak, so they never overlap."""
    from ckptfx.report_text import size

    for i, c in enumerate(timeline.curves):
        if not c.live_bytes:
            continue
        color = styles.get(c.name, (None, "-"))[0]
        x, y = aligned_x(c)[c.peak_index], c.peak_bytes / scale
        ax.plot([x], [y], "o", color=color, ms=max(4, 9 - 2 * i), zorder=3 + i)  # stacked
        # dots at one point stay visible: each later one smaller, on top
        ax.annotate(f"({i + 1}) {c.name} peak {size(c.peak_bytes)}", (x, y),
                    xytext=(0.985, 0.965 - 0.065 * i), textcoords="axes fraction", ha="right",
                    va="top", fontsize=8.5, color=color, fontweight="bold",
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "lw": 0.8},
                    arrowprops={"arrowstyle": "->", "color": color, "lw": 0.9,
                                "shrinkA": 2, "shrinkB": 4})


def plot_timeline(timeline: Timeline, path: str | None = None, title: str = ""):
    """Draws live bytes against the step's ops (forward, then backward), one line per curve,
    in the unit the largest figure calls for (B, KiB, MiB, GiB); a peak budget as a labelled
    horizontal line (a saved-bytes budget, which bounds no point of these curves, in a caption);
    each peak marked and labelled, with what is live there in the captions.

    Args:
        timeline: the Timeline.
        path: where to write the figure (.png/.pdf/.svg); None only returns it.
        title: the figure's title.

    Returns:
        The matplotlib Figure.
    """
    from ckptfx.report_text import byte_unit, pyplot, size

    plt = pyplot()
    top = max([c.peak_bytes for c in timeline.curves] + [timeline.budget_bytes or 0
               if timeline.budget_kind == "peak" else 0] + [1])
    unit, scale = byte_unit(top)
    fig, ax = plt.subplots(figsize=(11, 6.5))
    styles = {THIS_PLAN: ("tab:blue", "-"), NO_RECOMPUTE: ("tab:gray", "--"),
              TORCH: ("tab:orange", "-.")}
    captions = []
    for i, c in enumerate(timeline.curves):
        color, ls = styles.get(c.name, (None, "-"))
        ax.plot(aligned_x(c), [b / scale for b in c.live_bytes], ls, color=color, lw=1.4,
                label=f"{c.name}: peak {size(c.peak_bytes)}")
        captions.append((f"({i + 1}) {c.name} peak, {size(c.peak_bytes)}: {c.peak_label}",
                         color))
    _mark_peaks(ax, timeline, scale, styles)
    if timeline.budget_bytes is not None:
        note = _budget_line(ax, timeline, scale, unit)
        if note:
            captions.append((note, "tab:red"))
    ax.axvline(1.0, color="black", lw=0.6, ls=":")
    ax.set_xticks([0, 0.5, 1, 1.5, 2], ["forward starts", "", "backward starts", "", "step ends"])
    ax.set_xlim(-0.02, 2.02)
    ax.set_xlabel("one training step: each curve's forward ops spread over 0..1, its backward "
                  "ops over 1..2")
    ax.set_ylabel(f"live {unit} (parameters and inputs not counted)")
    ax.set_ylim(0, top / scale * (1.2 + 0.065 * len(timeline.curves)))
    ax.set_title(title or "memory through one training step")
    ax.legend(loc="upper left", fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.96, top=0.93, bottom=0.1 + 0.035 * len(captions))
    for j, (text, color) in enumerate(captions):
        fig.text(0.07, 0.015 + 0.03 * (len(captions) - 1 - j), text, fontsize=8, color=color)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
