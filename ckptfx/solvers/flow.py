"""Exact minimum s-t cuts with integer capacities of any size, on SciPy's max-flow.

``scipy.sparse.csgraph.maximum_flow`` (Dinic's algorithm, compiled) takes 32-bit capacities;
the min-cut's capacities are 50 bits and more (bytes times a tie-breaking scale, Note
[Min-cut tie-breaking] in :mod:`ckptfx.solvers.mincut`). :func:`sink_side` runs it in
phases of capacity scaling (Edmonds & Karp 1972), each phase a max flow that fits 32 bits.

Note [Capacity scaling]
    Phase ``k`` finds a maximum flow ``f_k`` for the capacities ``c >> k``. The first phase
    takes the largest ``k`` whose capacities sum below 2**31, so any of its flows fits. Going
    from phase ``k + 1`` to ``k``, ``2 * f_{k+1}`` is feasible, and a minimum cut of phase
    ``k + 1`` gains at most one unit per cut edge, so the flow left to find is at most the
    number of edges ``m``: a max flow of the residual graph with every capacity capped at
    ``m + 1`` finds it (a flow of value ``v`` needs no more than ``v`` on any edge, once its
    cycles are removed). Infinite edges are capped the same way. After phase 0 the flow is
    maximum for ``c`` itself, and the vertices that can reach the sink in its residual graph
    are the sink side of the minimum cut whose sink side is smallest; that set is the same
    for every maximum flow, so the cut is the one ``networkx.minimum_cut`` returns, whatever
    the algorithm.
"""

from __future__ import annotations

import numpy as np

_INT32_MAX = 2 ** 31 - 1
# Flows are int64: above this total of finite capacities the caller uses another engine.
MAX_TOTAL_CAPACITY = 2 ** 62


class Unbounded(Exception):
    """A source-to-sink path of infinite edges: no finite cut exists."""


def _pairs(n: int, tails: np.ndarray, heads: np.ndarray, caps: np.ndarray,
           infinite: np.ndarray):
    """Every edge and its reverse, once, sorted by (tail, head) (CSR order), with the
    capacity of each direction (0 where absent) and whether it is infinite."""
    key = np.concatenate([tails * n + heads, heads * n + tails])
    uniq, inverse = np.unique(key, return_inverse=True)
    cap = np.zeros(len(uniq), dtype=np.int64)
    inf = np.zeros(len(uniq), dtype=bool)
    m = len(tails)
    np.add.at(cap, inverse[:m], caps)  # parallel edges add up, as capacities do
    np.logical_or.at(inf, inverse[:m], infinite)
    return uniq // n, uniq % n, cap, inf


def _reaches(n: int, rows: np.ndarray, cols: np.ndarray, target: int) -> np.ndarray:
    """Boolean mask of the vertices with a path to ``target`` along edges ``rows -> cols``."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order

    reverse = csr_matrix((np.ones(len(rows), dtype=np.int8), (cols, rows)), shape=(n, n))
    order = breadth_first_order(reverse, target, directed=True, return_predecessors=False)
    mask = np.zeros(n, dtype=bool)
    mask[order] = True
    return mask


def sink_side(n: int, tails, heads, caps, infinite, source: int, sink: int) -> np.ndarray:
    """The sink side of the minimum s-t cut with the smallest sink side.

    Args:
        n: number of vertices (``0 .. n-1``).
        tails: edge tails (ints).
        heads: edge heads (ints), same length.
        caps: finite capacities, non-negative ints below :data:`MAX_TOTAL_CAPACITY` in
            total (ignored where ``infinite``).
        infinite: per edge, whether its capacity is infinite.
        source: the source vertex.
        sink: the sink vertex.

    Returns:
        A boolean mask over the vertices: True for those on the sink side.

    Raises:
        Unbounded: infinite edges join the source to the sink.
        ValueError: the finite capacities sum to :data:`MAX_TOTAL_CAPACITY` or more.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    finite = [0 if i else int(c) for c, i in zip(caps, infinite)]
    total = sum(finite)
    if total >= MAX_TOTAL_CAPACITY:
        raise ValueError(f"capacities sum to {total}, beyond the int64 flows of this engine")
    tails, heads = np.asarray(tails, dtype=np.int64), np.asarray(heads, dtype=np.int64)
    infinite = np.asarray(infinite, dtype=bool)
    caps = np.asarray(finite, dtype=np.int64)
    if _reaches(n, tails[infinite], heads[infinite], sink)[source]:
        raise Unbounded()
    rows, cols, cap, inf = _pairs(n, tails, heads, caps, infinite)
    keys = rows * n + cols
    indptr = np.searchsorted(rows, np.arange(n + 1)).astype(np.int32)
    indices = cols.astype(np.int32)
    first = k = max(0, total.bit_length() - 31)
    flow = np.zeros(len(rows), dtype=np.int64)
    while True:  # Note [Capacity scaling]
        flow *= 2
        limit = _INT32_MAX if k == first else len(rows) + 1
        residual = np.where(inf, limit, np.minimum((cap >> k) - flow, limit))
        graph = csr_matrix((residual.astype(np.int32), indices, indptr), shape=(n, n))
        step = maximum_flow(graph, source, sink, method="dinic").flow
        flow += _on_pairs(step, n, keys)
        if k == 0:
            break
        k -= 1
    live = inf | (cap - flow > 0)
    return _reaches(n, rows[live], cols[live], sink)


def _on_pairs(step, n: int, keys: np.ndarray) -> np.ndarray:
    """The entries of a sparse flow matrix at the pairs (``keys = rows * n + cols``)."""
    coo = step.tocoo()
    out = np.zeros(len(keys), dtype=np.int64)
    if coo.nnz:
        at = np.searchsorted(keys, coo.row.astype(np.int64) * n + coo.col)
        out[at] = coo.data
    return out
