"""The exact max-flow engine of the min-cut (ckptfx/solvers/flow.py) against networkx: the same
cut on random problems at every capacity scale, unbounded networks, and the fallback beyond
int64 flows."""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
import pytest

from ckptfx.solvers import flow, mincut
from ckptfx.solvers.base import ProblemNode as N, SolveProblem

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_properties import small_problems  # noqa: E402


def _networkx_saved(problem: SolveProblem, recompute_expensive: bool) -> tuple[str, ...]:
    g = mincut.build_flow_graph(problem, recompute_expensive)
    _, (reachable, _) = nx.minimum_cut(g, mincut.SOURCE, mincut.SINK)
    return tuple(n.name for n in problem.nodes
                 if (n.name, "in") in reachable and (n.name, "out") not in reachable)


def _scaled(problem: SolveProblem, factor: int) -> SolveProblem:
    return dataclasses.replace(problem, nodes=tuple(
        dataclasses.replace(n, nbytes=n.nbytes * factor) for n in problem.nodes))


@settings(max_examples=150, deadline=None)
@given(small_problems(max_nodes=14), st.sampled_from([1, 3, 2 ** 20 + 7, 2 ** 33 + 1]),
       st.booleans())
def test_same_cut_as_networkx(problem, factor, recompute_expensive):
    problem = _scaled(problem, factor)
    try:
        want = _networkx_saved(problem, recompute_expensive)
    except nx.NetworkXUnbounded:
        with pytest.raises(mincut.UnsupportedGraphError, match="no finite cut"):
            mincut.MinCutSolver(recompute_expensive).solve(problem)
        return
    if not any(n.needed_by_backward for n in problem.nodes):
        return  # the solver answers without a flow
    assert mincut.MinCutSolver(recompute_expensive).solve(problem).saved == want


def test_capacities_beyond_32_bits_keep_their_low_bits():
    # two parallel routes whose capacities differ only in the lowest bit, far above 2**31
    big = 2 ** 40
    side = flow.sink_side(4, [0, 0, 2, 3], [2, 3, 1, 1], [0, 0, big + 1, big],
                          [True, True, False, False], source=0, sink=1)
    assert side.tolist() == [False, True, False, False]  # both routes are cut
    side = flow.sink_side(4, [0, 2, 3], [2, 3, 1], [0, big, big + 1],
                          [True, False, False], source=0, sink=1)
    assert side.tolist() == [False, True, False, True]  # the smaller edge of the chain


def test_infinite_path_is_unbounded():
    with pytest.raises(flow.Unbounded):
        flow.sink_side(3, [0, 2], [2, 1], [0, 0], [True, True], source=0, sink=1)


def test_capacities_beyond_int64_flows_use_networkx():
    huge = 2 ** 61
    nodes = (N("x", 0, 0, is_input=True), N("a", huge, 1, ("x",), needed_by_backward=True),
             N("b", huge, 1, ("a",), needed_by_backward=True))
    problem = SolveProblem(nodes)
    with pytest.raises(ValueError, match="int64"):
        flow.sink_side(*mincut.flow_arrays(problem), source=0, sink=1)
    assert mincut.MinCutSolver().solve(problem).saved == _networkx_saved(problem, False)
    assert mincut.MinCutSolver().solve(problem).saved == ("x",)


def test_parallel_edges_add_up():
    side = flow.sink_side(3, [0, 2, 2], [2, 1, 1], [0, 3, 4], [True, False, False],
                          source=0, sink=1)
    assert side.tolist() == [False, True, False]
    assert isinstance(side, np.ndarray)
