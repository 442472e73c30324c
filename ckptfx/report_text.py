"""The text of a RematReport (``str(report)``): header, notes, formula, timeline peaks, and one
row per saved or recomputed value with its module, source line and reason.

Saved values of 0 bytes (parameters, sizes: kept anyway) are folded into one line; the
largest rows come first, up to :data:`MAX_ROWS` of each kind. Also the helpers the report,
the timeline and the frontier share: :func:`short_module`, :func:`pyplot`.
"""

from __future__ import annotations

MAX_ROWS = 25


def size(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps the figure at or above 1 (B, KiB, MiB,
    GiB)."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _cut(text: str, width: int) -> str:
    return text if len(text) < width else text[: width - 2] + "…"


def _header(r) -> list[str]:
    lines = [
        f"ckptfx graph {r.graph_id}: solver={r.solver}"
        + (f" (fallback: {r.fallback})" if r.fallback else "")
        + ("" if r.feasible else " (budget NOT met: closest plan)"),
        f"  saved for backward: {size(r.saved_bytes)} "
        f"(no recompute: {size(r.saved_bytes_no_remat)}"
        + (f", budget {size(r.budget_bytes)}" if r.budget_bytes is not None else "")
        + ")",
        f"  recomputed: {len(r.recomputed)} ops, {r.extra_flops / 1e6:.2f} MFLOP, "
        f"~{r.extra_cost_s * 1e3:.3f} ms (cost model)",
        f"  solve {r.solve_time_s * 1e3:.1f} ms, plan+rewrite {r.plan_time_s * 1e3:.1f} ms"
        + (f", {r.gap:.1%} above the LP-relaxation bound (not proven optimal)"
           if r.gap and not any("optimal" in n for n in r.notes) else "")
        + (f", predicted peak {size(r.predicted_peak_bytes)}"
           if r.predicted_peak_bytes is not None else ""),
    ]
    if r.formula is not None:
        names = ", ".join(f"{n} = {src}" for n, src in r.formula.symbols)
        lines += [f"  formula ({names}):",
                  f"    saved = {r.formula.saved} bytes",
                  f"    peak  = {r.formula.peak} bytes (at the traced sizes' peak op)"]
    if r.timeline is not None:
        lines.append("  memory timeline, peak of the step:")
        for c in r.timeline.curves:
            lines.append(f"    {c.name:<16}{size(c.peak_bytes):>11}  {c.peak_label}")
    lines += [f"  note: {n}" for n in r.notes]
    return lines


def _saved_rows(r) -> list[str]:
    rows = [s for s in r.saved if s.nbytes > 0]
    zero = [s for s in r.saved if s.nbytes <= 0]
    lines = []
    if rows:
        lines.append(f"  {'saved':<22}{'op':<24}{'module':<26}{'KiB':>9}  "
                     f"{'source':<24}reason")
    for s in sorted(rows, key=lambda s: -s.nbytes)[:MAX_ROWS]:
        reason = s.reason + (f"; {s.detail}" if s.detail else "")
        lines.append(f"  {_cut(s.name, 22):<22}{_cut(s.op, 24):<24}"
                     f"{_cut(short_module(s.module) or '-', 26):<26}{s.nbytes / 1024:>9.1f}  "
                     f"{_cut(s.source or '-', 24):<24}{reason}")
    if len(rows) > MAX_ROWS:
        lines.append(f"  ... {len(rows) - MAX_ROWS} more saved values")
    if zero:
        names = ", ".join(s.name for s in zero[:6]) + (" ..." if len(zero) > 6 else "")
        lines.append(f"  + {len(zero)} saved value{'s' if len(zero) > 1 else ''} of 0 bytes "
                     f"(parameters, their views, sizes: resident anyway): {names}")
    return lines


def _recomputed_rows(r) -> list[str]:
    if not r.recomputed:
        return []
    lines = [f"  {'recomputed':<22}{'op':<24}{'module':<26}{'MFLOP':>9}  {'source':<24}reason"]
    for x in sorted(r.recomputed, key=lambda x: (-x.cost_s, -x.flops))[:MAX_ROWS]:
        reason = x.reason + (f"; {x.detail}" if x.detail else "")
        lines.append(f"  {_cut(x.name, 22):<22}{_cut(x.op, 24):<24}"
                     f"{_cut(short_module(x.module) or '-', 26):<26}{x.flops / 1e6:>9.2f}  "
                     f"{_cut(x.source or '-', 24):<24}{reason}")
    if len(r.recomputed) > MAX_ROWS:
        lines.append(f"  ... {len(r.recomputed) - MAX_ROWS} more recomputed ops")
    return lines


def render(report) -> str:
    """The report as text (see the module docstring)."""
    return "\n".join(_header(report) + _saved_rows(report) + _recomputed_rows(report))


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


def short_module(path: str) -> str:
    """A module path without Dynamo's root prefix (``L['self'].``, ``L['args'][0].``)."""
    import re

    return re.sub(r"^L\[[^\]]*\](\[\d+\])*\.?", "", path)
