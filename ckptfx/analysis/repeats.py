"""Repeated blocks found from the graph's structure: ops, sizes and wiring, no module paths.

:func:`ckptfx.analysis.layers.find_blocks` reads blocks from ``nn_module_stack`` paths, which
only graphs traced by Dynamo carry. A graph traced by ``aot_function``, or a model whose
blocks are not an indexed container, still repeats: the same ops on the same sizes, wired the
same way, once per block. This module finds that repetition.

Call tree::

    find_repeats(table)                    forward nodes -> blocks (NodeTable rows)
    └── repeats_from_signatures(sigs, reads)   pure: per-node signatures -> block windows
        ├── _period(ids)                   the shift under which most signatures recur
        ├── _repeated_run(ids, period)     the longest stretch that recurs at that shift
        └── _phase(reads, start, ...)      where in the period a block begins

Note [Structural repeats]
    Each forward call node gets a signature: its op, its size in bytes (a sympy expression,
    so shapes and dtypes, symbolic or not) and its wiring: for every input that is a forward
    node, how many nodes back it was computed, and how many inputs are primals. A stack of
    ``n`` identical blocks makes the signature sequence periodic with the block's node count
    ``L`` as its period: of all shifts ``d``, the smallest true period has the most positions
    with ``sig[i] == sig[i + d]`` (a multiple ``kL`` of it matches ``(k - 1) L`` fewer). The
    blocks are the windows of length ``L`` inside the longest stretch that recurs at shift
    ``L``. Where a block starts within the period is chosen so that the fewest values cross a
    window's boundary (a residual stream crosses it alone): a block begins where its input
    is one tensor. Blocks that differ (the first GPT-2 block builds the attention mask the
    others read) stay outside the windows, planned with the rest of the graph.

    Accepted only when at least ``MIN_BLOCKS`` windows of at least ``MIN_NODES`` nodes cover
    ``MIN_COVER`` of the forward nodes, so incidental repetition (a few identical views) is
    never taken for a layer stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ckptfx.analysis.layers import Block
from ckptfx.joint import Role

MIN_NODES = 4  # a block has at least this many forward nodes
MIN_BLOCKS = 2
MIN_COVER = 0.3  # the blocks cover at least this fraction of the forward nodes


def _period(ids: np.ndarray) -> int:
    """The shift d (1 <= d <= len/2) with the most positions where ``ids[i] == ids[i + d]``;
    the smallest such d on ties (0 when there is none)."""
    best, best_d = 0, 0
    for d in range(MIN_NODES, len(ids) // MIN_BLOCKS + 1):
        matches = int(np.count_nonzero(ids[:-d] == ids[d:]))
        if matches > best:
            best, best_d = matches, d
    return best_d


def _repeated_run(ids: np.ndarray, period: int) -> tuple[int, int]:
    """[start, end) of the longest stretch whose every position recurs ``period`` later,
    extended by that period (the last repetition)."""
    same = np.concatenate([[False], ids[:-period] == ids[period:], [False]])
    edges = np.flatnonzero(np.diff(same.astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    if len(starts) == 0:
        return 0, 0
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k]) + period


def _crossing(reads: Sequence[tuple[int, ...]], lo: int, cut: int, hi: int) -> int:
    """How many values computed in [lo, cut) are read in [cut, hi)."""
    return len({p for i in range(cut, hi) for p in reads[i] if lo <= p < cut})


def _phase(reads: Sequence[tuple[int, ...]], start: int, end: int, period: int) -> int:
    """The offset in [0, period) at which blocks begin: the fewest values crossing a boundary
    in the middle of the run (first offset on ties)."""
    middle = start + ((end - start) // period // 2) * period
    best = min(range(period), key=lambda r: (
        _crossing(reads, max(start, middle + r - period), middle + r,
                  min(end, middle + r + period)), r))
    return best


def repeats_from_signatures(signatures: Sequence[object],
                            reads: Sequence[tuple[int, ...]]) -> list[tuple[int, int]]:
    """Windows ``[begin, end)`` of positions that form repeated blocks (Note [Structural
    repeats]).

    Args:
        signatures: one hashable signature per forward node, in graph order.
        reads: per node, the positions of the forward nodes it reads.

    Returns:
        The blocks' windows in order; empty when the sequence does not repeat enough.

    Example:
        >>> sigs = ["emb"] + ["ln", "mm", "add", "relu"] * 3 + ["head"]
        >>> reads = [()] + [(i - 1,) for i in range(1, 14)]
        >>> repeats_from_signatures(sigs, reads)
        [(1, 5), (5, 9), (9, 13)]
    """
    codes: dict[object, int] = {}
    ids = np.array([codes.setdefault(s, len(codes)) for s in signatures], dtype=np.int64)
    if len(ids) < MIN_NODES * MIN_BLOCKS:
        return []
    period = _period(ids)
    if period == 0:
        return []
    start, end = _repeated_run(ids, period)
    if end - start < MIN_BLOCKS * period:
        return []
    first = start + _phase(reads, start, end, period)
    windows = [(b, b + period) for b in range(first, end - period + 1, period)]
    if len(windows) < MIN_BLOCKS or len(windows) * period < MIN_COVER * len(ids):
        return []
    return windows


def find_repeats(table) -> tuple[Block, ...]:
    """The repeated blocks of a joint graph's forward, found structurally.

    Args:
        table: the graph's :class:`ckptfx.analysis.table.NodeTable`.

    Returns:
        Blocks (``path`` ``"#i"``, ``container`` ``""``, ``index`` i) in forward order; empty
        when the forward does not repeat (Note [Structural repeats]).
    """
    rows = [r for r in table.rows if r.role is Role.FORWARD and r.target is not None]
    position = {r.name: i for i, r in enumerate(rows)}
    reads, signatures = [], []
    for i, row in enumerate(rows):
        inner = tuple(position[p] for p in row.inputs if p in position)
        outer = sum(1 for p in row.inputs if p not in position)
        reads.append(inner)
        signatures.append((str(row.target), str(row.nbytes), tuple(i - p for p in inner), outer))
    windows = repeats_from_signatures(signatures, reads)
    return tuple(Block(path=f"#{k}", container="", index=k,
                       nodes=tuple(r.name for r in rows[b:e]))
                 for k, (b, e) in enumerate(windows))
