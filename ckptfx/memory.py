"""Liveness-based peak-memory simulation of the emitted forward and backward graphs.

``simulate(fw, bw)`` replays one training step (forward, then backward, in AOTAutograd's
calling convention) over storages and returns a :class:`MemoryTimeline`: the bytes live at
every step, the peak and its node, the bytes kept for the backward. ``predict_peak`` is the
peak alone, as the report shows it.

Call tree::

    simulate(fw, bw, hints, buffers)
    ├── saved_inputs(fw, bw)         backward placeholder -> forward output it receives
    ├── _storages(fw, ...)           storages each node references / allocates  (aliasing)
    │   └── _alias_sources(node)     schema alias info, else fake-storage identity
    ├── _replay(fw, ...)             allocate at the node, free after the last alias use
    ├── _storages(bw, ...)           saved placeholders reuse the forward's storages
    └── _replay(bw, ...)

    storage_timeline(fw, bw, hints)  the same, keeping each step's live storages and their
                                     sizes as expressions (timeline labels, size formulas)

Example:
    >>> import torch, ckptfx
    >>> from ckptfx.memory import simulate
    >>> x = torch.randn(64, 64, requires_grad=True)
    >>> joint = ckptfx.trace_joint(lambda x: x.sin().sin().sum(), x)
    >>> fw, bw, _ = ckptfx.apply_plan(joint, ckptfx.plan_remat(joint))
    >>> t = simulate(fw, bw)
    >>> (t.peak_bytes, t.peak_graph.value, t.saved_bytes)  # x is a primal: kept, not counted
    (49152, 'backward', 0)

Note [Memory model]
    One step runs the forward graph, then the backward graph. Bytes are counted per
    *storage*, in the order the graphs' nodes run:

    * Graph inputs (primals: parameters, buffers and the batch; RNG seeds; ``get_attr``
      constants) are resident before and after the step and are not counted; neither is a
      view of one, nor a saved value that aliases one.
    * A ``call_function`` output is allocated when its node runs (all outputs of a
      multi-output op at once) and freed right after its last use in its graph; a node with
      no user frees its outputs right after it runs. ``live_bytes`` of a step is the bytes
      live while the node runs: its inputs and its new outputs.
    * Aliases share their base's storage: views (the op schema's alias annotation, e.g.
      ``t(Tensor(a) self) -> Tensor(a)``), ``getitem`` of a multi-output node, ops whose
      output is written in place (``copy_(Tensor(a!) self, ...) -> Tensor(a!)``: mutations
      allocate nothing) and ops whose fake output shares its input's storage although the
      schema says nothing (``_unsafe_view``). A storage is counted once, alive until the last
      use of any alias, and a tuple-valued node keeps every item alive until its last
      ``getitem``.
    * Forward outputs: saved tensors stay alive until their last use in the backward; user
      outputs (the loss, logits, ...) are dropped when the forward returns, unless saved:
      the caller keeps none of them through the backward (``model(x).loss.backward()``),
      and each one it does not backpropagate from reaches the backward as a tangent (zeros
      that AOTAutograd allocates), counted there. An output the caller holds through the
      backward adds its bytes to every backward step (not modelled).
    * Tangents are allocated when the backward starts and freed after their last use. An
      input the backward never reads is freed when it starts (FX code keeps it to the end).
    * Backward outputs (gradients) stay alive to the end of the step.
    * Sizes are the fake tensors' storage sizes (``meta["val"]``), falling back to
      ``numel * itemsize`` (:func:`ckptfx.analysis.sizes.tensor_bytes`); symbolic sizes are
      evaluated with :class:`SizeHints`. SymInts live on the host and count 0 bytes.
    * A node whose op returns nothing (its schema has no returns: the ``_assert_scalar`` of
      ``torch._check``) needs no ``meta["val"]``: it allocates 0 bytes. Any other node
      without one makes the peak unknown (:func:`predict_peak` returns None).

    This is what executes when the inner compiler's code takes its inputs boxed and drops
    each value after its last use (Inductor, or FX code with the boxed calling convention):
    ``tests/test_memory.py`` measures it exactly. Not modelled: allocator rounding and
    caching, kernel workspaces (scratch memory inside one op), Inductor's buffer reuse, and
    FX code with positional arguments, which keeps every input alive until it returns.
    Inductor's fusion is modelled when the caller names the nodes that own a buffer
    (Note [Fused values]).

Note [Fused values]
    A compiler that fuses a chain of pointwise ops computes the chain's intermediates inside
    the kernel of the value it materialises: they never get a buffer. ``simulate(...,
    buffers={graph: names})`` takes the names of the call nodes of each graph that own a
    buffer; the storages of the other call nodes count 0 bytes, and each of them reads its
    inputs where its own value is read, so an input of a fused chain lives until the kernel
    that computes the chain's result (its last reader, transitively through fused nodes).
    Views of a fused value alias it as usual. The backend passes the buffers Inductor
    allocated (``ckptfx._torch_compat``, Note [Buffers Inductor allocates]); without
    ``buffers`` every call node owns its outputs. Not modelled: a buffer the generated
    code reuses (in place, or a dead one kept for a later one of the same size).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import operator
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, NamedTuple

import sympy
import torch
import torch.fx as fx

from ckptfx import _torch_compat as compat
from ckptfx.analysis.nodes import storage_id
from ckptfx.analysis.sizes import SizeHints, tensor_bytes
from ckptfx.errors import UnsupportedGraphError

log = logging.getLogger("ckptfx.memory")



class Phase(enum.Enum):
    """The graph of the step a simulated step runs in (not a node's Role, nor an Action)."""

    FORWARD = "forward"
    BACKWARD = "backward"


FORWARD, BACKWARD = Phase.FORWARD, Phase.BACKWARD

_Key = tuple[Phase, str, int]  # (graph, allocating node, output index): one storage


class MemoryStep(NamedTuple):
    """One step of the simulation (a named tuple: a deep graph's timeline has tens of
    thousands of them).

    Attributes:
        graph: the Phase (``FORWARD`` or ``BACKWARD``).
        node: the node running (a ``call_function`` node, or a tangent placeholder).
        live_bytes: bytes live while it runs (its inputs and its new outputs), bytes.
    """

    graph: Phase
    node: str
    live_bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryTimeline:
    """The simulated memory of one training step (see Note [Memory model]).

    Attributes:
        steps: every step of the forward, then of the backward.
        peak_bytes: the largest ``live_bytes``, bytes (0 for graphs that allocate nothing).
        peak_graph: the Phase of the first step at the peak (None without steps).
        peak_node: the node of the first step at the peak (``""`` without steps).
        saved_bytes: bytes of the storages kept from the forward for the backward (saved
            tensors, counted once per storage; primals and SymInts count 0), bytes.
        boundary_bytes: bytes live between the forward and the backward (the saved
            tensors; user outputs are dropped), bytes.
    """

    steps: tuple[MemoryStep, ...]
    peak_bytes: int
    peak_graph: Phase | None
    peak_node: str
    saved_bytes: int
    boundary_bytes: int

    def peak_of(self, graph: Phase) -> MemoryStep | None:
        """The first step at the peak of ``graph``, or None."""
        steps = [s for s in self.steps if s.graph == graph]
        return max(steps, key=lambda s: s.live_bytes, default=None)

    def live_at(self, graph: Phase, node: str) -> int:
        """``live_bytes`` of the step running ``node`` in ``graph``.

        Raises:
            KeyError: no step ran that node.
        """
        for s in self.steps:
            if s.graph == graph and s.node == node:
                return s.live_bytes
        raise KeyError(f"no step runs {graph.value} node {node!r}")


@dataclasses.dataclass(frozen=True)
class _Storages:
    """The storages of one graph: which each node references, which it allocates, sizes.

    ``refs[node][j]`` is the storage of the node's j-th output (None: not a tensor).
    """

    refs: Mapping[fx.Node, tuple[_Key | None, ...]]
    created: Mapping[fx.Node, tuple[_Key, ...]]
    nbytes: Mapping[_Key, int]  # bytes per storage; 0 for graph inputs (not counted)
    fused: frozenset[fx.Node] = frozenset()  # computed inside their users' kernels: 0 bytes
    received: frozenset[fx.Node] = frozenset()  # the graph's saved-value inputs: no step


@dataclasses.dataclass(frozen=True)
class GraphView:
    """A graph as the simulation reads it (an emitted GraphModule, or the node order
    :mod:`ckptfx.passes.emitted` predicts for one without building it).

    Attributes:
        nodes: its nodes in execution order, the output node left out.
        users: node -> its users among ``nodes``.
        returned: the leaves of the output's arguments (nodes, None, constants).
    """

    nodes: tuple[fx.Node, ...]
    users: Mapping[fx.Node, tuple[fx.Node, ...]]
    returned: tuple[Any, ...]

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "GraphView":
        """The view of a GraphModule's graph."""
        nodes = tuple(n for n in gm.graph.nodes if n.op != "output")
        users = {n: tuple(u for u in n.users if u.op != "output") for n in nodes}
        out = gm.graph.find_nodes(op="output")
        returned = tuple(compat.arg_tree_leaves(*out[0].args)) if out else ()
        return cls(nodes, users, returned)


class _Memo:
    """Per-node facts that do not depend on the plan (alias sources, storage bytes under
    one SizeHints), kept across the simulations of one graph's candidate plans."""

    def __init__(self) -> None:
        self.outputs: dict[fx.Node, tuple[tuple[int | None, fx.Node | None], ...]] = {}
        self.storages: dict[Phase, dict[fx.Node, tuple]] = {}  # graphs that receive nothing


def _leaves(val: Any) -> list[Any]:
    return list(val) if isinstance(val, (list, tuple)) else [val]


def _storage_nbytes(val: torch.Tensor, hints: SizeHints) -> int:
    """Bytes of the storage a fresh output ``val`` (a fake tensor) allocates."""
    try:
        nbytes = val.untyped_storage().nbytes()
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return hints.evaluate(tensor_bytes(val))
    if isinstance(nbytes, torch.SymInt):
        return hints.evaluate(sympy.sympify(nbytes.node.expr))
    return int(nbytes)


def _same_storage(a: Any, b: Any) -> bool:
    ida = storage_id(a)
    return ida is not None and ida == storage_id(b)


@functools.lru_cache(maxsize=None)
def _alias_candidates(target: Any) -> tuple[tuple[tuple[int, str], ...], ...] | None:
    """Per return of an op's schema, the (position, name) of the arguments it may alias, in
    schema order; None when the schema has no returns (or there is no schema)."""
    schema = compat.op_schema(target)
    if schema is None or not schema.returns:
        return None
    annotated = [(i, a) for i, a in enumerate(schema.arguments) if a.alias_info is not None]
    out = []
    for ret in schema.returns:
        info = ret.alias_info
        # TorchScript's parser drops the set of ``Tensor(a)[]`` returns (split, unbind): such
        # a return aliases the argument annotated ``Tensor(a -> *)``.
        out.append(() if info is None else tuple(
            (i, a.name) for i, a in annotated
            if set(a.alias_info.before_set) & set(info.before_set)
            or (not info.before_set and "*" in set(a.alias_info.after_set))))
    return tuple(out)


def _schema_sources(node: fx.Node, n_out: int) -> list[fx.Node | None]:
    """Per output, the argument it aliases according to the op schema, or None."""
    try:
        candidates = _alias_candidates(node.target)
    except TypeError:  # an unhashable target has no schema to cache
        candidates = None
    if candidates is None:
        return [None] * n_out
    args, kwargs = node.args, node.kwargs
    sources = []
    for j in range(n_out):
        found = None
        for i, name in candidates[min(j, len(candidates) - 1)]:
            value = args[i] if i < len(args) else kwargs.get(name)
            if isinstance(value, fx.Node):
                found = value
                break
        sources.append(found)
    return sources


def _alias_sources(node: fx.Node) -> list[fx.Node | None]:
    """Per output of a call node, the input node whose storage it shares, or None (fresh)."""
    outs = _leaves(node.meta.get("val"))
    sources = _schema_sources(node, len(outs))
    inputs = node.all_input_nodes
    for j, out in enumerate(outs):
        if sources[j] is None:
            sources[j] = next((p for p in inputs if _same_storage(out, p.meta.get("val"))), None)
    return sources


def _call_refs(node: fx.Node, refs: Mapping[fx.Node, tuple[_Key | None, ...]], tag: Phase,
               hints: SizeHints, nbytes: dict[_Key, int], memo: _Memo | None = None
               ) -> tuple[tuple[_Key | None, ...], tuple[_Key, ...]]:
    """(storage per output, storages allocated) of one call_function node."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        parent, idx = refs[node.args[0]], node.args[1]
        if isinstance(idx, int) and -len(parent) <= idx < len(parent):
            return (parent[idx],), ()
        return (None,), ()
    outputs = memo.outputs.get(node) if memo is not None else None
    if outputs is None:
        outputs = _outputs(node, hints)
        if memo is not None:
            memo.outputs[node] = outputs
    own: list[_Key | None] = []
    created = []
    for j, (size, src) in enumerate(outputs):
        if size is None:  # not a tensor
            own.append(None)
            continue
        if src is not None:
            found = None
            for k in refs.get(src, ()):
                if k is not None:
                    found = k
                    break
            if found is not None:  # an alias of a storage this graph references
                own.append(found)
                continue
        key = (tag, node.name, j)
        nbytes[key] = size
        own.append(key)
        created.append(key)
    return tuple(own), tuple(created)


def _outputs(node: fx.Node, hints: SizeHints) -> tuple[tuple[int | None, fx.Node | None], ...]:
    """Per output of a call node: (bytes of the storage it would allocate, None if it is not
    a tensor; the input whose storage it may share, or None)."""
    return tuple((_storage_nbytes(out, hints) if isinstance(out, torch.Tensor) else None, src)
                 for out, src in zip(_leaves(node.meta.get("val")), _alias_sources(node)))


def _storages(view: GraphView, tag: Phase, inputs: Mapping[str, tuple[_Key, ...]],
              hints: SizeHints, buffers: frozenset[str] | None = None,
              memo: _Memo | None = None) -> _Storages:
    """Finds the storages of a graph (see Note [Memory model]).

    Args:
        view: the graph's GraphView.
        tag: the Phase (names the storages it allocates).
        inputs: placeholder name -> storages it receives from the other graph (saved values).
            A tangent placeholder allocates a storage; any other is a resident input.
        hints: evaluates symbolic sizes.
        buffers: names of the call nodes that own a buffer (None: every one); the
            storages of the others count 0 bytes (Note [Fused values]).
        memo: plan-independent facts kept across calls on the same nodes.
    """
    refs: dict[fx.Node, tuple[_Key | None, ...]] = {}
    created: dict[fx.Node, tuple[_Key, ...]] = {}
    nbytes: dict[_Key, int] = {}
    fused = set()
    received = set()
    # a graph that receives nothing (a forward) gives each node the same storages whatever
    # else it holds: kept across the candidate plans of one graph
    same = memo.storages.setdefault(tag, {}) if memo is not None and not inputs \
        and buffers is None else None
    for node in view.nodes:
        if same is not None and node in same:
            refs[node], created[node], sizes = same[node]
            nbytes.update(sizes)
            continue
        val = node.meta.get("val")
        if node.name in inputs:  # a saved value: a placeholder of the backward
            refs[node] = inputs[node.name]
            received.add(node)
        elif node.op in ("placeholder", "get_attr"):
            if not isinstance(val, torch.Tensor):
                refs[node] = (None,)
                continue
            key = (tag, node.name, 0)
            counted = node.op == "placeholder" and compat.is_tangent(node)
            nbytes[key] = _storage_nbytes(val, hints) if counted else 0
            refs[node], created[node] = (key,), ((key,) if counted else ())
        elif node.op == "call_function":
            refs[node], created[node] = _call_refs(node, refs, tag, hints, nbytes, memo)
            if buffers is not None and created[node] and node.name not in buffers:
                fused.add(node)
                nbytes.update((k, 0) for k in created[node])
        else:
            raise UnsupportedGraphError(
                f"memory simulation: node {node.name!r} has op {node.op!r}; only placeholder, "
                f"get_attr, call_function and output are supported (inline submodules first)")
        if same is not None and node in created:
            own = tuple((k, nbytes[k]) for k in refs[node] if k is not None and k[1] == node.name)
            same[node] = (refs[node], created[node], own)
    return _Storages(refs, created, nbytes, frozenset(fused), frozenset(received))


def _lifetimes(view: GraphView, st: _Storages) -> tuple[dict[_Key, int], set[_Key]]:
    """(storage -> index of the node after which it dies, storages the output returns).

    A fused user reads its inputs where its own value is read (Note [Fused values]), so
    nodes are visited last to first: a fused node's storages end before its inputs'.
    """
    nodes = view.nodes
    order = {n: i for i, n in enumerate(nodes)}
    last: dict[_Key, int] = {}
    returned = _refs_of(list(view.returned), st.refs)
    users, fused, created = view.users, st.fused, st.created
    for node in reversed(nodes):
        end = order[node]
        for user in users[node]:
            if user in fused:
                end = max([end, order[user]] + [last.get(k, -1) for k in created[user]])
            elif order[user] > end:
                end = order[user]
        for key in st.refs[node]:
            if key is not None and last.get(key, -1) < end:
                last[key] = end
    return last, returned


def _replay(view: GraphView, tag: Phase, st: _Storages, nbytes: Mapping[_Key, int],
            live: int, keep: set[_Key]) -> tuple[list[MemoryStep], int]:
    """Runs the liveness of one graph from ``live`` bytes; returns (steps, live at its end).

    ``nbytes`` covers this graph's storages and those it receives; storages in ``keep`` or
    returned by the graph are never freed here.
    """
    last, returned = _lifetimes(view, st)
    freed: dict[int, int] = defaultdict(int)  # node index -> bytes freed after it runs
    for key, idx in last.items():
        if key not in returned and key not in keep:
            freed[idx] += nbytes[key]
    steps = []
    created, received = st.created, st.received
    for i, node in enumerate(view.nodes):
        new = created.get(node)
        if new:
            live += nbytes[new[0]] if len(new) == 1 else sum(nbytes[k] for k in new)
            steps.append(MemoryStep(tag, node.name, live))
        elif node.op == "call_function" and node not in received:
            steps.append(MemoryStep(tag, node.name, live))
        live -= freed.get(i, 0)
    return steps, live


def _is_sym(node: Any) -> bool:
    return not (isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor))


def _is_saved_input(node: fx.Node) -> bool:
    return not (compat.is_tangent(node) or compat.is_bwd_seed_offset(node)
                or compat.is_backward_state(node))


def saved_inputs(fw: fx.GraphModule, bw: fx.GraphModule) -> tuple[list[Any], dict[str, fx.Node]]:
    """Splits the forward's outputs into user outputs and saved values.

    AOTAutograd's convention: the forward returns the user outputs, then the saved tensors,
    then the saved SymInts; the backward takes the saved SymInts, the saved tensors, then the
    tangents (and RNG seeds). The extractor names each backward placeholder after the
    forward node it receives; positions (tensors and SymInts apart) are the fallback.

    Returns:
        (user outputs: forward output leaves, backward placeholder name -> forward node).

    Raises:
        UnsupportedGraphError: the two graphs do not follow that convention.
    """
    outs = compat.arg_tree_leaves(*fw.graph.find_nodes(op="output")[0].args)
    saved = [p for p in bw.graph.find_nodes(op="placeholder") if _is_saved_input(p)]
    n_user = len(outs) - len(saved)
    tail = outs[max(n_user, 0):]
    by_name = {x.name: x for x in tail if isinstance(x, fx.Node)}
    if n_user >= 0 and all(p.name in by_name for p in saved):
        return outs[:n_user], {p.name: by_name[p.name] for p in saved}
    fw_order = sorted(tail, key=_is_sym)  # stable: tensors, then SymInts, in graph order
    bw_order = sorted(saved, key=_is_sym)
    if n_user < 0 or [_is_sym(x) for x in fw_order] != [_is_sym(p) for p in bw_order]:
        raise UnsupportedGraphError(
            f"memory simulation: the forward's last {len(saved)} outputs {tail} do not match "
            f"the backward's saved inputs {[p.name for p in saved]}; pass the forward and "
            f"backward of one AOTAutograd partition")
    return outs[:n_user], {p.name: x for p, x in zip(bw_order, fw_order)}


def _returns_nothing(node: fx.Node) -> bool:
    schema = compat.op_schema(node.target) if node.op == "call_function" else None
    return schema is not None and not schema.returns


def missing_vals(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes of ``gm`` without ``meta["val"]`` that the simulation needs (an op
    that returns nothing needs none; Note [Memory model])."""
    return missing_vals_of(gm.graph.nodes)


def missing_vals_of(nodes) -> list[str]:
    """:func:`missing_vals` of a sequence of nodes."""
    return [n.name for n in nodes
            if n.op != "output" and "val" not in n.meta and not _returns_nothing(n)]


def _refs_of(nodes: list[Any], refs: Mapping[fx.Node, tuple[_Key | None, ...]]) -> set[_Key]:
    return {k for n in nodes if isinstance(n, fx.Node) for k in refs[n] if k is not None}


def simulate(fw: fx.GraphModule, bw: fx.GraphModule, hints: SizeHints | None = None,
             buffers: Mapping[Phase, frozenset[str]] | None = None) -> MemoryTimeline:
    """Simulates the live bytes of one step: ``fw``, then ``bw`` (Note [Memory model]).

    Args:
        fw: the forward GraphModule (placeholders: primals; outputs: user outputs, saved
            tensors, saved SymInts), with fake-tensor ``meta["val"]`` on every node.
        bw: the backward GraphModule (placeholders: saved SymInts, saved tensors, tangents;
            outputs: gradients of the primals, None for those without one).
        hints: values of size symbols (default: the backed hints of the graphs' ShapeEnv;
            a symbol without one uses ``SizeHints.unbacked_default``, with a warning).
        buffers: ``FORWARD``/``BACKWARD`` (a Phase) -> names of that graph's call nodes that
            own a buffer; the others are fused into their users and count 0 bytes (Note [Fused
            values]). None (or a graph missing from it): every call node owns its outputs.

    Returns:
        The MemoryTimeline; its byte counts exclude the resident primals.

    Raises:
        UnsupportedGraphError: a node lacks ``meta["val"]`` (trace with fake tensors, e.g.
            AOTAutograd or ``FakeTensorProp``), the graphs do not pair up, or a graph holds
            ``call_module``/``call_method`` nodes.
    """
    for name, gm in ((FORWARD, fw), (BACKWARD, bw)):
        missing = missing_vals(gm)
        if missing:
            raise UnsupportedGraphError(
                f"memory simulation: {name.value} nodes {missing[:5]} have no meta['val']; trace the "
                f"graphs with fake tensors (AOTAutograd, FakeTensorProp) before simulating")
    if hints is None:
        hints = SizeHints.from_graphs(fw.graph, bw.graph)
    user, saved = saved_inputs(fw, bw)
    return simulate_views(GraphView.of(fw), GraphView.of(bw), user, saved, hints, buffers)


def simulate_views(fw: GraphView, bw: GraphView, user: list[Any], saved: Mapping[str, fx.Node],
                   hints: SizeHints, buffers: Mapping[Phase, frozenset[str]] | None = None,
                   memo: _Memo | None = None) -> MemoryTimeline:
    """:func:`simulate` on GraphViews (every node with ``meta["val"]``).

    Args:
        fw: the forward's view.
        bw: the backward's view.
        user: the forward's user outputs (output leaves).
        saved: backward input name -> the forward node it receives.
        hints: values of size symbols.
        buffers: as in :func:`simulate`.
        memo: plan-independent facts kept across simulations of the same nodes.
    """
    buffers = buffers or {}
    fw_st = _storages(fw, FORWARD, {}, hints, buffers.get(FORWARD), memo)
    fw_steps, live = _replay(fw, FORWARD, fw_st, fw_st.nbytes, 0, set())
    kept = _refs_of(list(saved.values()), fw_st.refs)
    boundary = live - sum(fw_st.nbytes[k] for k in _refs_of(user, fw_st.refs) - kept)
    bw_st = _storages(bw, BACKWARD, {p: fw_st.refs[n] for p, n in saved.items()}, hints,
                      buffers.get(BACKWARD), memo)
    nbytes = {**fw_st.nbytes, **bw_st.nbytes}
    bw_steps, _ = _replay(bw, BACKWARD, bw_st, nbytes, boundary, set())
    steps = tuple(fw_steps + bw_steps)
    peak = max(steps, key=lambda s: s.live_bytes, default=None)
    return MemoryTimeline(
        steps=steps, peak_bytes=peak.live_bytes if peak else 0,
        peak_graph=peak.graph if peak else None, peak_node=peak.node if peak else "",
        saved_bytes=sum(nbytes[k] for k in kept), boundary_bytes=boundary)


def predict_peak(fw: fx.GraphModule, bw: fx.GraphModule, hints: SizeHints | None = None,
                 buffers: Mapping[Phase, frozenset[str]] | None = None) -> int | None:
    """The simulated peak bytes of one step (see :func:`simulate`), primals excluded.

    Args:
        fw: the forward GraphModule.
        bw: the backward GraphModule.
        hints: values of size symbols (a plan's ``RematPlan.hints``); default: the graphs'
            ShapeEnv hints, as :func:`simulate`.
        buffers: the call nodes of each graph that own a buffer (see :func:`simulate`).

    Returns:
        Peak bytes, or None (unknown: the caller decides what that means, never 0) when a
        node of either graph that returns a value lacks ``meta["val"]``.

    Raises:
        UnsupportedGraphError: the graphs do not pair up (see :func:`saved_inputs`).
    """
    if missing_vals(fw) or missing_vals(bw):
        log.debug("ckptfx: no memory prediction: nodes without meta['val']")
        return None
    return simulate(fw, bw, hints, buffers).peak_bytes


@dataclasses.dataclass(frozen=True)
class StorageTimeline:
    """Which storages are live at every step of one simulated step (see :func:`simulate`).

    Attributes:
        steps: the MemorySteps, as :func:`simulate` gives them.
        live: per step, the storages live while it runs: ``(graph, allocating node, output
            index)`` keys.
        nbytes: storage key -> bytes under the hints (graph inputs count 0).
        exprs: storage key -> bytes as a sympy expression in the graphs' size symbols.
        saved_bytes: bytes kept from the forward for the backward (as in MemoryTimeline).
        saved_expr: the same bytes as a sympy expression.
        gradients: the storages the backward returns (gradients of the inputs).
    """

    steps: tuple[MemoryStep, ...]
    live: tuple[frozenset[_Key], ...]
    nbytes: Mapping[_Key, int]
    exprs: Mapping[_Key, sympy.Expr]
    saved_bytes: int = 0
    saved_expr: sympy.Expr = sympy.Integer(0)
    gradients: frozenset[_Key] = frozenset()


class _Symbolic(SizeHints):
    """Hints that keep sizes symbolic: ``evaluate`` returns the sympy expression."""

    def evaluate(self, expr):  # type: ignore[override]
        return sympy.sympify(expr)


def storage_timeline(fw: fx.GraphModule, bw: fx.GraphModule,
                     hints: SizeHints | None = None) -> StorageTimeline:
    """Like :func:`simulate`, keeping the live storages of every step and their sizes as
    expressions too (for peak labels and peak formulas). Same Args and Raises."""
    timeline = simulate(fw, bw, hints)
    if hints is None:
        hints = SizeHints.from_graphs(fw.graph, bw.graph)
    user, saved = saved_inputs(fw, bw)
    sym = _Symbolic()
    fw_view, bw_view = GraphView.of(fw), GraphView.of(bw)
    fw_st = _storages(fw_view, FORWARD, {}, sym)
    bw_st = _storages(bw_view, BACKWARD, {p: fw_st.refs[n] for p, n in saved.items()}, sym)
    exprs = {**fw_st.nbytes, **bw_st.nbytes}
    live: list[frozenset[_Key]] = []
    alive: set[_Key] = set()
    returned: set[_Key] = set()
    kept = _refs_of(list(saved.values()), fw_st.refs)
    for view, st in ((fw_view, fw_st), (bw_view, bw_st)):
        if view is bw_view:  # the user outputs are dropped when the forward returns
            alive.difference_update(_refs_of(user, fw_st.refs) - kept)
        last, returned = _lifetimes(view, st)
        for i, node in enumerate(view.nodes):
            new = st.created.get(node, ())
            alive.update(new)
            if new or (node.op == "call_function" and node not in st.received):
                live.append(frozenset(alive))
            alive.difference_update(k for k, idx in last.items()
                                    if idx == i and k not in returned)
    nbytes = {k: hints.evaluate(e) for k, e in exprs.items()}
    return StorageTimeline(timeline.steps, tuple(live), nbytes, exprs, timeline.saved_bytes,
                           sympy.Add(*[exprs[k] for k in kept]), frozenset(returned))
