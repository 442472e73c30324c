"""Formulas: saved bytes and the predicted peak as expressions in the input sizes.

Under ``torch.compile(..., dynamic=True)`` or ``torch._dynamo.mark_dynamic`` the graphs' sizes
are sympy symbols, and one plan serves every size. :func:`size_formula` turns the simulated
step (:func:`ckptfx.memory.storage_timeline`) into a :class:`SizeFormula`: the saved bytes and
the peak as simplified expressions, each symbol named after the input dimension Dynamo made
it for (Note [Symbol names]); ``SizeFormula.evaluate(batch=..., seq=...)`` gives bytes at other
sizes without compiling again.

Note [Symbol names]
    Dynamo records where each size symbol came from (``L['ids'].size()[1]``,
    ``L['kwargs']['input_ids'].size()[0]``, ``L['logits_to_keep']``); sources are shown as the
    user's code names them (``ids.shape[1]``, :func:`ckptfx.report_text.readable_source`).
    Dimension 0 of an input is named ``batch``, dimension 1 ``seq``, any other
    ``<input>_<dim>``; an int input keeps its own name (``logits_to_keep``); when two different
    symbols would get one name (two inputs with independent batch sizes), both take
    ``<input>_<dim>``. Other symbols keep Dynamo's name (``s3``).

Note [Peak formula]
    The peak is a maximum over the ops of the step, and which op peaks can change with the
    sizes. ``peak`` is the live bytes at the op that peaks at the traced sizes (exact there,
    and wherever that op stays the peak); ``evaluate`` takes the maximum over the ops at the
    local maxima of the traced curve (up to :data:`MAX_CANDIDATES`, dominated ones dropped),
    which is exact whenever the peak stays at one of those ops.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import sympy

from ckptfx.errors import ConfigError

MAX_CANDIDATES = 48
_SHAPE_RE = re.compile(r"^(\w+(?:\[\d+\])*)\.shape\[(\d+)\]$")
_DIM_NAMES = {0: "batch", 1: "seq"}


@dataclasses.dataclass(frozen=True)
class SizedBytes:
    """Bytes of a plan at given sizes: saved for the backward, and the predicted peak."""

    saved_bytes: int
    peak_bytes: int


@dataclasses.dataclass(frozen=True)
class SizeFormula:
    """Saved bytes and predicted peak of a plan as expressions in the input sizes.

    Attributes:
        saved: bytes saved for the backward (sympy text in the named symbols).
        peak: live bytes at the op that peaks at the traced sizes (Note [Peak formula]).
        peak_candidates: the expressions whose maximum is the peak at other sizes.
        symbols: ``(name, where it comes from)`` per symbol, e.g. ``("seq", "ids.shape[1]")``
            (Dynamo's source text when it is not an input's dimension).
        traced: ``(name, value)``: the sizes the graph was traced at.
    """

    saved: str
    peak: str
    peak_candidates: tuple[str, ...]
    symbols: tuple[tuple[str, str], ...]
    traced: tuple[tuple[str, int], ...]

    def evaluate(self, **sizes: int) -> SizedBytes:
        """Saved and peak bytes at the given sizes (the others at their traced values).

        Raises:
            ConfigError: an unknown size name, or a value that is not an int >= 0.
        """
        known = dict(self.traced)
        for name, value in sizes.items():
            if name not in known:
                raise ConfigError(f"evaluate({name}=...): unknown size; this formula's sizes "
                                  f"are {', '.join(known) or 'none'}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"evaluate({name}={value!r}): give an int >= 0")
        subs = {sympy.Symbol(n, integer=True, positive=True): v
                for n, v in {**known, **sizes}.items()}
        at = _at(subs)
        return SizedBytes(at(self.saved), max(at(c) for c in self.peak_candidates or (self.peak,)))

    def __str__(self) -> str:
        return f"saved = {self.saved} bytes\npeak  = {self.peak} bytes"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SizeFormula":
        return cls(d["saved"], d["peak"], tuple(d["peak_candidates"]),
                   tuple(map(tuple, d["symbols"])), tuple(map(tuple, d["traced"])))


def _at(subs: dict[sympy.Symbol, int]):
    by_name = {s.name: v for s, v in subs.items()}

    def at(text: str) -> int:
        expr = sympy.sympify(text)
        return int(expr.xreplace({s: by_name[s.name] for s in expr.free_symbols}))

    return at


def symbol_names(shape_env) -> dict[sympy.Symbol, str]:
    """Names for the size symbols of a ShapeEnv (Note [Symbol names])."""
    from ckptfx import _torch_compat as compat
    from ckptfx.report_text import readable_source

    named: dict[sympy.Symbol, tuple[str, str]] = {}
    for sym, sources in compat.symbol_sources(shape_env).items():
        for src in sources:
            text = readable_source(src)
            m = _SHAPE_RE.match(text)
            if m:  # a dimension of an input tensor
                dim, arg = int(m.group(2)), re.sub(r"\W+", "_", m.group(1)).strip("_")
                named[sym] = (_DIM_NAMES.get(dim, f"{arg}_{dim}"), f"{arg}_{dim}")
                break
            if text.isidentifier():  # an int input (``logits_to_keep``)
                named[sym] = (text, text)
                break
    counts = collections.Counter(short for short, _ in named.values())
    return {sym: short if counts[short] == 1 else full for sym, (short, full) in named.items()}


def _sum(keys, exprs) -> sympy.Expr:
    counts = collections.Counter(exprs[k] for k in keys)
    return sympy.expand(sympy.Add(*[c * e for e, c in counts.items()]))


def _dominated(a: sympy.Expr, b: sympy.Expr, syms) -> bool:
    """True when ``b >= a`` for every positive value of the symbols (coefficient-wise)."""
    diff = sympy.expand(b - a)
    if diff.is_number:
        return diff >= 0
    try:
        return all(c >= 0 for c in sympy.Poly(diff, *syms).coeffs())
    except sympy.PolynomialError:
        return False


def size_formula(st, shape_env, hints=None, saved_expr=None) -> SizeFormula | None:
    """The SizeFormula of a simulated step, or None when its sizes are all static.

    Args:
        st: a :class:`ckptfx.memory.StorageTimeline` of the plan's forward and backward.
        shape_env: the graphs' ShapeEnv (names the symbols).
        hints: the SizeHints ``st`` was evaluated with (the traced sizes, including the
            values assumed for data-dependent sizes); default: the ShapeEnv's backed hints.
        saved_expr: the saved bytes as the plan counts them (activations, and the inputs
            and sizes the backward reads; :func:`ckptfx.report.build_report` passes it);
            default: the simulation's saved bytes, which leave graph inputs out.
    """
    live = [s.live_bytes for s in st.steps]
    if not live:
        return None
    peak_i = max(range(len(live)), key=live.__getitem__)
    local = [i for i in range(len(live)) if (i == 0 or live[i] >= live[i - 1])
             and (i == len(live) - 1 or live[i] >= live[i + 1])]
    local = sorted(set(local) | {peak_i}, key=lambda i: -live[i])[:MAX_CANDIDATES]
    exprs = {i: _sum(st.live[i], st.exprs) for i in local}
    saved = sympy.expand(st.saved_expr if saved_expr is None else saved_expr)
    syms = set(saved.free_symbols).union(*(e.free_symbols for e in exprs.values()))
    if not syms:
        return None
    names = symbol_names(shape_env)
    rename = {s: sympy.Symbol(names.get(s, str(s)), integer=True, positive=True) for s in syms}
    from ckptfx import _torch_compat as compat

    values = hints.values if hints is not None else compat.symbol_hints(shape_env)
    kept: list[sympy.Expr] = []
    for i in local:  # largest first: a later one is dropped when a kept one dominates it
        if exprs[i] not in kept and not any(_dominated(exprs[i], k, syms) for k in kept):
            kept.append(exprs[i])
    from ckptfx.report_text import readable_source

    sources = {s: readable_source((v or [str(s)])[0])
               for s, v in compat.symbol_sources(shape_env).items()}
    return SizeFormula(
        saved=str(saved.xreplace(rename)),
        peak=str(exprs[peak_i].xreplace(rename)),
        peak_candidates=tuple(str(e.xreplace(rename)) for e in kept),
        symbols=tuple(sorted((rename[s].name, sources.get(s, str(s))) for s in syms)),
        traced=tuple(sorted((rename[s].name, int(values.get(s, 0))) for s in syms)))
