"""The memory simulation against measurement: live storage bytes while the graphs really run.

``LiveStorages`` is a TorchDispatchMode that registers the untyped storage of every op output
(keyed by its data pointer, with its ``nbytes()``), drops it when the storage is freed
(``weakref.finalize`` on the storage object) and records the running total after each op. The
graph inputs' storages are excluded, as in Note [Memory model] of ``ckptfx/memory.py``.

The graphs run as AOTAutograd's runtime runs compiled code: boxed (the callee takes a list
of inputs and clears it) with FX's own generated code, which drops every value after its
last use; under ``no_grad`` (the compiled forward records no autograd graph). Tangents are
allocated under the tracker just before the backward; the user outputs are held to the end.

CPU storages report the bytes requested (``nbytes()``), not the allocator's rounded block,
so predicted and measured bytes are compared exactly; and every op's step is compared, not
only the peak, so the peak's node is checked too.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.graph import _BoxedCodeGen
from torch.utils._python_dispatch import TorchDispatchMode

import ckptfx
from ckptfx.analysis.sizes import SizeHints
from ckptfx.errors import UnsupportedGraphError
from ckptfx.joint import Role
from ckptfx.memory import BACKWARD, FORWARD, MemoryTimeline, predict_peak, saved_inputs, simulate

N = 128  # a 128x128 fp32 tensor is 64 KiB
KIB = 1024


class LiveStorages(TorchDispatchMode):
    """Tracks the bytes of live storages that ops create (inputs excluded).

    Attributes:
        total: bytes live now.
        peak: the largest ``total`` seen after an op, bytes.
        log: (phase, op name, total after the op's outputs were registered).
        boundary: ``total`` between the forward and the backward, bytes (set by measure).
        saved: bytes of the saved values' tracked storages, once each (set by measure).
    """

    def __init__(self, exclude=()):
        super().__init__()
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude
                         if isinstance(t, torch.Tensor)}
        self.live: dict[int, int] = {}
        self.total = 0
        self.peak = 0
        self.phase = ""
        self.log: list[tuple[str, str, int]] = []
        self.boundary = 0
        self.saved = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._register(t.untyped_storage())
        self.peak = max(self.peak, self.total)
        self.log.append((self.phase, func._schema.name.split("::")[-1], self.total))
        return out

    def _register(self, storage):
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.excluded or ptr in self.live:
            return
        self.live[ptr] = storage.nbytes()
        self.total += storage.nbytes()
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr):
        self.total -= self.live.pop(ptr)


def _boxed(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose code takes a list of inputs and clears it."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph.set_codegen(_BoxedCodeGen())
    return fx.GraphModule(gm, graph)


def measure(fw, bw, primals, hints=SizeHints()) -> LiveStorages:
    """Runs one step (fw, then bw) under a LiveStorages tracker.

    Args:
        fw, bw: the partitioned graphs.
        primals: the forward's inputs (tensors and, for dynamic shapes, ints).
        hints: the sizes of the symbols in this run (the tangents' shapes).
    """
    user_nodes, saved = saved_inputs(fw, bw)
    n_user = len(user_nodes)
    fw_run, bw_run = _boxed(fw), _boxed(bw)
    tracker = LiveStorages(exclude=primals)
    with torch.no_grad(), tracker:
        tracker.phase = FORWARD
        outs = list(fw_run(list(primals)))
        user = outs[:n_user]
        out_nodes = pytree.arg_tree_leaves(*fw.graph.find_nodes(op="output")[0].args)
        by_name = {n.name: v for n, v in zip(out_nodes[n_user:], outs[n_user:])}
        del outs
        tracker.boundary = tracker.total
        saved_ptrs = {v.untyped_storage().data_ptr() for v in by_name.values()
                      if isinstance(v, torch.Tensor)}
        tracker.saved = sum(tracker.live.get(ptr, 0) for ptr in saved_ptrs)
        tracker.phase = "tangents"
        args = [torch.ones(hints.concrete_shape(p.meta["val"]), dtype=p.meta["val"].dtype)
                if p.name not in saved else by_name[saved[p.name].name]
                for p in bw.graph.find_nodes(op="placeholder")]
        del by_name
        tracker.phase = BACKWARD
        grads = bw_run(args)
        del grads, user
    return tracker


def primals_of(joint, args, module=None):
    """The forward's inputs: the module's parameters and buffers, then the inputs."""
    params = list(module.parameters()) + list(module.buffers()) if module is not None else []
    primals = [t.detach() for t in params + list(args)]
    assert len(primals) == len(joint.nodes_with(Role.PRIMAL))
    return primals


def op_steps(timeline: MemoryTimeline, gm: fx.GraphModule, graph: str):
    """The simulated steps of dispatched ops (the tracker sees those): (op name, live)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return [(nodes[s.node].target._schema.name.split("::")[-1], s.live_bytes)
            for s in timeline.steps
            if s.graph == graph and isinstance(nodes[s.node].target, torch._ops.OpOverload)]


# --- toy models ------------------------------------------------------------------------------

def chain(x):
    return x.sin().cos().tanh().sum()


def residual(x, w):
    return (x + torch.tanh(x @ w)).relu().sum()


def diamond(x):
    return (x.sin() * x.cos()).exp().sum()


def attention(q):
    s = q @ q.transpose(-1, -2) / 8.0
    return (s.softmax(-1) @ q).sum()


def layer_norm(x, w, b):
    return torch.nn.functional.layer_norm(x.tanh(), (x.shape[-1],), w, b).sin().sum()


def var_mean(x):
    var, mean = torch.var_mean(x.sin(), dim=-1, keepdim=True)
    return ((x - mean) * var.rsqrt()).sum()


def views(x, w):
    y = (x @ w).t().reshape(-1, 2 * N).contiguous()
    return y.exp().transpose(0, 1).sum()


def two_outputs(x):
    y = x.sin()  # saved for the backward and returned: alive to the end of the step
    return (y * y).sum(), y


def split(x):
    a, b = x.exp().split(N // 2)  # Tensor(a)[] return: both halves alias exp
    return (a * b).sum()


def _batchnorm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N, N), nn.BatchNorm1d(N), nn.Tanh())


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N, 2 * N), nn.ReLU(), nn.Linear(2 * N, N))


def _x(*shape):
    torch.manual_seed(0)
    return torch.randn(*shape, requires_grad=True)


CASES = {
    "chain": lambda: (chain, [_x(N, N)]),
    "mlp": lambda: (_mlp(), [torch.randn(4, 8, N)]),
    "residual": lambda: (residual, [_x(N, N), _x(N, N)]),
    "diamond": lambda: (diamond, [_x(N, N)]),
    "attention": lambda: (attention, [_x(4, 64, 32)]),
    "layer_norm": lambda: (layer_norm, [_x(N, N), _x(N), _x(N)]),
    "var_mean": lambda: (var_mean, [_x(N, N)]),
    "views": lambda: (views, [_x(N, N), _x(N, N)]),
    "two_outputs": lambda: (two_outputs, [_x(N, N)]),
    "split": lambda: (split, [_x(N, N)]),
    "batchnorm": lambda: (_batchnorm(), [torch.randn(64, N)]),
}


def _partition(name, config=None):
    fn, args = CASES[name]()
    joint = ckptfx.trace_joint(fn, *args)
    plan = ckptfx.plan_remat(joint, config)
    fw, bw, report = ckptfx.apply_plan(joint, plan)
    module = fn if isinstance(fn, nn.Module) else None
    return joint, fw, bw, report, primals_of(joint, args, module)


@pytest.mark.parametrize("name", sorted(CASES))
def test_predicted_peak_equals_measured(name):
    joint, fw, bw, report, primals = _partition(name)
    timeline = simulate(fw, bw)
    measured = measure(fw, bw, primals)
    assert timeline.peak_bytes == measured.peak
    assert predict_peak(fw, bw, joint) == measured.peak
    assert report.predicted_peak_bytes == measured.peak
    # Every op's live bytes match, so the peak is attributed to the right node.
    for graph, gm in ((FORWARD, fw), (BACKWARD, bw)):
        seen = [(op, live) for phase, op, live in measured.log if phase == graph]
        assert op_steps(timeline, gm, graph) == seen, graph
    last_tangent = [p.name for p in bw.graph.find_nodes(op="placeholder")
                    if p.name.startswith("tangents")][-1]
    tangents = [live for phase, _, live in measured.log if phase == "tangents"]
    assert tangents[-1] == timeline.live_at(BACKWARD, last_tangent)
    peak_gm = fw if timeline.peak_graph == FORWARD else bw
    assert timeline.peak_node in {n.name for n in peak_gm.graph.nodes}
    assert timeline.live_at(timeline.peak_graph, timeline.peak_node) == timeline.peak_bytes


@pytest.mark.parametrize("name", sorted(CASES))
def test_saved_and_boundary_bytes(name):
    """Kept bytes (unique computed storages of the saved values) and the bytes live between
    the forward and the backward (those plus the user outputs) equal what the tracker holds."""
    _, fw, bw, _, primals = _partition(name)
    timeline = simulate(fw, bw)
    measured = measure(fw, bw, primals)
    assert timeline.saved_bytes == measured.saved
    assert timeline.boundary_bytes == measured.boundary


def test_chain_numbers():
    """chain saves only x (a primal, not counted) and recomputes sin, cos, tanh: the peak is
    in the backward, with three 64 KiB tensors live next to the two 4-byte scalars."""
    _, fw, bw, _, _ = _partition("chain")
    t = simulate(fw, bw)
    assert t.saved_bytes == 0
    assert t.boundary_bytes == 4  # the loss
    assert t.peak_graph == BACKWARD
    assert t.peak_bytes == 3 * 64 * KIB + 8
    assert t.peak_of(BACKWARD).node == t.peak_node
    assert t.peak_of(FORWARD).live_bytes == 2 * 64 * KIB


def test_views_share_storage():
    """Views of computed tensors allocate nothing: t/transpose by the schema's alias
    annotation, ``_unsafe_view`` (no annotation) by its fake output's storage; the halves of
    a split (a ``Tensor(a)[]`` return) alias the split tensor."""
    from ckptfx.memory import _alias_sources, _schema_sources

    _, fw, _, _, _ = _partition("views")
    nodes = {n.target: n for n in fw.graph.nodes}
    t_node = nodes[torch.ops.aten.t.default]
    assert _schema_sources(t_node, 1) == [t_node.args[0]]
    unsafe = nodes[torch.ops.aten._unsafe_view.default]
    assert _schema_sources(unsafe, 1) == [None]
    assert _alias_sources(unsafe) == [unsafe.args[0]]
    _, fw, _, _, _ = _partition("split")
    split_node = next(n for n in fw.graph.nodes if n.target is torch.ops.aten.split.Tensor)
    assert _schema_sources(split_node, 2) == [split_node.args[0]] * 2


def test_mutation_allocates_nothing():
    """In-place ops (add_, copy_) return their input's storage: no allocation, measured."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x):
        y = x.sin()
        y.add_(1.0)
        z = y.cos()
        z.copy_(y)
        return (z * 2.0,)

    fw = make_fx(step, tracing_mode="fake")(torch.randn(N, N))
    graph = fx.Graph()
    tangent = graph.placeholder("tangents_1")
    tangent.meta["val"] = fw.graph.find_nodes(op="output")[0].args[0][0].meta["val"]
    graph.output((tangent,))
    bw = fx.GraphModule({}, graph)
    timeline = simulate(fw, bw)
    measured = measure(fw, bw, [torch.randn(N, N)])
    seen = [(op, live) for phase, op, live in measured.log if phase == FORWARD]
    assert op_steps(timeline, fw, FORWARD) == seen == [
        ("sin", 64 * KIB), ("add_", 64 * KIB), ("cos", 128 * KIB), ("copy_", 128 * KIB),
        ("mul", 128 * KIB)]
    assert timeline.peak_bytes == measured.peak == 128 * KIB


def test_more_recomputation_keeps_fewer_bytes():
    """Plans that recompute more keep fewer (or equal) bytes from forward to backward."""
    from ckptfx.planner import plan, to_plan
    from ckptfx.solvers.base import least_recompute_saved
    from ckptfx.solvers.base import Solution

    fn, args = CASES["mlp"]()
    joint = ckptfx.trace_joint(fn, *args)
    planned = plan(joint)
    everything = to_plan(planned.problem, Solution(least_recompute_saved(planned.problem)), "manual", 0.0)
    kept = []
    for p in (everything, planned.plan,
              ckptfx.plan_remat(joint, ckptfx.RematConfig(recompute_expensive=True))):
        fw, bw, _ = ckptfx.apply_plan(joint, p)
        kept.append(simulate(fw, bw).saved_bytes)
        assert kept[-1] == measure(fw, bw, primals_of(joint, args, fn)).saved
    assert kept[0] >= kept[1] >= kept[2]
    assert kept[0] > kept[2]


def test_missing_meta_val():
    _, fw, bw, _, _ = _partition("diamond")
    del next(n for n in bw.graph.nodes if n.op == "call_function").meta["val"]
    assert predict_peak(fw, bw) is None
    with pytest.raises(UnsupportedGraphError, match="meta\\['val'\\]"):
        simulate(fw, bw)


def test_hints_from_joint_for_static_shapes():
    joint, fw, bw, _, _ = _partition("attention")
    assert predict_peak(fw, bw, joint) == predict_peak(fw, bw, hints=SizeHints()) > 0


def _compile_capturing(module, x):
    """torch.compile(module, dynamic=True) with ckptfx's partitioner; returns the forward
    and backward GraphModules and the forward's runtime inputs."""
    from torch._dynamo.backends.common import aot_autograd

    captured = {}

    def compiler(kind):
        def compile_graph(gm, _example_inputs):
            captured[kind] = gm

            def run(args):
                captured[kind + "_args"] = list(args)
                return gm(*args)

            run._boxed_call = True
            return run

        return compile_graph

    backend = aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"),
                           partition_fn=ckptfx.partition_fn(ckptfx.RematConfig(strict=True)))
    torch.compile(module, backend=backend, dynamic=True)(x).sum().backward()
    return captured["fw"], captured["bw"], captured["fw_args"]


def test_symbolic_sizes_under_hints():
    """Graphs compiled with a symbolic batch size, simulated under the hints of another batch
    size, predict what running them at that size measures."""
    from ckptfx import _torch_compat as compat

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(N, 2 * N), nn.ReLU(), nn.Linear(2 * N, N))
    fw, bw, args = _compile_capturing(module, torch.randn(64, N))
    symbols = compat.symbol_hints(compat.shape_env_of(fw.graph))
    batch = [s for s, v in symbols.items() if v == 64]
    assert batch, symbols
    for size in (64, 48):
        hints = SizeHints({s: (size if s in batch else v) for s, v in symbols.items()})
        primals = [size if isinstance(a, int) else
                   torch.randn(size, N) if a.shape[0] == 64 else a.detach() for a in args]
        timeline = simulate(fw, bw, hints)
        measured = measure(fw, bw, primals, hints)
        if size == 64:  # the hints the graphs were compiled with are the default
            assert simulate(fw, bw) == timeline
        assert timeline.peak_bytes == measured.peak
        assert timeline.saved_bytes == measured.saved == size * 2 * N * 4  # relu
        for graph, gm in ((FORWARD, fw), (BACKWARD, bw)):
            seen = [(op, live) for phase, op, live in measured.log if phase == graph]
            assert op_steps(timeline, gm, graph) == seen, (size, graph)
