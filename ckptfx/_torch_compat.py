"""The one module that touches PyTorch's private APIs.

Everything ckptfx needs from ``torch._functorch``, ``torch._inductor``, ``torch._dynamo``,
``torch._ops``, ``torch.utils._pytree``, ``torch.fx.experimental`` and private attributes of
ops and graphs (``_schema``, ``_codegen``) goes through here, so a torch upgrade touches one
file; ``tests/test_architecture.py`` fails on a private reference anywhere else. Tested on
torch 2.13; the lowest supported version is declared in pyproject.toml.

Note [Reusing AOTAutograd's extractor]
    AOTAutograd's runtime owns the calling convention between the forward and the backward
    (saved tensors, then opaque objects, then SymInts that bind every symbol the backward
    sees; version-counter slices; output descriptors). ckptfx chooses *what* is saved and
    *where* recomputation happens; it hands the chosen saved set to AOTAutograd's own
    extractor for the calling convention, then re-places the recomputation itself
    (``ckptfx.passes.rewrite``). That keeps the convention exact across torch versions.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as _pytree

arg_tree_leaves = _pytree.arg_tree_leaves

# Note [Fast pytree walks]
#     The analysis maps over the arguments of every node of the joint graph, several times
#     each; ``torch.utils._pytree`` spends most of that deciding what each object is. The
#     walks below give the same results for the containers fx arguments are made of (tuple,
#     list, dict, fx's immutable list and dict) and for the leaves they hold (nodes,
#     tensors, numbers, dtypes); any other object goes to pytree (a namedtuple, an
#     OrderedDict, a registered class) or is asked whether it is a leaf (None, a slice).
#     ``tests/test_fast_paths.py`` compares them with pytree.
_LEAF_TYPES = (fx.Node, int, float, bool, str, torch.dtype, torch.device, torch.layout,
               torch.memory_format)


def _container(tree: Any):
    """The rebuild function of a container the fast walks handle, or None."""
    t = type(tree)
    if t is tuple or t is list:
        return t
    if t is fx.immutable_collections.immutable_list:
        return t
    return None


def _is_leaf(tree: Any) -> bool:
    t = type(tree)
    return t in _LEAF_TYPES or isinstance(tree, torch.Tensor) or (
        t not in _pytree.SUPPORTED_NODES and _pytree.tree_is_leaf(tree))


def tree_map(fn, tree: Any, *rests: Any, **kwargs: Any) -> Any:
    """``torch.utils._pytree.tree_map`` (Note [Fast pytree walks])."""
    if rests or kwargs:
        return _pytree.tree_map(fn, tree, *rests, **kwargs)
    return _map(fn, tree)


def _map(fn, tree: Any) -> Any:
    t = type(tree)
    rebuild = _container(tree)
    if rebuild is not None:
        return rebuild([_map(fn, x) for x in tree])
    if t is dict or t is fx.immutable_collections.immutable_dict:
        return t({k: _map(fn, v) for k, v in tree.items()})
    if _is_leaf(tree):
        return fn(tree)
    return _pytree.tree_map(fn, tree)


def tree_leaves(tree: Any, *args: Any, **kwargs: Any) -> list[Any]:
    """``torch.utils._pytree.tree_leaves`` (Note [Fast pytree walks])."""
    if args or kwargs:
        return _pytree.tree_leaves(tree, *args, **kwargs)
    out: list[Any] = []
    _leaves(tree, out)
    return out


def _leaves(tree: Any, out: list[Any]) -> None:
    t = type(tree)
    if _container(tree) is not None:
        for x in tree:
            _leaves(x, out)
    elif t is dict or t is fx.immutable_collections.immutable_dict:
        for v in tree.values():
            _leaves(v, out)
    elif _is_leaf(tree):
        out.append(tree)
    else:
        out.extend(_pytree.tree_leaves(tree))


def is_op_overload(target: Any) -> bool:
    """An ATen/custom op overload (``torch.ops.aten.mm.default``)."""
    return isinstance(target, torch._ops.OpOverload)


def is_higher_order_op(target: Any) -> bool:
    return isinstance(target, torch._ops.HigherOrderOperator)


def op_schema(target: Any):
    """The ``torch._C.FunctionSchema`` of an op overload, or None for any other target."""
    return getattr(target, "_schema", None)


def graph_like(graph: fx.Graph) -> fx.Graph:
    """An empty Graph with ``graph``'s code generator (its calling convention)."""
    new = fx.Graph()
    new._codegen = graph._codegen
    return new


def dispatch_mode_base():
    """``TorchDispatchMode``: the base class of a mode that sees every ATen op call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def op_name(func: Any) -> str:
    """The short name of an op overload (``"mm"`` for ``aten::mm.default``)."""
    return func._schema.name.split("::")[-1]


def boxed_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose code takes a list of inputs and clears it (AOTAutograd's
    boxed calling convention: each input dies after its last use)."""
    from torch.fx.graph import _BoxedCodeGen

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph.set_codegen(_BoxedCodeGen())
    return fx.GraphModule(gm, graph)


def lazy_graph_modules():
    """A context in which new GraphModules skip Python code generation until first called
    (``torch.fx._lazy_graph_module``): graphs built only to be simulated never pay for it."""
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    return _use_lazy_graph_module(True)


def dynamo_reset() -> None:
    """Clears Dynamo's compile caches (``torch._dynamo.reset``)."""
    import torch._dynamo

    torch._dynamo.reset()


def partitioners():
    from torch._functorch import partitioners as p

    return p


def is_primal(node: fx.Node) -> bool:
    return partitioners()._is_primal(node)


def is_tangent(node: fx.Node) -> bool:
    return partitioners()._is_tangent(node)




def is_bwd_seed_offset(node: fx.Node) -> bool:
    return partitioners()._is_bwd_seed_offset(node)


def is_backward_state(node: fx.Node) -> bool:
    return partitioners()._is_backward_state(node)


def must_be_in_backward(node: fx.Node) -> bool:
    return partitioners()._must_be_in_backward(node)


def must_be_in_forward(node: fx.Node) -> bool:
    return partitioners()._must_be_in_forward(node)


def is_sym_node(node: fx.Node) -> bool:
    return partitioners().is_sym_node(node)


def is_opaque_node(node: fx.Node) -> bool:
    p = partitioners()
    return bool(getattr(p, "is_opaque_node", lambda n: False)(node))


def is_fwd_seed_offset(node: fx.Node) -> bool:
    return partitioners()._is_fwd_seed_offset(node)


def is_wait_tensor(node: fx.Node) -> bool:
    """A functional collective's ``wait_tensor``."""
    c10d = getattr(torch.ops, "_c10d_functional", None)
    return c10d is not None and node.target is c10d.wait_tensor.default


def is_script_object(val: Any) -> bool:
    """A fake script object (an opaque value the extractor saves after the tensors)."""
    from torch._library.fake_class_registry import FakeScriptObject

    return isinstance(val, FakeScriptObject)


def symbol_binding_nodes(graph: fx.Graph) -> dict[Any, fx.Node]:
    """Size symbol -> the node that binds it (what the extractor saves with the values
    whose sizes use it)."""
    from torch.fx.experimental.symbolic_shapes import find_symbol_binding_fx_nodes

    return find_symbol_binding_fx_nodes(graph)


def symbol_bound_by(node: fx.Node) -> Any:
    """The size symbol ``node`` binds, or None."""
    from torch.fx.experimental.symbolic_shapes import is_symbol_binding_fx_node

    return is_symbol_binding_fx_node(node)


def free_size_symbols(val: Any) -> set:
    """The size symbols a value's sizes use (``meta["val"]``)."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return set(free_symbols(val))


def dce_impure_random() -> bool:
    """Whether fx's dead-code elimination keeps unused random ops here (it does outside a
    ``torch.compile``; inside, as Inductor's ``fallback_random`` says)."""
    import torch._guards

    if torch._guards.TracingContext.try_get():
        return bool(inductor_config().fallback_random)
    return True


def normalise_recompute_tags(joint_module: fx.GraphModule) -> None:
    """AOTAutograd's own tag steps, in place, as its min-cut partitioner runs them: checkpoint
    tags are normalised; collectives, effectful ops and the sources of backward mutations get
    ``meta["recompute"] = MUST_SAVE``. Part of ``ckptfx.passes.prepare.prepare_joint``."""
    p = partitioners()
    if p.has_recomputable_ops(joint_module):
        p.cleanup_recompute_tags(joint_module, is_default_partition=False)
    p.force_save_collectives(joint_module)
    p.force_save_effectful_ops(joint_module)
    p.force_save_bw_mutation_src(joint_module)


def extract_fwd_bwd(
    joint_module: fx.GraphModule,
    saved_values: list[fx.Node],
    saved_sym_nodes: list[fx.Node],
    num_fwd_outputs: int,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """AOTAutograd's extractor (see Note [Reusing AOTAutograd's extractor]).

    Mutates ``saved_values`` / ``saved_sym_nodes`` in place to what was really saved.
    """
    p = partitioners()
    opaque = [n for n in saved_values if is_opaque_node(n)]
    tensors = [n for n in saved_values if not is_opaque_node(n)]
    saved_values[:] = tensors
    return p._extract_fwd_bwd_modules(
        joint_module,
        saved_values,
        saved_sym_nodes=saved_sym_nodes,
        saved_opaque_nodes=opaque,
        num_fwd_outputs=num_fwd_outputs,
    )




def torch_min_cut_partition(joint_module, joint_inputs, **kwargs):
    """PyTorch's own partitioner: the safe fallback and the reference in benchmarks."""
    from functorch.compile import min_cut_rematerialization_partition

    return min_cut_rematerialization_partition(joint_module, joint_inputs, **kwargs)


def torch_safe_partition(joint_module, joint_inputs, **kwargs):
    """PyTorch's min-cut partitioner at ``activation_memory_budget=1.0``: the fallback.

    Below budget 1.0 PyTorch's partitioner may recompute random ops with fresh randomness
    (pytorch/pytorch#190758); at 1.0 its min-cut bans them. The caller checks the result
    anyway (``ckptfx.passes.partition``).
    """
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=1.0):
        return torch_min_cut_partition(joint_module, joint_inputs, **kwargs)


def torch_default_partition(joint_module, joint_inputs, **kwargs):
    """PyTorch's default partitioner: saves what the backward reads, recomputes nothing but
    views and sizes. The last resort of the fallback."""
    from functorch.compile import default_partition

    kwargs.pop("compiler", None)
    return default_partition(joint_module, joint_inputs, **kwargs)


def unbacked_symbols_defined_by(node: fx.Node) -> tuple[str, ...]:
    """Names of the data-dependent (unbacked) size symbols a node defines.

    ``.item()``, ``nonzero()`` and the ``sym_size`` that binds the size of their results
    define such symbols; AOTAutograd hands them to the backward as saved SymInts, and a
    recomputation in the backward would define them a second time.
    """
    from torch.fx.experimental.symbolic_shapes import is_symbol_binding_fx_node

    names = {str(s) for s in (node.meta.get("unbacked_bindings") or {})}
    if node.op != "placeholder":
        sym = is_symbol_binding_fx_node(node)
        if sym is not None:
            names.add(str(sym))
    return tuple(sorted(names))


_HUGE = 2 ** 62  # bounds at or above this are the ShapeEnv's stand-ins for "unbounded"


def unbacked_upper_bounds(shape_env) -> dict[Any, int | None]:
    """Every unbacked symbol of a ShapeEnv -> its proven upper bound, or None if unbounded.

    Bounds come from the ShapeEnv's value ranges: ``nonzero()`` of an ``n``-element tensor is
    at most ``n``; ``torch._check(k <= 32)`` bounds ``k`` by 32.
    """
    if shape_env is None:
        return {}
    import sympy
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    bounds: dict[Any, int | None] = {}
    for sym, vr in shape_env.var_to_range.items():
        if not free_unbacked_symbols(sym):
            continue
        upper = vr.upper
        finite = isinstance(upper, (int, sympy.Integer)) and not isinstance(upper, bool)
        bounds[sym] = int(upper) if finite and 0 <= int(upper) < _HUGE else None
    return bounds




def _symints(val: Any):
    """Every SymInt in a ``meta["val"]``: SymInts, and a tensor's sizes, strides and storage
    offset, through nested lists, tuples and dicts."""
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        yield val
    elif isinstance(val, torch.Tensor):
        try:
            dims = [*val.shape, *val.stride(), val.storage_offset()]
        except (NotImplementedError, RuntimeError):  # sparse / nested layouts have no strides
            dims = list(val.shape)
        yield from (d for d in dims if isinstance(d, torch.SymInt))
    elif isinstance(val, (list, tuple)):
        for v in val:
            yield from _symints(v)
    elif isinstance(val, dict):
        for v in val.values():
            yield from _symints(v)


def shape_env_of(graph: fx.Graph):
    """The ShapeEnv of a graph's fake tensors / SymInts, or None for static graphs."""
    for node in graph.nodes:
        for s in _symints(node.meta.get("val")):
            return s.node.shape_env
    return None


def graph_symbol_hints(graph: fx.Graph) -> dict[Any, int]:
    """The traced value of every backed size symbol a graph's ``meta["val"]`` mentions:
    sympy.Symbol -> int.

    Note [Hints from every ShapeEnv]
        A graph's SymInts need not all come from the ShapeEnv of its first SymInt: a frame
        that Dynamo recompiles with a dynamic size (shared block code, FSDP2's per-block
        hooks) may hand AOTAutograd values created under another ShapeEnv. Hints are read
        from every ShapeEnv the graph's SymInts point to, and from each SymInt's own hint
        (the value it was traced with), so a backed symbol never goes without one.
    """
    hints: dict[Any, int] = {}
    envs: dict[int, Any] = {}
    for node in graph.nodes:
        for s in _symints(node.meta.get("val")):
            sym_node = s.node
            if sym_node.shape_env is not None:
                envs.setdefault(id(sym_node.shape_env), sym_node.shape_env)
            expr, hint = sym_node.expr, getattr(sym_node, "hint", None)
            if getattr(expr, "is_Symbol", False) and isinstance(hint, int) and \
                    not isinstance(hint, bool):
                hints.setdefault(expr, hint)
    for env in envs.values():
        for sym, val in symbol_hints(env).items():
            hints.setdefault(sym, val)
    return hints


def symbol_hints(shape_env) -> dict[Any, int]:
    """Backed hints of every symbol a ShapeEnv knows: sympy.Symbol -> int."""
    if shape_env is None:
        return {}
    values = getattr(shape_env, "backed_var_to_val", None)
    if values is None:
        values = shape_env.var_to_val
    out = {}
    for sym, val in values.items():
        try:
            out[sym] = int(val)
        except TypeError:  # a SingletonInt (jagged nested tensors) has no int value
            continue
    return out


def inductor_partitioner_base():
    from torch._inductor.custom_graph_pass import CustomPartitionerFn

    return CustomPartitionerFn


def inductor_config():
    import torch._inductor.config as cfg

    return cfg


# Note [Layouts the plan assumed]
#     A plan is made on the strides traced into the joint graph (``meta["val"]``): its byte
#     counts (a saved view of a parameter costs nothing; a saved input is not a copy) and the
#     meaning of stride-sensitive ops it recomputes (``as_strided`` reinterprets its base's
#     memory) rest on them. Inductor may change the layout of a forward output that the user
#     does not see, which is every saved value: layout optimisation makes 4-D tensors near a
#     convolution channels-last (and saves a channels-last *copy* of an input), and padding
#     widens the strides of large outputs. In the backward a recomputed ``as_strided`` then
#     reads the wrong elements of a re-laid-out base (GroupNorm's decomposition, wrong
#     gradients), and autograd keeps more bytes than the plan says (1.3x-1.5x on conv nets).
#     So for the graphs ckptfx partitions: layout optimisation is off, saved outputs are not
#     padded, and the base of every ``as_strided`` is realized at its traced strides. Cost:
#     Inductor's channels-last convolutions (measured in ``bench/``); the gain: what runs
#     is what was planned, bit for bit in layout.
_STRIDE_SENSITIVE = ("as_strided.default", "as_strided_.default", "as_strided_scatter.default",
                     "as_strided_copy.default")


def inductor_config_patches() -> dict[str, Any]:
    """Inductor options for the graphs ckptfx partitions (Note [Layouts the plan assumed])."""
    return {"layout_optimization": False}


def keep_planned_layouts(fw: fx.GraphModule, bw: fx.GraphModule) -> None:
    """Marks the partitioned graphs so Inductor keeps the layouts the plan assumed, in place.

    Every forward output is marked ``dislike_padding`` (Inductor pads the strides of outputs
    the user does not see, i.e. of saved values); in both graphs the base of a
    stride-sensitive op is realized at its traced strides (``inductor_realize_to_strides``).
    See Note [Layouts the plan assumed].
    """
    out = fw.graph.find_nodes(op="output")[0]
    for node in out.all_input_nodes:
        node.meta["dislike_padding"] = True
    for gm in (fw, bw):
        for node in gm.graph.nodes:
            if node.op == "call_function" and \
                    _overload_name(node) in _STRIDE_SENSITIVE and node.args:
                base = node.args[0]
                if isinstance(base, fx.Node):
                    base.meta["inductor_realize_to_strides"] = True
                    base.meta["dislike_padding"] = True


def _overload_name(node: fx.Node) -> str:
    target = node.target
    return f"{getattr(target, '_opname', '')}.{getattr(target, '_overloadname', '')}"


def compile_fx(gm, example_inputs, **kwargs):
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return _compile_fx(gm, example_inputs, **kwargs)


def fusion_moves_planned_work(scheduler, node1, node2) -> bool:
    """Whether fusing two Inductor scheduler nodes would run planned work out of order.

    Note [Fusion keeps the planned order]
        Inductor places a fused kernel at its earliest member (``min_order``) and then
        re-sorts depth first, so everything the later member depends on is pulled up to
        that position, ahead of the nodes planned between them (``Scheduler.fuse_nodes_once``
        sorts by ``min_order`` and calls ``topological_sort_schedule``). Its only distance
        guard, ``are_long_distant_nodes``, applies to horizontal fusions. When the
        gradients of a shared weight are summed, a small bias-gradient sum taken early
        fuses with the sum taken a whole chain later: the chain of input gradients and its
        recomputation is hoisted and the weight-gradient matmuls, left in place, keep
        their recomputed inputs alive until the end of the backward.

    Args:
        scheduler: the Inductor ``Scheduler`` running the fusion.
        node1: a candidate scheduler node.
        node2: the other candidate.

    Returns:
        True when a node the later one depends on lies after the earlier one.
    """
    early, late = sorted((node1, node2), key=lambda n: n.min_order)
    if late.min_order <= early.max_order + 1:
        return False
    fused = scheduler.name_to_fused_node
    return any(
        (anc := fused.get(name)) is not None and anc is not early
        and anc.max_order > early.max_order
        for name in late.ancestors)


@functools.lru_cache(maxsize=1)
def _planned_order_choices():
    from torch._inductor.choices import InductorChoices

    class PlannedOrderChoices(InductorChoices):
        """Inductor's heuristics, with no fusion that reorders the planned graph."""

        @staticmethod
        def can_fuse(scheduler, node1, node2, shared_data_score):
            if fusion_moves_planned_work(scheduler, node1, node2):
                return False
            return InductorChoices.can_fuse(scheduler, node1, node2, shared_data_score)

    return PlannedOrderChoices()


def planned_order_inner_compile(on_compiled=None):
    """Inductor's ``compile_fx_inner`` with fusions that keep the planned node order.

    Pass it as ``compile_fx(..., inner_compile=...)``: it applies to the graphs of that
    call only (the forward and backward ckptfx partitioned), not to other compilations
    in the process. See Note [Fusion keeps the planned order].

    Args:
        on_compiled: called as ``on_compiled(gm, is_backward, buffers)`` after each graph
            Inductor compiles (the backward may compile lazily, at its first run): ``gm``
            is the graph as lowered (after Inductor's post-grad passes), ``buffers`` the
            names of its nodes whose values Inductor allocates (Note [Buffers Inductor
            allocates]). Not called for a graph served from Inductor's cache.

    Returns:
        a callable with ``compile_fx_inner``'s signature.
    """
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.virtualized import V

    @functools.wraps(compile_fx_inner)
    def inner_compile(gm, example_inputs, **kwargs):
        recorder = new_buffer_recorder() if on_compiled is not None else None
        patch = {} if recorder is None else {"_post_fusion_custom_pass": recorder}
        with V.set_choices_handler(_planned_order_choices()), inductor_config().patch(patch):
            compiled = compile_fx_inner(gm, example_inputs, **kwargs)
        if recorder is not None and recorder.lowering is not None:
            on_compiled(gm, bool(kwargs.get("is_backward")), recorder.allocated(gm))
        return compiled

    return inner_compile


# Note [Buffers Inductor allocates]
#     Inductor gives a buffer to a node's value only where it materialises it: a chain of
#     pointwise ops fuses into one kernel and its intermediates stay in registers; a value
#     read only inside the kernel that computes it is dropped at codegen
#     (``GraphLowering.removed_buffers``); views are reinterpretations of their base. After
#     fusion (``_post_fusion_custom_pass``) every scheduler buffer names the FX nodes it was
#     computed from (``origins``); the one whose value it holds is its ``origin_node`` or,
#     where Inductor did not record one, the latest of its origins in the graph that is
#     not a view (a realized view holds its base's value). Those nodes own buffers; every
#     other node of the lowered graph allocates nothing (``ckptfx.memory.simulate(
#     buffers=...)``, Note [Fused values]). Buffer reuse by the generated code
#     (``ReuseLine``) is not modelled. The simulation runs the nodes in
#     the graph's order; Inductor's ``reorder_for_peak_memory``, which runs after this
#     pass, was observed to keep that order on the planned graphs (the scheduler nodes of
#     ``tests/test_inductor_order.py`` come out as they went in). The pass changes
#     nothing: its ``uuid`` is constant, so Inductor's cache key is the same with or
#     without it.
def _buffer_recorder_class():
    cls = globals().get("_BufferRecorder")
    if cls is not None:
        return cls
    from torch._inductor.custom_graph_pass import CustomSchedulerPass
    from torch._inductor.virtualized import V

    class BufferRecorder(CustomSchedulerPass):
        """Keeps the scheduler buffers of the graph being lowered (changes nothing)."""

        def __init__(self) -> None:
            self.lowering = None
            self.buffers: list = []

        def __call__(self, nodes):
            self.lowering = V.graph
            self.buffers = [buf.node for snode in nodes for buf in snode.get_outputs()]
            return nodes

        def uuid(self) -> str:
            return "ckptfx.buffer-recorder.v1"

        def __reduce__(self):
            # Inductor pickles its config into the cache key: an empty recorder, by reference
            return (new_buffer_recorder, ())

        def allocated(self, gm: fx.GraphModule) -> frozenset[str]:
            """Names of the nodes of ``gm`` whose values own a buffer in the code."""
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            gone = set(self.lowering.removed_buffers) | set(self.lowering.inplaced_to_remove)
            names = set()
            for buf in self.buffers:
                if buf.get_name() in gone:
                    continue
                owner = getattr(buf, "origin_node", None)
                if owner not in order:
                    owner = max((n for n in buf.origins if n in order and
                                 not getattr(n.target, "is_view", False)),
                                key=order.__getitem__, default=None)
                if owner is not None:
                    names.add(owner.name)
            return frozenset(names)

    globals()["_BufferRecorder"] = BufferRecorder
    return BufferRecorder


def new_buffer_recorder():
    """An empty recorder of the buffers Inductor allocates (Note [Buffers Inductor allocates])."""
    return _buffer_recorder_class()()


def aot_autograd_backend(**kwargs):
    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(**kwargs)


def flop_registry():
    from torch.utils.flop_counter import flop_registry as reg

    return reg


def current_compile_id() -> tuple[int, int] | None:
    """(frame id, compile attempt of that frame) of the Dynamo compile in progress, or None
    outside one."""
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    if cid is None or getattr(cid, "frame_id", None) is None:
        return None
    return int(cid.frame_id), int(cid.frame_compile_id or 0)


def inductor_cache_dir() -> str:
    """The directory of Inductor's on-disk caches (``TORCHINDUCTOR_CACHE_DIR``)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def symbol_sources(shape_env) -> dict[Any, list[str]]:
    """Every size symbol of a ShapeEnv -> the Dynamo sources it was created for, as
    ``L['ids'].size()[0]`` strings ({} without a ShapeEnv)."""
    if shape_env is None:
        return {}
    out: dict[Any, list[str]] = {}
    for sym, sources in getattr(shape_env, "var_to_sources", {}).items():
        out[sym] = [s.name() if callable(getattr(s, "name", None)) else str(s.name)
                    for s in sources]
    return out


def trace_structured_artifact(name: str, payload_fn) -> None:
    """Puts a JSON artifact in PyTorch's structured compile trace (``TORCH_TRACE``), where
    tlparse shows it next to the compile it belongs to; a no-op when tracing is off."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "json"},
                     payload_fn=payload_fn)


@functools.lru_cache(maxsize=None)
def _passthrough_class(cls: type) -> type:
    from torch._dynamo.exc import ShortenTraceback

    return type(cls.__name__, (cls, ShortenTraceback), {"__module__": cls.__module__})


def dynamo_passthrough(exc: Exception) -> Exception:
    """``exc`` as an instance of a subclass of its own class that Dynamo re-raises as is
    (it wraps any other backend error in ``BackendCompilerFailed``), so the caller of a
    compiled function can catch it by its own class. Same message and attributes."""
    cls = _passthrough_class(type(exc))
    out = cls.__new__(cls)
    out.args = exc.args
    out.__dict__.update(exc.__dict__)
    out.first_useful_frame = None  # ShortenTraceback: keep the whole traceback
    return out


def on_dynamo_compile_end(callback) -> None:
    """Registers ``callback()`` to run after every frame Dynamo compiles (its compile-end
    callbacks: process-wide, so register once)."""
    import torch._dynamo

    torch._dynamo.callback_handler.register_end_callback(lambda _args: callback())


def _backend_of(compiled: Any) -> tuple[Any, dict]:
    """The user's backend of a torch.compile'd module, and the keyword arguments a string
    backend is called with (``options=``): Dynamo's wrappers peeled off."""
    fn = compiled.dynamo_ctx.callback
    while hasattr(fn, "_torchdynamo_orig_backend"):
        fn = fn._torchdynamo_orig_backend
    if hasattr(fn, "compiler_fn") and hasattr(fn, "kwargs"):  # torch._TorchCompileWrapper
        return fn.compiler_fn, dict(fn.kwargs or {})
    return fn, {}


def compiled_ddp_on_stack() -> list[tuple[Any, Any, dict]]:
    """``(module, backend, kwargs)`` for each ``torch.compile(DistributedDataParallel(...))``
    whose call is on the Python stack now (the backend as :func:`_backend_of` gives it)."""
    import sys

    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    found, frame = [], sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if frame.f_code.co_name in (
            "__call__", "_call_impl", "_wrapped_call_impl", "forward") else None
        if isinstance(owner, OptimizedModule) and \
                isinstance(owner._orig_mod, DistributedDataParallel) and \
                all(owner is not m for m, *_ in found):
            found.append((owner, *_backend_of(owner)))
        frame = frame.f_back
    return found


def dynamo_disable(fn):
    """``fn`` wrapped so that Dynamo never traces it (runs eagerly when called)."""
    import torch._dynamo

    return torch._dynamo.disable(fn)
