"""Min-cut solver: the saved set of least bytes, as a minimum s-t cut (SciPy's max-flow,
exact at any capacity through :mod:`ckptfx.solvers.flow`; networkx describes the network
when it has no finite cut).

Construction (node splitting; Checkmate, Jain et al. 2020; PyTorch's
``min_cut_rematerialization_partition``): every candidate ``n`` becomes ``n.in -> n.out``
with capacity = bytes of saving ``n``; data edges ``p.out -> n.in`` and the constraint edges
below are infinite. A finite cut separates what the forward keeps (source side) from what the
backward needs (sink side); the cut ``n.in -> n.out`` edges are the saved values.

Constraint edges, each with its reason (kept so an impossible cut can explain itself):

* ``source -> n.in``: n is a primal, may not be recomputed (random, side effect, collective),
  is compute-intensive (unless ``recompute_expensive``, a MUST_RECOMPUTE vote, or a
  PREFER_RECOMPUTE vote: a preference for recomputing overrides this default), or a
  policy says MUST_SAVE.
* ``n.out -> sink``: a backward node reads n.
* ``n.in -> n.out`` infinite: n cannot be saved (a tuple), or a policy says MUST_RECOMPUTE.

Note [Min-cut tie-breaking]
    Capacities are ``bytes * K + (N - i)`` for the i-th of N nodes with ``K > N**2``: the cut
    is lexicographically the least bytes first, then the latest nodes, which recomputes
    fewer ops among equal-byte cuts. PREFER_SAVE halves a node's bytes and PREFER_RECOMPUTE
    doubles them: soft preferences that a large enough byte difference overrules.
"""

from __future__ import annotations

from collections import deque

from ckptfx.errors import UnsupportedGraphError
from ckptfx.solvers.base import Force, ProblemNode, SolveProblem, Solution, needed_closure

SOURCE, SINK = "__source__", "__sink__"


def _weight(node: ProblemNode) -> float:
    w = float(node.nbytes)
    if node.prefer > 0:
        w *= 0.5
    elif node.prefer < 0:
        w *= 2.0
    return w


def _source_reason(node: ProblemNode, recompute_expensive: bool) -> str | None:
    if node.is_input:
        return "graph input"
    if node.force == Force.SAVE:
        return node.reason or "MUST_SAVE"
    if node.in_forward and not node.can_recompute:
        return node.reason or "may not be recomputed"
    if (node.in_forward and node.expensive and not recompute_expensive
            and node.force != Force.RECOMPUTE and node.prefer >= 0):
        return "compute-intensive op (the min-cut saves it; recompute_expensive=True allows)"
    return None


def build_flow_graph(problem: SolveProblem, recompute_expensive: bool = False):
    """The flow network of the construction above (a ``networkx.DiGraph``).

    Infinite edges have no ``capacity`` attribute (networkx's convention) and carry
    ``reason``.
    """
    import networkx as nx

    g = nx.DiGraph()
    n = len(problem.nodes)
    scale = n * n + 1
    for i, node in enumerate(problem.nodes):
        a, b = (node.name, "in"), (node.name, "out")
        if node.can_save and node.force != Force.RECOMPUTE:
            g.add_edge(a, b, capacity=int(round(_weight(node))) * scale + (n - i))
        else:
            g.add_edge(a, b, reason=node.reason or ("MUST_RECOMPUTE" if node.force else "cannot be saved"))
        why = _source_reason(node, recompute_expensive)
        if why is not None:
            g.add_edge(SOURCE, a, reason=why)
        if node.needed_by_backward:
            g.add_edge(b, SINK, reason="read by the backward")
        for p in node.inputs:
            g.add_edge((p, "out"), a, reason="data dependency")
    g.add_node(SOURCE)
    g.add_node(SINK)
    return g


def flow_arrays(problem: SolveProblem, recompute_expensive: bool = False):
    """The flow network of :func:`build_flow_graph` as arrays for :mod:`ckptfx.solvers.flow`:
    vertex 0 is the source, 1 the sink, ``2 + 2 * i`` and ``3 + 2 * i`` the ``in`` and
    ``out`` of the i-th node.

    Returns:
        (number of vertices, tails, heads, capacities, infinite flags): one entry per edge.
    """
    n = len(problem.nodes)
    scale = n * n + 1
    index = {node.name: i for i, node in enumerate(problem.nodes)}
    tails, heads, caps, infinite = [], [], [], []

    def edge(u: int, v: int, cap: int | None) -> None:
        tails.append(u)
        heads.append(v)
        caps.append(cap or 0)
        infinite.append(cap is None)

    for i, node in enumerate(problem.nodes):
        a, b = 2 + 2 * i, 3 + 2 * i
        if node.can_save and node.force != Force.RECOMPUTE:
            edge(a, b, int(round(_weight(node))) * scale + (n - i))
        else:
            edge(a, b, None)
        if _source_reason(node, recompute_expensive) is not None:
            edge(0, a, None)
        if node.needed_by_backward:
            edge(b, 1, None)
        for p in node.inputs:
            if p in index:  # a name outside the problem is no vertex: it carries no flow
                edge(3 + 2 * index[p], a, None)
    return 2 + 2 * n, tails, heads, caps, infinite


def _sink_side(problem: SolveProblem, recompute_expensive: bool) -> list[tuple[bool, bool]]:
    """Per node, whether its ``in`` and ``out`` vertices lie on the sink side of the minimum
    cut (the cut ``networkx.minimum_cut`` returns; Note [Capacity scaling]).

    Raises:
        UnsupportedGraphError: no finite cut (the message is an infinite path).
    """
    from ckptfx.solvers import flow

    arrays = flow_arrays(problem, recompute_expensive)
    try:
        side = flow.sink_side(*arrays, source=0, sink=1).tolist()
    except flow.Unbounded:
        path = infinite_path(build_flow_graph(problem, recompute_expensive))
        raise UnsupportedGraphError(
            "min-cut: the constraints leave no finite cut; a value the backward needs can be "
            "neither saved nor recomputed: " + " ; ".join(path)) from None
    except ValueError:  # capacities beyond int64 flows: networkx's exact integers
        import networkx as nx

        g = build_flow_graph(problem, recompute_expensive)
        _, (_, sink) = nx.minimum_cut(g, SOURCE, SINK)
        return [((n.name, "in") in sink, (n.name, "out") in sink) for n in problem.nodes]
    return [(side[2 + 2 * i], side[3 + 2 * i]) for i in range(len(problem.nodes))]


def infinite_path(g) -> list[str]:
    """A source-to-sink path of infinite edges, as readable steps (empty if none)."""
    parent: dict = {SOURCE: None}
    queue = deque([SOURCE])
    while queue:
        u = queue.popleft()
        if u == SINK:
            break
        for v, data in g[u].items():
            if "capacity" not in data and v not in parent:
                parent[v] = u
                queue.append(v)
    if SINK not in parent:
        return []
    steps, v = [], SINK
    while parent[v] is not None:
        u = parent[v]
        steps.append(f"{_label(u)} -> {_label(v)} ({g[u][v]['reason']})")
        v = u
    return steps[::-1]


def _label(x) -> str:
    return x if isinstance(x, str) else f"{x[0]}.{x[1]}"


class MinCutSolver:
    """Least saved bytes subject to the constraint edges; ignores the budget.

    Args:
        recompute_expensive: let the cut recompute compute-bound (``expensive``) nodes.

    Raises:
        UnsupportedGraphError: the constraints admit no finite cut (e.g. a node that must be
            recomputed depends on a random op); the message is the offending path.
    """

    name = "mincut"

    takes_budget = False  # least bytes under the constraints, whatever the budget

    def __init__(self, recompute_expensive: bool = False) -> None:
        self.recompute_expensive = recompute_expensive

    def solve(self, problem: SolveProblem) -> Solution:
        if not any(n.needed_by_backward for n in problem.nodes):
            return Solution(saved=(), objective=0.0, notes=("backward reads no forward value",))
        sides = _sink_side(problem, self.recompute_expensive)
        saved = tuple(n.name for n, (a, b) in zip(problem.nodes, sides) if b and not a)
        recomputed, violations = needed_closure(problem, set(saved))
        if violations:  # cannot happen for a finite cut; guard the invariant anyway
            raise UnsupportedGraphError("min-cut produced an invalid saved set: " + "; ".join(violations))
        nodes = problem.by_name()
        objective = float(sum(nodes[s].nbytes for s in saved))
        reasons = [(s, "min-cut: saving it is part of the least-bytes cut") for s in saved]
        reasons += [(r, "min-cut: cheaper to recompute from saved values than to save")
                    for r in sorted(recomputed) if nodes[r].in_forward]
        return Solution(saved=saved, objective=objective, lower_bound=objective,
                        reasons=tuple(reasons), notes=("min-cut optimal over saved bytes",))

