"""Sizes of graph values in bytes, as sympy expressions, and the one place they become ints.

A tensor's size is ``numel * itemsize`` bytes where numel is the product of its shape; each
dimension is an int or a SymInt whose ``node.expr`` is a sympy expression over the graph's
size symbols. Sizes stay symbolic through analysis; the solver boundary evaluates them with
:class:`SizeHints`.

Note [Unbacked sizes]
    A backed symbol (a dynamic input size) has a hint: the value Dynamo saw when it
    compiled; a plan made for the hint is valid for every size (validity does not depend on
    sizes, only optimality does). An unbacked symbol (a data-dependent size such as the
    length of ``nonzero()``) has no hint. ckptfx then substitutes
    ``RematConfig.unbacked_size_hint`` elements for it, logs a warning naming the symbol once
    per graph, and records the substitution in the report; it never substitutes silently.
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
    numel = sympy.Integer(1)
    for d in t.shape:
        numel = numel * _expr(d)
    return numel * t.element_size()


def value_bytes(val: Any) -> sympy.Expr:
    """Bytes of a node's ``meta["val"]``: tensors, SymInts (8 bytes), tuples (the sum)."""
    if isinstance(val, torch.Tensor):
        return tensor_bytes(val)
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        return sympy.Integer(SYMINT_BYTES)
    if isinstance(val, (list, tuple)):
        return sympy.Add(*[value_bytes(v) for v in val]) if val else sympy.Integer(0)
    return sympy.Integer(0)


@dataclasses.dataclass(frozen=True)
class SizeHints:
    """Concrete values for size symbols: the one explicit way sympy sizes become ints.

    Attributes:
        values: sympy.Symbol -> int for every backed symbol.
        unbacked_default: elements assumed for a symbol without a value (see
            Note [Unbacked sizes]).
    """

    values: dict[sympy.Symbol, int] = dataclasses.field(default_factory=dict)
    unbacked_default: int = 4096

    def __hash__(self) -> int:  # dict field: hash on sorted items
        return hash((tuple(sorted((str(k), v) for k, v in self.values.items())),
                     self.unbacked_default))

    def evaluate(self, expr: sympy.Expr | int) -> int:
        """Evaluates a size expression to an int, substituting unbacked symbols (logged)."""
        if isinstance(expr, int):
            return expr
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return int(expr)
        subs = {}
        for sym in expr.free_symbols:
            if sym in self.values:
                subs[sym] = self.values[sym]
            else:
                log.warning("ckptfx: unbacked size symbol %s has no hint; assuming %d elements "
                            "(RematConfig.unbacked_size_hint)", sym, self.unbacked_default)
                subs[sym] = self.unbacked_default
        return int(sympy.Integer(expr.xreplace(subs)))

    def unbacked_in(self, expr: sympy.Expr) -> set[sympy.Symbol]:
        """Symbols of ``expr`` that have no hint."""
        return {s for s in sympy.sympify(expr).free_symbols if s not in self.values}

    def concrete_shape(self, t: torch.Tensor) -> tuple[int, ...]:
        """A tensor's shape with every SymInt evaluated under these hints."""
        return tuple(self.evaluate(_expr(d)) for d in t.shape)
