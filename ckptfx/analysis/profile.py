"""Profiled recompute costs: each op timed on this machine (``cost_model="profile"``).

For a call_function node, the op runs on random inputs of the node's shapes and dtypes (sizes
evaluated under the SizeHints; integer inputs are zeros, so that indices stay in range) on
the CPU, once to warm up; then each of ``repeats`` timings runs it as many times as it takes
to last at least :data:`MIN_MEASURED_S` (a single run of a microsecond op is timer noise:
``timeit``'s rule), and the median time per run in seconds is its cost. Results are cached per (op, argument shapes/dtypes, non-tensor arguments) for the
life of the process, so repeated layers are timed once. An op that cannot run on synthetic
inputs keeps its roofline cost (logged at debug level).

The placement decision then rests on measured time, not on op lists: a solver that minimises
recompute cost sees what this machine makes expensive.
"""

from __future__ import annotations

import logging
import statistics
import timeit
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ckptfx import _torch_compat as compat
from ckptfx.analysis.sizes import SizeHints

log = logging.getLogger("ckptfx.profile")

_CACHE: dict[Any, float | None] = {}

MIN_MEASURED_S = 1e-3  # each timing lasts at least this long, seconds


def seconds_per_run(fn: Callable[[], Any], repeats: int = 5,
                    min_measured_s: float = MIN_MEASURED_S) -> float:
    """Median seconds of one call of ``fn`` over ``repeats`` timings, each of enough calls
    to last ``min_measured_s``; returns (seconds per call)."""
    timer = timeit.Timer(fn)
    number = 1
    while (elapsed := timer.timeit(number)) < min_measured_s:
        number *= max(2, min(100, int(min_measured_s / max(elapsed, 1e-9)) + 1))
    return statistics.median(t / number for t in timer.repeat(repeats, number))


def _materialize(v: Any, hints: SizeHints, gen: torch.Generator) -> Any:
    if isinstance(v, torch.Tensor):
        shape = hints.concrete_shape(v)
        if v.dtype.is_floating_point or v.dtype.is_complex:
            return torch.randn(shape, dtype=v.dtype, generator=gen)
        if v.dtype == torch.bool:
            return torch.ones(shape, dtype=torch.bool)
        return torch.zeros(shape, dtype=v.dtype)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return hints.evaluate(v.node.expr) if isinstance(v, torch.SymInt) else v.node.hint
    return v


def _key(node: fx.Node, args: Any, hints: SizeHints) -> Any:
    def sig(v):
        if isinstance(v, torch.Tensor):
            return ("T", hints.concrete_shape(v), v.dtype)
        if isinstance(v, torch.SymInt):
            return hints.evaluate(v.node.expr)
        if isinstance(v, (list, tuple)):
            return tuple(sig(x) for x in v)
        return v if isinstance(v, (int, float, bool, str, type(None), torch.dtype)) else repr(v)

    return (str(node.target), sig(args[0]), tuple(sorted((k, sig(v)) for k, v in args[1].items())))


def profile_node(node: fx.Node, hints: SizeHints, repeats: int = 5) -> float | None:
    """Median seconds of one execution of ``node``'s op on synthetic inputs, or None.

    Args:
        node: a call_function node with ``meta["val"]`` on its tensor arguments.
        hints: evaluates symbolic sizes.
        repeats: timings, each of enough runs to last MIN_MEASURED_S.

    Returns:
        Seconds (float), or None when the op cannot be run on synthetic inputs.
    """
    if node.op != "call_function" or not compat.is_op_overload(node.target):
        return None
    gen = torch.Generator().manual_seed(0)

    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    args = compat.tree_map(val, (node.args, node.kwargs))
    key = _key(node, args, hints)
    if key in _CACHE:
        return _CACHE[key]
    try:
        real_args, real_kwargs = compat.tree_map(lambda v: _materialize(v, hints, gen), args)
        with torch.no_grad():
            result = seconds_per_run(lambda: node.target(*real_args, **real_kwargs), repeats)
    except Exception as exc:  # synthetic inputs can be invalid for some ops
        log.debug("cannot profile %s: %s", node.target, exc)
        result = None
    _CACHE[key] = result
    return result
