"""Recompute cost of a node: FLOPs from ``torch.utils.flop_counter`` and bytes moved, on a
roofline (Williams et al., CACM 2009): ``seconds = max(flops / peak_flops, bytes / bandwidth)``.

Pointwise ops are memory-bound (cheap but not free) and fuse into one kernel with their
pointwise neighbours (Note [Fused pointwise chains]); matmuls are compute-bound (expensive).
The machine constants are a documented default (:data:`DEFAULT_MACHINE`), not a measurement;
``RematConfig(cost_model="profile")`` times ops on this machine instead (``ckptfx.analysis.profile``).

Note [Fused pointwise chains]
    Inductor fuses a chain of pointwise ops into one kernel (its scheduler's vertical
    fusion), and recomputes such a chain inside the kernel of the backward op that reads it;
    PyTorch's partitioner prices a recompute the same way: ``is_fusible(a, b)`` (both ops
    in its recomputable pointwise/view set) and ``is_materialized(node)`` (a user it does
    not fuse with) in ``torch/_functorch/partitioners.py``. A fused chain costs one launch
    and the bytes it reads from outside the chain (plus the bytes it writes for a user
    that does not fuse), not one launch and one round trip through memory per op: a GELU
    decomposed into five pointwise ops reads its input twice and costs less than a
    same-sized matmul of head width 64, where one roofline per op priced it above
    (tests/test_costs.py). To keep a node's recompute cost additive (the solvers sum it
    over the recomputed set), the chain's cost is split over its nodes: a fusible node
    (:func:`fusible`: ``torch.Tag.pointwise``, or a dtype copy) pays the bytes of its
    inputs made by non-fusible producers (views looked through), the bytes of its output
    when some user does not fuse, and a launch only when no input comes from a fusible
    producer (it heads a chain). So an interior op of a chain (``erf`` of ``x * c``, read
    by another pointwise op) costs 0, and the chain's total is its external reads, its
    materialized writes and a launch per head. An input read by two ops of a chain counts
    twice (an upper bound). ``cost_model="profile"`` times the ops with a cost, one by one
    (a chain's head at its full unfused time); the interior ops of a chain stay at 0.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.fx as fx

from ckptfx import _torch_compat as compat
from ckptfx.analysis import nodes
from ckptfx.analysis.sizes import SizeHints

log = logging.getLogger("ckptfx.costs")


@dataclasses.dataclass(frozen=True)
class Machine:
    """Roofline constants.

    Attributes:
        peak_flops: FLOP/s of dense matmul work.
        bandwidth: bytes/s of memory traffic.
        launch_s: fixed seconds per op (kernel launch / dispatch).
        comm_bandwidth: bytes/s a collective delivers (the link between ranks): what an
            all-gather the backward runs again costs (Note [Re-gathering parameters] in
            ``ckptfx/analysis/nodes.py``).
    """

    peak_flops: float
    bandwidth: float
    launch_s: float
    comm_bandwidth: float = 5.0e9


# A modest server CPU core pair: ~100 GFLOP/s fp32 matmul, ~20 GB/s memory, 2 us dispatch;
# a collective delivers ~5 GB/s (a 40 Gb/s link; also the order of gloo over loopback).
DEFAULT_MACHINE = Machine(peak_flops=1.0e11, bandwidth=2.0e10, launch_s=2.0e-6)


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """Cost facts of one node: FLOPs, bytes moved (inputs read + output written), seconds."""

    flops: int
    bytes_moved: int
    seconds: float


def _meta_like(v: Any, hints: SizeHints) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty(hints.concrete_shape(v), dtype=v.dtype, device="meta")
    if isinstance(v, torch.SymInt):
        return hints.evaluate(v.node.expr)
    return v


def _arg_vals(node: fx.Node) -> tuple[tuple, dict]:
    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    return compat.tree_map(val, (node.args, node.kwargs))


def _tensors(v: Any, hints: SizeHints):
    """(numel, element size) of every tensor in a pytree, sizes under the hints."""
    for leaf in compat.tree_leaves(v):
        if isinstance(leaf, torch.Tensor):
            n = 1
            for d in hints.concrete_shape(leaf):
                n *= d
            yield n, leaf.element_size()


def _largest_numel(v: Any, hints: SizeHints) -> int:
    return max((n for n, _ in _tensors(v, hints)), default=0)


def node_flops(node: fx.Node, hints: SizeHints) -> int:
    """FLOPs of one call_function node.

    Ops with a formula in ``torch.utils.flop_counter``'s registry (matmul, convolution,
    attention) use it. Other ops (pointwise, reductions, which the registry leaves out) count
    one FLOP per element of their largest tensor argument or result: a documented estimate.
    A formula that fails on these arguments does not make the op free to recompute: it falls
    back to the same per-element estimate (logged).
    """
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    registry = compat.flop_registry()
    fn = registry.get(packet) or registry.get(target)
    estimate = _largest_numel((_arg_vals(node), node.meta.get("val")), hints)
    if fn is None:
        return estimate
    args, kwargs = compat.tree_map(lambda v: _meta_like(v, hints), _arg_vals(node))
    out = compat.tree_map(lambda v: _meta_like(v, hints), node.meta.get("val"))
    try:
        return int(fn(*args, **kwargs, out_val=out))
    except Exception as exc:  # noqa: BLE001 - any formula error: estimate, never 0
        log.warning("ckptfx: FLOP formula for %s failed (%s: %s); estimating %d FLOPs, one per "
                    "element", target, type(exc).__name__, exc, estimate)
        return estimate


def _tensor_bytes(v: Any, hints: SizeHints) -> int:
    return sum(n * size for n, size in _tensors(v, hints))


_FUSIBLE_EXTRA = frozenset({torch.ops.aten._to_copy})  # a dtype copy fuses like a pointwise op


def fusible(node: fx.Node) -> bool:
    """Whether Inductor fuses ``node`` with pointwise neighbours: a ``torch.Tag.pointwise``
    op or a dtype copy, not random (Note [Fused pointwise chains])."""
    if node.op != "call_function":
        return False
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    return (torch.Tag.pointwise in tags
            or getattr(node.target, "overloadpacket", None) in _FUSIBLE_EXTRA)


def _producer(node: fx.Node) -> fx.Node:
    """The node that computes ``node``'s data: views looked through to their base."""
    while nodes.is_view(node) and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _materialized(node: fx.Node) -> bool:
    """Whether some user of ``node`` (through views) does not fuse with it, so its value is
    written to memory; the graph's output counts as such a user."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if nodes.is_view(user):
            stack.extend(user.users)
        elif not fusible(user):
            return True
    return False


def _fused_cost(node: fx.Node, hints: SizeHints, machine: Machine, flops: int) -> NodeCost:
    """A fusible node's share of its chain's cost (Note [Fused pointwise chains])."""
    external, chained = 0, False
    for arg in node.all_input_nodes:
        if fusible(_producer(arg)):
            chained = True
        else:
            external += _tensor_bytes(arg.meta.get("val"), hints)
    written = _tensor_bytes(node.meta.get("val"), hints) if _materialized(node) else 0
    moved = external + written
    launch = 0.0 if chained else machine.launch_s
    return NodeCost(flops, moved, moved / machine.bandwidth + launch)


def node_cost(node: fx.Node, hints: SizeHints, machine: Machine = DEFAULT_MACHINE,
              *, is_view: bool = False, communicates: bool = False) -> NodeCost:
    """Roofline cost of recomputing ``node`` once.

    Views, getitem and SymInt arithmetic move no data: cost 0. A collective
    (``communicates``) costs the bytes of its result over ``machine.comm_bandwidth`` and
    counts no FLOPs: an all-gather is priced by the unsharded bytes it delivers. A fusible
    (pointwise) node costs its share of its fused chain (Note [Fused pointwise chains]).
    """
    if node.op != "call_function" or is_view or not isinstance(node.meta.get("val"), (
            torch.Tensor, list, tuple)):
        return NodeCost(0, 0, 0.0)
    if communicates:
        sent = _tensor_bytes(node.meta.get("val"), hints)
        return NodeCost(0, sent, sent / machine.comm_bandwidth + machine.launch_s)
    flops = node_flops(node, hints)
    if fusible(node):
        # pointwise work is memory-bound: its FLOPs do not enter the compute roof
        return _fused_cost(node, hints, machine, flops)
    moved = _tensor_bytes(_arg_vals(node), hints) + _tensor_bytes(node.meta.get("val"), hints)
    seconds = max(flops / machine.peak_flops, moved / machine.bandwidth) + machine.launch_s
    return NodeCost(flops, moved, seconds)
