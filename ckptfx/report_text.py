"""The text of a RematReport (``str(report)``): header, notes, formula, timeline peaks, and one
row per saved or recomputed value with its module, source line and reason.

Saved values of 0 bytes (parameters, sizes: kept anyway) are folded into one line; the
largest rows come first, up to :data:`MAX_ROWS` of each kind. Bytes and FLOPs are shown in the
unit their magnitude calls for (:func:`size`, :func:`flops`). Also the helpers the report,
the timeline and the frontier share: :func:`user_path`, :func:`readable_source`,
:func:`byte_unit`, :func:`pyplot`.
"""

from __future__ import annotations

import re

MAX_ROWS = 25
_BYTE_UNITS = (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10))

SAVED_COUNTS = "activations, inputs and sizes the backward reads; parameters not counted"
PEAK_COUNTS = "live bytes of the step; parameters and inputs not counted"


def byte_unit(nbytes: float) -> tuple[str, int]:
    """(unit, bytes per unit): the largest binary unit (B, KiB, MiB, GiB) that keeps
    ``nbytes`` at or above 1."""
    for unit, scale in _BYTE_UNITS:
        if abs(nbytes) >= scale:
            return unit, scale
    return "B", 1


def size(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps the figure at or above 1 (``512 B``,
    ``1.50 KiB``, ``87.74 MiB``, ``2.00 GiB``)."""
    unit, scale = byte_unit(nbytes)
    return f"{int(nbytes)} B" if scale == 1 else f"{nbytes / scale:.2f} {unit}"


def flops(n: float) -> str:
    """FLOPs in the largest decimal unit that keeps the figure at or above 1 (``640 FLOP``,
    ``2.91 MFLOP``)."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} FLOP"


def _cut(text: str, width: int) -> str:
    return text if len(text) < width else text[: width - 2] + "…"


def budget_words(r) -> str:
    """What the report's budget bounds, in a few words: ``saved bytes <= 1.00 MiB``,
    ``peak <= 4.00 MiB`` or ``none``."""
    if r.budget_bytes is None:
        return "none"
    what = "peak" if r.budget_kind == "peak" else "saved bytes"
    return f"{what} <= {size(r.budget_bytes)}"


def _budget_on(r, kind: str) -> str:
    """``, budget X`` on the line of the figure the budget bounds, else ""."""
    if r.budget_bytes is None or (r.budget_kind or "saved") != kind:
        return ""
    met = "" if r.feasible else " NOT met"
    return f", budget {size(r.budget_bytes)}{met}"


def _header(r) -> list[str]:
    lines = [
        f"ckptfx graph {r.graph_id}: policy={r.policy or 'none'}, solver={r.solver}, "
        f"budget={budget_words(r)}"
        + (f" (fallback: {r.fallback})" if r.fallback else "")
        + ("" if r.feasible else " (budget NOT met: closest plan)"),
        f"  saved for backward: {size(r.saved_bytes)}{_budget_on(r, 'saved')} "
        f"(no recompute: {size(r.saved_bytes_no_remat)}; {SAVED_COUNTS})",
    ]
    if r.predicted_peak_bytes is not None:
        lines.append(f"  predicted peak: {size(r.predicted_peak_bytes)}{_budget_on(r, 'peak')} "
                     f"({PEAK_COUNTS})")
    elif r.budget_kind == "peak" and r.budget_bytes is not None:
        lines.append(f"  predicted peak: unknown{_budget_on(r, 'peak')}")
    lines += [
        f"  recomputed: {len(r.recomputed)} ops, {flops(r.extra_flops)}, "
        f"~{r.extra_cost_s * 1e3:.3f} ms (cost model)",
        f"  solve {r.solve_time_s * 1e3:.1f} ms, plan+rewrite {r.plan_time_s * 1e3:.1f} ms"
        + (f", {r.gap:.1%} above the LP-relaxation bound (not proven optimal)"
           if r.gap and not any("optimal" in n for n in r.notes) else ""),
    ]
    if r.formula is not None:
        names = ", ".join(f"{n} = {src}" for n, src in r.formula.symbols)
        lines += [f"  formula ({names}):",
                  f"    saved = {r.formula.saved} bytes (counted as the saved line above)",
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
        lines.append(f"  {'saved':<22}{'op':<24}{'module':<26}{'bytes':>11}  "
                     f"{'source':<24}reason")
    for s in sorted(rows, key=lambda s: -s.nbytes)[:MAX_ROWS]:
        reason = s.reason + (f"; {s.detail}" if s.detail else "")
        lines.append(f"  {_cut(s.name, 22):<22}{_cut(s.op, 24):<24}"
                     f"{_cut(user_path(s.module) or '-', 26):<26}{size(s.nbytes):>11}  "
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
    lines = [f"  {'recomputed':<22}{'op':<24}{'module':<26}{'work':>11}  {'source':<24}reason"]
    for x in sorted(r.recomputed, key=lambda x: (-x.cost_s, -x.flops))[:MAX_ROWS]:
        reason = x.reason + (f"; {x.detail}" if x.detail else "")
        lines.append(f"  {_cut(x.name, 22):<22}{_cut(x.op, 24):<24}"
                     f"{_cut(user_path(x.module) or '-', 26):<26}{flops(x.flops):>11}  "
                     f"{_cut(x.source or '-', 24):<24}{reason}")
    if len(r.recomputed) > MAX_ROWS:
        lines.append(f"  ... {len(r.recomputed) - MAX_ROWS} more recomputed ops")
    return lines


def render(report) -> str:
    """The report as text (see the module docstring)."""
    return "\n".join(_header(report) + _saved_rows(report) + _recomputed_rows(report))


def policy_name(policy) -> str:
    """A policy option in a few words: a built-in's name, a policy object's class name, a
    function's name ("" for None)."""
    if policy is None:
        return ""
    if isinstance(policy, str):
        return policy
    name = getattr(policy, "__name__", None) or type(policy).__name__
    return "a custom function" if name == "<lambda>" else name


def frontier_table(rows) -> str:
    """A budget sweep (:func:`ckptfx.frontier.pareto`) as a text table, bytes and FLOPs in
    the unit their magnitude calls for."""
    head = (f"{'budget':>8}{'budget bytes':>14}{'saved':>12}{'peak':>12}{'extra work':>14}"
            f"{'extra ms':>10}  feasible")
    lines = [head, "-" * len(head)]
    for r in rows:
        bb = size(r.budget_bytes) if r.budget_bytes is not None else "-"
        pk = size(r.predicted_peak_bytes) if r.predicted_peak_bytes is not None else "-"
        lines.append(f"{r.budget:>8}{bb:>14}{size(r.saved_bytes):>12}{pk:>12}"
                     f"{flops(r.extra_flops):>14}{r.extra_cost_s * 1e3:>10.3f}  {r.feasible}")
    return "\n".join(lines)


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


_ROOT = re.compile(r"^[LG]\['(\w+)'\]((?:\[\d+\])*)")


def user_path(path: str) -> str:
    """A module path as the user writes it (``model.named_modules()``): Dynamo's root
    (``L['self'].``, ``L['args'][0].``, ``L['fn'].``) dropped, ``._modules['h']`` and
    ``[3]`` written ``.h`` and ``.3``: ``L['self']._modules['h']._modules['3'].attn`` ->
    ``h.3.attn``."""
    path = _ROOT.sub("", path or "")
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]|\['([^']*)'\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return re.sub(r"\.{2,}", ".", path).strip(".")


def readable_source(source: str) -> str:
    """A Dynamo source as the user's code names it: ``L['ids'].size()[1]`` -> ``ids.shape[1]``,
    ``L['kwargs']['input_ids'].size()[0]`` -> ``input_ids.shape[0]``, ``L['args'][0]`` ->
    ``args[0]``, ``L['logits_to_keep']`` -> ``logits_to_keep``, ``L['self']._modules['emb']
    .weight`` -> ``self.emb.weight``."""
    text = re.sub(r"^[LG]\['kwargs'\]\['(\w+)'\]", r"\1", source)
    text = re.sub(r"^[LG]\['(\w+)'\]", r"\1", text)
    text = re.sub(r"\._modules\['([^']*)'\]", r".\1", text)
    return re.sub(r"\.size\(\)\[(\d+)\]", r".shape[\1]", text)
