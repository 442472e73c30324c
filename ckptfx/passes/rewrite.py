"""rewrite: a RematPlan applied to a joint graph -> verified forward and backward GraphModules.

Two stages, each a function of graphs to graphs, then the invariants check
(:mod:`ckptfx.passes.verify`):

1. ``split``: AOTAutograd's extractor with the plan's saved set (see
   ``Note [Reusing AOTAutograd's extractor]`` in ``ckptfx/_torch_compat.py``). The forward
   returns the user outputs, then the saved tensors, then the SymInts the backward needs;
   every forward value the backward reads but that is not saved is copied into the backward
   graph: that copy is the recomputation.
2. ``place_just_in_time``: the backward is re-ordered (in place: Note [Re-ordering in
   place]) so that every node that depends on no tangent (recomputed forward nodes and
   backward-native ones) runs just before its first user, so a recomputed chain is alive
   only from its recomputation to its last use (Invariant 4 of the design).
"""

from __future__ import annotations

import torch.fx as fx

from ckptfx import _torch_compat as compat
from ckptfx.analysis.nodes import is_movable
from ckptfx.joint import JointGraph, Role
from ckptfx.passes.verify import verify
from ckptfx.plan import RematPlan

META_KEY = "ckptfx.recompute"  # node.meta key marking recomputed nodes in the backward


def split(joint: JointGraph, plan: RematPlan) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The forward and backward GraphModules that save exactly ``plan.saved``."""
    by_name = {n.name: n for n in joint.graph.nodes}
    saved = [by_name[s] for s in plan.saved]
    saved_sym = [n for n in saved if compat.is_sym_node(n)]
    saved_values = [n for n in saved if not compat.is_sym_node(n)]
    return compat.extract_fwd_bwd(joint.gm, saved_values, saved_sym, joint.num_fwd_outputs)


def dead_forward_copies(nodes, users_of, forward: frozenset[str]) -> set[fx.Node]:
    """Copies of forward nodes in the backward that nothing uses.

    AOTAutograd's extractor copies every node whose inputs are available; fx's dead-code
    elimination keeps impure ones (random ops), which would redo the forward's work and
    advance the RNG a second time. A forward node is computed by the forward; its unused
    copy in the backward is always removable, whatever its purity.

    Args:
        nodes: the backward's nodes, in order.
        users_of: node -> its users in the backward (the output included).
        forward: names of the joint graph's forward nodes.
    """
    dead: set[fx.Node] = set()
    for node in reversed(nodes):
        if node.op == "call_function" and node.name in forward and \
                all(u in dead for u in users_of(node)):
            dead.add(node)
    return dead


def just_in_time_order(nodes, inputs_of, users_of, movable,
                       dead: set[fx.Node] = frozenset()) -> list[fx.Node]:
    """The order :func:`place_just_in_time` gives the backward's ``nodes`` (``dead`` ones
    left out): each node that may move (``movable(node)``: it depends on no tangent) just
    before its first user, the others where they are.

    Args:
        nodes: the backward's nodes, in order.
        inputs_of: node -> the nodes it reads in the backward.
        users_of: node -> its users in the backward (the output included).
        movable: whether a node may move.
        dead: nodes to leave out.
    """
    placed: set[fx.Node] = set()
    order: list[fx.Node] = []

    def emit(node: fx.Node) -> None:
        # Iterative post-order over not-yet-placed movable producers.
        stack = [(node, False)]
        while stack:
            cur, expanded = stack.pop()
            if cur in placed:
                continue
            if expanded:
                placed.add(cur)
                order.append(cur)
                continue
            stack.append((cur, True))
            for p in reversed(inputs_of(cur)):
                if p not in placed:
                    stack.append((p, False))

    for node in nodes:
        if node in dead or (movable(node) and users_of(node)):
            continue  # dropped, or placed on demand by its first user
        emit(node)
    return order


def place_just_in_time(bw: fx.GraphModule, fw_computable: frozenset[str],
                       recomputed: frozenset[str], forward: frozenset[str] = frozenset()
                       ) -> fx.GraphModule:
    """Re-orders ``bw`` with tangent-independent nodes just before their first use.

    Note [Re-ordering in place]
        The backward the extractor returns is a graph of its own, which nothing else holds:
        its nodes are moved (``Node.prepend``, constant time each) rather than copied into
        a fresh graph, which on a 48-layer GPT cost as much as the rest of the rewrite.

    Args:
        bw: the backward GraphModule (its graph is re-ordered in place).
        fw_computable: names (joint-graph names) of nodes that depend on no tangent.
        recomputed: names of recomputed forward nodes (marked ``meta["ckptfx.recompute"]``).
        forward: names of the joint graph's forward nodes; unused copies of them are dropped.

    Returns:
        ``bw``, computing the same values in the new order.
    """
    graph = bw.graph
    nodes = list(graph.nodes)
    dead = dead_forward_copies(nodes, _users, forward)
    order = just_in_time_order(nodes, _inputs, _users,
                               lambda n: is_movable(n, fw_computable), dead)
    for node in reversed(nodes):
        if node in dead:
            graph.erase_node(node)
    out = graph.find_nodes(op="output")[0]
    for node in order:
        if node is not out:
            out.prepend(node)
        if node.name in recomputed:
            node.meta[META_KEY] = True
    bw.recompile()  # rewrite() lints it, with the other invariants (passes/verify.py)
    return bw


def _users(node: fx.Node):
    return node.users


def _inputs(node: fx.Node):
    return node.all_input_nodes


def rewrite(joint: JointGraph, plan: RematPlan) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Applies ``plan``: forward and backward GraphModules, verified. The public
    :func:`ckptfx.apply_plan` adds the report.

    Args:
        joint: the joint graph the plan was made for.
        plan: the plan.

    Returns:
        (forward, backward) GraphModules in AOTAutograd's calling convention.

    Raises:
        PlanValidationError: the emitted graphs break an invariant (see passes/verify.py).
    """
    fw, bw = split(joint, plan)
    forward = frozenset(n.name for n in joint.nodes_with(Role.FORWARD))
    bw = place_just_in_time(bw, joint.fw_computable, frozenset(plan.recomputed), forward)
    verify(joint, plan, fw, bw)
    return fw, bw
