"""emitted: the forward and backward that :func:`ckptfx.passes.rewrite.rewrite` would emit for
a saved set, as node orders over the joint graph, without building them.

The peak search simulates many candidate plans of one graph (:mod:`ckptfx.candidates`).
Building each candidate's GraphModules copies every node of the joint graph two or three
times (AOTAutograd's extractor), which on a 48-layer GPT costs seconds per candidate. The
simulation needs only which nodes each graph runs, in what order, and who reads what; this
module derives exactly that from the joint graph, following the same rules step for step:

Note [Emitted graphs without building them]
    ``rewrite`` is ``split`` (AOTAutograd's extractor) then ``place_just_in_time``.

    1. The extractor's subgraph rule: a node is in a graph when every node it reads is (its
       inputs: placeholders given in order), except placeholders that are not inputs and
       nodes tagged for the other graph (``must_be_in_forward``/``_backward``), then fx's
       dead-code elimination (a node nobody reads goes unless it is impure; random ops count
       as impure as fx's own rule says in the calling context).
    2. The backward is extracted first; saved values it does not read are dropped (and
       those read only by dead ``wait_tensor`` nodes), the size symbols the saved values
       and tangents mention are bound by saving their binding nodes; then the forward (user
       outputs, saved values, opaque objects, SymInts) and the backward again.
    3. ``place_just_in_time``: unused forward copies leave the backward and tangent-
       independent nodes move just before their first user (the same functions run on
       both paths: :func:`ckptfx.passes.rewrite.just_in_time_order`).

    The result is a pair of :class:`ckptfx.memory.GraphView` that the liveness simulation
    reads as it reads the emitted GraphModules' graphs. ``tests/test_emitted.py`` checks,
    plan by plan on the model zoo, that the simulated timelines are equal step for step.
    Where a rule is not covered here (a graph output that the extractor would have to
    replace, opaque saved nodes), :meth:`EmittedLayout.views` returns None and the caller
    builds the graphs instead. The plan the search chooses is always rewritten for real;
    the report simulates those graphs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx as fx

from ckptfx import _torch_compat as compat
from ckptfx.analysis.nodes import is_movable
from ckptfx.joint import JointGraph, Role
from ckptfx.memory import GraphView, missing_vals_of
from ckptfx.passes.rewrite import dead_forward_copies, just_in_time_order


@dataclasses.dataclass(frozen=True)
class EmittedViews:
    """The emitted graphs of one saved set, as the simulation reads them.

    Attributes:
        forward: the forward's GraphView.
        backward: the backward's GraphView.
        user: the forward's user outputs.
        saved: backward input name -> the forward node it receives (what the forward
            really returns for the backward: values the backward never reads are dropped).
    """

    forward: GraphView
    backward: GraphView
    user: tuple[Any, ...]
    saved: dict[str, fx.Node]


class EmittedLayout:
    """The plan-independent facts of one joint graph that the emitted graphs follow from.

    Built once per joint graph (linear in its size); :meth:`views` then gives each saved
    set's graphs in time linear in the graph, without creating fx nodes.

    Args:
        joint: the JointGraph (not modified; it must not change while the layout is used).
    """

    def __init__(self, joint: JointGraph) -> None:
        graph = joint.graph
        self.nodes = tuple(n for n in graph.nodes if n.op != "output")
        self.by_name = {n.name: n for n in self.nodes}
        outs = list(compat.arg_tree_leaves(*graph.find_nodes(op="output")[0].args))
        self.fwd_outputs = outs[:joint.num_fwd_outputs]
        self.bwd_outputs = outs[joint.num_fwd_outputs:]
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.primals = [p for p in placeholders if compat.is_primal(p)]
        self.tangents = [p for p in placeholders if compat.is_tangent(p)]
        self.fwd_seeds = [p for p in placeholders if compat.is_fwd_seed_offset(p)]
        self.bwd_seeds = [p for p in placeholders if compat.is_bwd_seed_offset(p)]
        self.states = [p for p in placeholders if compat.is_backward_state(p)]
        self.must_fw = frozenset(n for n in self.nodes if compat.must_be_in_forward(n))
        self.must_bw = frozenset(n for n in self.nodes if compat.must_be_in_backward(n))
        impure_random = compat.dce_impure_random()
        self.impure = frozenset(n for n in self.nodes
                                if n.op != "placeholder" and n.is_impure(impure_random))
        self.movable = frozenset(n for n in self.nodes if is_movable(n, joint.fw_computable))
        self.forward = frozenset(n.name for n in joint.nodes_with(Role.FORWARD))
        self.inputs = {n: tuple(n.all_input_nodes) for n in self.nodes}
        self.users = {n: tuple(u for u in n.users if u.op != "output") for n in self.nodes}
        self.waits = frozenset(n for n in self.nodes if compat.is_wait_tensor(n))
        self.bindings = compat.symbol_binding_nodes(graph)
        self._symbols: dict[fx.Node, set] = {}
        self._valid: tuple[Any, Any] = (None, None)
        missing = set(missing_vals_of(self.nodes))
        self.no_val = frozenset(n for n in self.nodes if n.name in missing)

    def views(self, saved: tuple[str, ...]) -> EmittedViews | None:
        """The emitted graphs of a plan that saves ``saved`` (node names, as
        ``RematPlan.saved``), or None where Note [Emitted graphs without building them]
        does not cover the graph.

        Raises:
            KeyError: a saved name is not a node of the joint graph.
        """
        nodes = [self.by_name[s] for s in saved]
        sym = [n for n in nodes if compat.is_sym_node(n)]
        values = [n for n in nodes if not compat.is_sym_node(n)]
        if any(compat.is_opaque_node(n) for n in values):
            return None
        first_inputs = sym + values + self.tangents + self.bwd_seeds
        first = self._extract(first_inputs, self.bwd_outputs, "backward")
        if first is None:
            return None
        kept, users = first
        dropped = {p for p in sym + values
                   if not users[p] or p in self.states
                   or all(u in self.waits and not users[u] for u in users[p])}
        sym = self._bind_symbols([n for n in sym if n not in dropped],
                                 [n for n in values if n not in dropped])
        values = [n for n in values if n not in dropped]
        objects = [n for n in values if compat.is_script_object(n.meta.get("val"))]
        values = ([n for n in values if n not in objects
                   and not n.meta.get("saved_tensor_with_no_vc_check", False)]
                  + [n for n in values if n not in objects
                     and n.meta.get("saved_tensor_with_no_vc_check", False)])
        returned = self.fwd_outputs + values + objects + sym
        fw = self._extract(self.primals + self.fwd_seeds, returned, "forward")
        inputs = sym + values + objects + self.tangents + self.bwd_seeds + self.states
        if set(inputs) == set(first_inputs):  # nothing dropped or bound: the same graph
            given = set(inputs)
            bw = (list(dict.fromkeys(inputs)) + [n for n in kept if n not in given], users)
        else:
            bw = self._extract(inputs, self.bwd_outputs, "backward")
        if fw is None or bw is None:
            return None
        saved_map = {n.name: n for n in sym + values + objects}
        return EmittedViews(self._view(*fw, returned), self._backward(*bw, set(saved_map)),
                            tuple(self.fwd_outputs), saved_map)

    def _extract(self, inputs: list[fx.Node], outputs: list[Any], subgraph: str
                 ) -> tuple[list[fx.Node], dict[fx.Node, list[fx.Node]]] | None:
        """The extractor's subgraph (step 1): (its nodes in order, node -> users in it)."""
        given = set(inputs)
        key = (tuple(inputs), subgraph)
        if self._valid[0] == key:  # the forward's inputs are the same for every plan
            valid, order = self._valid[1]
        else:
            valid, order = self._computable(inputs, given, subgraph)
            if subgraph == "forward":
                self._valid = (key, (valid, order))
        if any(isinstance(x, fx.Node) and x not in valid for x in outputs):
            return None  # the extractor would look for a replacement output
        returned = {x for x in outputs if isinstance(x, fx.Node)}
        alive: set[fx.Node] = set()
        users: dict[fx.Node, list[fx.Node]] = {}
        every = self.users
        for node in reversed(order):
            # an input is a placeholder: it reads nothing (a saved value read only by
            # another saved value is not read at all)
            mine = [u for u in every[node] if u in alive and u not in given]
            if node in given or node in returned or mine or node in self.impure:
                alive.add(node)
                users[node] = mine
        return [n for n in order if n in alive], users

    def _computable(self, inputs, given, subgraph) -> tuple[set[fx.Node], list[fx.Node]]:
        """The nodes the extractor copies (before dead-code elimination), in order."""
        valid = set(given)
        order = list(dict.fromkeys(inputs))
        other = self.must_fw if subgraph == "backward" else self.must_bw
        for node in self.nodes:
            if node in given or node in other:
                continue
            if node.op == "get_attr" or (node.op == "call_function" and
                                         all(p in valid for p in self.inputs[node])):
                valid.add(node)
                order.append(node)
        return valid, order

    def _bind_symbols(self, sym: list[fx.Node], values: list[fx.Node]) -> list[fx.Node]:
        """The SymInts the backward receives: those saved, then the binding nodes of the
        size symbols the saved values and tangents mention, bindings first (step 2)."""
        bound: set = set()
        binding, derived = [], []
        for node in sym:
            symbol = compat.symbol_bound_by(node)
            if symbol is not None:
                bound.add(symbol)
                binding.append(node)
            else:
                derived.append(node)
        for node in derived + values + self.tangents:
            if "val" not in node.meta:
                continue
            if node not in self._symbols:
                self._symbols[node] = compat.free_size_symbols(node.meta["val"])
            new = self._symbols[node] - bound
            for s in sorted(new, key=lambda s: s.name):
                if s in self.bindings:
                    binding.append(self.bindings[s])
            bound |= new
        return binding + derived

    @staticmethod
    def _view(nodes: list[fx.Node], users: dict[fx.Node, list[fx.Node]],
              returned: list[Any]) -> GraphView:
        return GraphView(tuple(nodes), {n: tuple(users[n]) for n in nodes}, tuple(returned))

    def _backward(self, nodes: list[fx.Node], users: dict[fx.Node, list[fx.Node]],
                  placeholders: set[str]) -> GraphView:
        """The backward after ``place_just_in_time`` (step 3)."""
        returned = {x for x in self.bwd_outputs if isinstance(x, fx.Node)}
        given = set(self.tangents + self.bwd_seeds + self.states) | \
            {n for n in nodes if n.name in placeholders}

        def users_of(node):  # the output counts as a user
            return users[node] + ([None] if node in returned else [])

        def inputs_of(node):
            return () if node in given else self.inputs[node]

        dead = dead_forward_copies(nodes, users_of, self.forward)
        order = just_in_time_order(nodes, inputs_of, users_of,
                                   lambda n: n not in given and n in self.movable, dead)
        placed = set(order)
        final = [n for n in nodes if n not in placed and n not in dead] + order
        live = set(final)
        return GraphView(tuple(final), {n: tuple(u for u in users[n] if u in live)
                                        for n in final}, tuple(self.bwd_outputs))
