"""Sizes of graph values in bytes, as sympy expressions, and the one place they become ints.

A tensor's size is ``numel * itemsize`` bytes where numel is the product of its shape; each
dimension is an int or a SymInt whose ``node.expr`` is a sympy expression over the graph's
size symbols. Sizes stay symbolic through analysis; the solver boundary evaluates them with
:class:`SizeHints`.

Note [Unbacked sizes]
    A backed symbol (a dynamic input size) has a hint: the value Dynamo saw when it
    compiled; a plan made for the hint is valid for every size (validity does not depend on
    sizes, only optimality does). An unbacked symbol (a data-dependent size: the length of
    ``nonzero()``, a size read with ``.item()``) has no hint. The rule, applied once per
    graph by :meth:`SizeHints.from_shape_env`:

    1. its upper bound, when the ShapeEnv has proved a finite one (``nonzero()`` of an
       ``n``-element tensor is at most ``n``; ``torch._check(k <= 32)`` bounds ``k``): byte
       counts are then worst cases, so a plan that meets an absolute budget meets it for
       every value the size takes;
    2. otherwise ``RematConfig.unbacked_size_hint`` elements (default 4096).

    Validity never depends on the value chosen, only which plan is cheapest. Every choice is
    logged once per graph (one warning naming each symbol, its value and the rule) and
    recorded in the plan's and the report's ``notes``; nothing is substituted silently.
    Nodes that define an unbacked symbol are never recomputed (see
    ``ckptfx.analysis.table``): the backward receives the symbol as a saved SymInt.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import sympy
import torch

log = logging.getLogger("ckptfx.sizes")

SYMINT_BYTES = 8  # a SymInt saved for backward is a host int64


def _expr(dim: Any) -> sympy.Expr:
    if isinstance(dim, torch.SymInt):
        return sympy.sympify(dim.node.expr)
    return sympy.Integer(int(dim))


def tensor_bytes(t: torch.Tensor) -> sympy.Expr:
    """Bytes of a (fake) tensor's elements: prod(shape) * itemsize, a sympy expression."""
    shape = t.shape
    if all(type(d) is int for d in shape):  # static: one Integer, as the product below gives
        numel = 1
        for d in shape:
            numel *= d
        return sympy.Integer(numel * t.element_size())
    numel = sympy.Integer(1)
    for d in shape:
        numel = numel * _expr(d)
    return numel * t.element_size()


def storage_bytes(t: torch.Tensor) -> sympy.Expr:
    """Bytes of the storage a (fake) tensor keeps alive: for a view, its base's whole storage
    (saving one chunk of a fused QKV projection keeps all three alive); else its elements."""
    try:
        nbytes = t.untyped_storage().nbytes()
    except (NotImplementedError, RuntimeError):  # tensors without a storage (sparse, nested)
        return tensor_bytes(t)
    if isinstance(nbytes, torch.SymInt):
        return sympy.sympify(nbytes.node.expr)
    return sympy.Integer(int(nbytes))


def value_bytes(val: Any) -> sympy.Expr:
    """Bytes a node's ``meta["val"]`` keeps alive if saved: a tensor's storage
    (:func:`storage_bytes`), SymInts (8 bytes), tuples (the sum of their tensors' elements)."""
    if isinstance(val, torch.Tensor):
        return storage_bytes(val)
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        return sympy.Integer(SYMINT_BYTES)
    if isinstance(val, (list, tuple)):
        return sympy.Add(*[value_bytes(v) for v in val]) if val else sympy.Integer(0)
    return sympy.Integer(0)


@dataclasses.dataclass(frozen=True)
class SizeHints:
    """Concrete values for size symbols: the one explicit way sympy sizes become ints.

    Attributes:
        values: sympy.Symbol -> int for every backed symbol, and for the unbacked ones
            resolved by :meth:`from_shape_env`.
        unbacked_default: elements assumed for a symbol without a value (see
            Note [Unbacked sizes]).
        assumed: ``(symbol, elements, rule)`` for every unbacked symbol given a value, sorted
            by symbol name (what the notes and the warning report).
    """

    values: dict[sympy.Symbol, int] = dataclasses.field(default_factory=dict)
    unbacked_default: int = 4096
    assumed: tuple[tuple[str, int, str], ...] = ()

    @classmethod
    def from_graphs(cls, *graphs: Any, unbacked_default: int = 4096) -> "SizeHints":
        """Hints for every size symbol of ``graphs`` (fx.Graph or GraphModule): the traced
        value of each backed symbol, read from every ShapeEnv the graphs' SymInts belong to
        and from the SymInts themselves (Note [Hints from every ShapeEnv] in
        ``ckptfx._torch_compat``), plus the unbacked symbols resolved by the rule of
        Note [Unbacked sizes]. Static graphs give empty hints."""
        from ckptfx import _torch_compat as compat

        graphs = tuple(getattr(g, "graph", g) for g in graphs)
        known: dict[sympy.Symbol, int] = {}
        for g in graphs:
            for sym, val in compat.graph_symbol_hints(g).items():
                known.setdefault(sym, val)
        shape_env = next((e for e in map(compat.shape_env_of, graphs) if e is not None), None)
        return cls.from_shape_env(shape_env, unbacked_default, known)

    @classmethod
    def from_shape_env(cls, shape_env: Any, unbacked_default: int = 4096,
                       known: dict[sympy.Symbol, int] | None = None) -> "SizeHints":
        """Backed hints of a ShapeEnv (and ``known`` ones: symbol -> elements) plus its
        unbacked symbols resolved by the rule of Note [Unbacked sizes]. ``shape_env`` None
        (static shapes) gives ``known`` or empty hints."""
        from ckptfx import _torch_compat as compat

        values = {**(known or {}), **compat.symbol_hints(shape_env)}
        assumed = []
        for sym, upper in compat.unbacked_upper_bounds(shape_env).items():
            if sym in values:
                continue
            if upper is not None:
                values[sym], rule = upper, f"its upper bound {upper} (ShapeEnv)"
            else:
                values[sym] = unbacked_default
                rule = f"no upper bound: RematConfig.unbacked_size_hint={unbacked_default}"
            assumed.append((str(sym), values[sym], rule))
        return cls(values, unbacked_default, tuple(sorted(assumed)))

    def __hash__(self) -> int:  # dict field: hash on sorted items
        return hash((tuple(sorted((str(k), v) for k, v in self.values.items())),
                     self.unbacked_default))

    def evaluate(self, expr: sympy.Expr | int) -> int:
        """Evaluates a size expression to an int.

        A symbol without a value (one :meth:`from_shape_env` did not see) gets
        ``unbacked_default`` elements, with one warning per symbol per SizeHints.
        """
        if isinstance(expr, int):
            return expr
        if isinstance(expr, sympy.Integer):
            return int(expr)
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return int(expr)
        subs = {}
        for sym in expr.free_symbols:
            if sym in self.values:
                subs[sym] = self.values[sym]
            else:
                self._warn_once(sym)
                subs[sym] = self.unbacked_default
        return int(sympy.Integer(expr.xreplace(subs)))

    def _warn_once(self, sym: sympy.Symbol) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if sym not in warned:
            warned.add(sym)
            log.warning("ckptfx: size symbol %s has no hint; assuming %d elements "
                        "(RematConfig.unbacked_size_hint)", sym, self.unbacked_default)

    def describe(self, symbols: set[str] | None = None) -> str:
        """One line naming each assumed unbacked symbol (those in ``symbols``, if given),
        its value and its rule; "" when there is none."""
        parts = [f"{name} = {value} elements ({rule})" for name, value, rule in self.assumed
                 if symbols is None or name in symbols]
        return ("data-dependent sizes assumed: " + "; ".join(parts)) if parts else ""

    def unbacked_in(self, expr: sympy.Expr) -> set[sympy.Symbol]:
        """Symbols of ``expr`` that have no hint."""
        return {s for s in sympy.sympify(expr).free_symbols if s not in self.values}

    def concrete_shape(self, t: torch.Tensor) -> tuple[int, ...]:
        """A tensor's shape with every SymInt evaluated under these hints."""
        return tuple(d if type(d) is int else self.evaluate(_expr(d)) for d in t.shape)
