"""The memory simulation against measurement: live storage bytes while the graphs really run.

:class:`ckptfx.testing.LiveStorages` is a dispatch mode that registers the untyped storage of
every op output and drops it when the storage is freed; :func:`ckptfx.testing.measure_step`
runs the forward and the backward as AOTAutograd's runtime runs compiled code (boxed, under
``no_grad``, tangents allocated just before the backward, user outputs dropped when the forward returns). The
graph inputs' storages are excluded, as in Note [Memory model] of ``ckptfx/memory.py``.

CPU storages report the bytes requested (``nbytes()``), not the allocator's rounded block,
so predicted and measured bytes are compared exactly; and every op's step is compared, not
only the peak, so the peak's node is checked too.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import ckptfx
from ckptfx import _torch_compat as compat
from ckptfx.analysis.sizes import SizeHints
from ckptfx.errors import UnsupportedGraphError
from ckptfx.joint import Role
from ckptfx.memory import BACKWARD, FORWARD, MemoryTimeline, predict_peak, simulate
from ckptfx.testing import TOY_GRAPHS as CASES
from ckptfx.testing import N
from ckptfx.testing import measure_step as measure

KIB = 1024


def primals_of(joint, args, module=None):
    """The forward's inputs: the module's parameters and buffers, then the inputs."""
    params = list(module.parameters()) + list(module.buffers()) if module is not None else []
    primals = [t.detach() for t in params + list(args)]
    assert len(primals) == len(joint.nodes_with(Role.PRIMAL))
    return primals


def op_steps(timeline: MemoryTimeline, gm: fx.GraphModule, graph: str):
    """The simulated steps of dispatched ops (the tracker sees those): (op name, live)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return [(compat.op_name(nodes[s.node].target), s.live_bytes)
            for s in timeline.steps
            if s.graph == graph and compat.is_op_overload(nodes[s.node].target)]


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
    assert predict_peak(fw, bw) == measured.peak
    assert report.predicted_peak_bytes == measured.peak
    # Every op's live bytes match, so the peak is attributed to the right node.
    for graph, gm in ((FORWARD, fw), (BACKWARD, bw)):
        seen = [(op, live) for phase, op, live in measured.log if phase == graph.value]
        assert op_steps(timeline, gm, graph) == seen, graph
    last_tangent = [p.name for p in bw.graph.find_nodes(op="placeholder")
                    if compat.is_tangent(p)][-1]
    tangents = [live for phase, _, live in measured.log if phase == "tangents"]
    assert tangents[-1] == timeline.live_at(BACKWARD, last_tangent)
    peak_gm = fw if timeline.peak_graph == FORWARD else bw
    assert timeline.peak_node in {n.name for n in peak_gm.graph.nodes}
    assert timeline.live_at(timeline.peak_graph, timeline.peak_node) == timeline.peak_bytes


@pytest.mark.parametrize("name", sorted(CASES))
def test_saved_and_boundary_bytes(name):
    """Kept bytes (unique computed storages of the saved values) and the bytes live between
    the forward and the backward (those; the user outputs are dropped) equal what the tracker holds."""
    _, fw, bw, _, primals = _partition(name)
    timeline = simulate(fw, bw)
    measured = measure(fw, bw, primals)
    assert timeline.saved_bytes == measured.saved
    assert timeline.boundary_bytes == measured.boundary


def test_chain_numbers():
    """chain saves only x (a primal, not counted) and recomputes sin, cos, tanh: the peak is
    in the backward, with three 64 KiB tensors live next to the 4-byte tangent (the loss
    itself is dropped when the forward returns)."""
    _, fw, bw, _, _ = _partition("chain")
    t = simulate(fw, bw)
    assert t.saved_bytes == 0
    assert t.boundary_bytes == 0  # nothing saved; the loss dropped
    assert t.peak_graph == BACKWARD
    assert t.peak_bytes == 3 * 64 * KIB + 4
    assert t.peak_of(BACKWARD).node == t.peak_node
    assert t.peak_of(FORWARD).live_bytes == 2 * 64 * KIB


def test_every_node_a_buffer_is_the_default():
    """Naming every call node as a buffer owner changes no step of the simulation."""
    _, fw, bw, _, _ = _partition("mlp")
    owners = {graph: frozenset(n.name for n in gm.graph.nodes if n.op == "call_function")
              for graph, gm in ((FORWARD, fw), (BACKWARD, bw))}
    assert simulate(fw, bw, buffers=owners).steps == simulate(fw, bw).steps


def test_fused_values_count_nothing_and_keep_their_inputs():
    """chain's backward fused into one kernel (Note [Fused values]): only ``mul_1`` owns a
    64 KiB buffer; the 4-byte tangent, read through fused ops, lives until that kernel runs.
    The forward's only buffer is the loss."""
    _, fw, bw, _, _ = _partition("chain")
    t = simulate(fw, bw, buffers={FORWARD: frozenset({"sum_1"}), BACKWARD: frozenset({"mul_1"})})
    assert t.peak_of(FORWARD).live_bytes == 4
    assert t.peak_node == "mul_1"
    assert t.peak_bytes == 64 * KIB + 4
    assert t.live_at(BACKWARD, "tanh_backward") == 4


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
    seen = [(op, live) for phase, op, live in measured.log if phase == FORWARD.value]
    assert op_steps(timeline, fw, FORWARD) == seen == [
        ("sin", 64 * KIB), ("add_", 64 * KIB), ("cos", 128 * KIB), ("copy_", 128 * KIB),
        ("mul", 128 * KIB)]
    assert timeline.peak_bytes == measured.peak == 128 * KIB


def test_more_recomputation_keeps_fewer_bytes():
    """Plans that recompute more keep fewer (or equal) bytes from forward to backward."""
    from ckptfx.pipeline import plan
    from ckptfx.planner import to_plan
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


def test_plan_carries_its_hints_for_static_shapes():
    fn, args = CASES["attention"]()
    joint = ckptfx.trace_joint(fn, *args)
    plan = ckptfx.plan_remat(joint)
    fw, bw, _ = ckptfx.apply_plan(joint, plan)
    assert plan.hints == SizeHints()
    assert predict_peak(fw, bw, plan.hints) == predict_peak(fw, bw, hints=SizeHints()) > 0


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
            seen = [(op, live) for phase, op, live in measured.log if phase == graph.value]
            assert op_steps(timeline, gm, graph) == seen, (size, graph)
