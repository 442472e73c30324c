"""Toy graphs: exact saved sets of the min-cut, invariants of the emitted graphs, gradient
parity with eager (bit-identical: the inner compiler is eager, so the kernels are the same)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ckptfx
from ckptfx.passes.verify import verify
from ckptfx.joint import Role

from conftest import assert_bitwise, grads_of, run_partitioned

KIB = 1024
N = 256  # a 256x256 fp32 tensor is 256 KiB


def _x(*shape):
    torch.manual_seed(0)
    return torch.randn(*shape, requires_grad=True)


def chain(x):
    return x.sin().cos().tanh().sum()


def mlp(x, w1, w2):
    return (torch.relu(x @ w1) @ w2).sum()


def residual(x, w):
    return (x + torch.tanh(x @ w)).relu().sum()


def diamond(x):
    return (x.sin() * x.cos()).exp().sum()


def attention(q):
    s = q @ q.transpose(-1, -2) / 8.0
    return (s.softmax(-1) @ q).sum()


CASES = {
    # name: (fn, input shapes, expected saved, expected recomputed, saved bytes)
    "chain": (chain, [(N, N)], ("primals_1",), ("sin", "cos", "tanh"), 256 * KIB),
    "mlp": (mlp, [(N, N)] * 3, ("primals_1", "primals_2", "primals_3", "relu"), (), 1024 * KIB),
    "residual": (residual, [(N, N)] * 2, ("primals_1", "primals_2", "tanh"), ("add", "relu"), 768 * KIB),
    "diamond": (diamond, [(N, N)], ("primals_1",), ("sin", "cos", "mul", "exp"), 256 * KIB),
    "attention": (attention, [(4, 64, 32)], ("primals_1", "_softmax"),
                  ("transpose", "expand", "view", "expand_1", "view_1", "expand_2", "view_3",
                   "expand_3", "view_4"), 96 * KIB),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_saved_set(name):
    fn, shapes, saved, recomputed, nbytes = CASES[name]
    inputs = [_x(*s) for s in shapes]
    joint = ckptfx.trace_joint(fn, *inputs)
    plan = ckptfx.plan_remat(joint)
    assert plan.saved == saved
    assert plan.recomputed == recomputed
    assert plan.saved_bytes == nbytes
    assert plan.saved_bytes <= plan.no_remat_bytes
    for name_ in plan.saved:
        assert plan.decisions[name_].action == "save" and plan.decisions[name_].reason


@pytest.mark.parametrize("name", sorted(CASES))
def test_invariants_of_emitted_graphs(name):
    fn, shapes, *_ = CASES[name]
    joint = ckptfx.trace_joint(fn, *[_x(*s) for s in shapes])
    plan = ckptfx.plan_remat(joint)
    fw, bw, report = ckptfx.apply_plan(joint, plan)
    verify(joint, plan, fw, bw)  # lint, no tangent in forward, saved == plan, JIT placement
    fw_names = {n.name for n in fw.graph.nodes}
    assert not any(n.startswith("tangents") for n in fw_names)
    bw_recomputed = [n.name for n in bw.graph.nodes if n.meta.get("ckptfx.recompute")]
    assert sorted(bw_recomputed) == sorted(plan.recomputed)
    # a recomputed node is never emitted twice, and sits right before a user
    assert len(bw_recomputed) == len(set(bw_recomputed))
    order = {n.name: i for i, n in enumerate(bw.graph.nodes)}
    for n in bw.graph.nodes:
        if n.name in plan.recomputed:
            assert min(order[u.name] for u in n.users) > order[n.name]
    assert report.saved_bytes == plan.saved_bytes
    assert len(report.recomputed) == len(plan.recomputed)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_bitwise_equal_eager(name):
    fn, shapes, *_ = CASES[name]
    inputs = [_x(*s) for s in shapes]
    out_ref, grads_ref = grads_of(fn, inputs)
    out, grads, reports = run_partitioned(fn, inputs)
    assert reports and reports[-1].solver == "mincut" and not reports[-1].fallback
    assert torch.equal(out, out_ref)
    assert_bitwise(grads, grads_ref)


def test_module_mlp_parameters_cost_nothing_to_save():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    joint = ckptfx.trace_joint(model, torch.randn(64, 256))
    static = joint.static_input_names
    assert len(static) == 4  # two weights, two biases
    plan = ckptfx.plan_remat(joint)
    # the input (64 KiB), the first addmm (128 KiB) and the second weight (a parameter: it is
    # alive anyway; its transpose, a view, is recomputed); gelu is recomputed from addmm
    assert plan.saved == ("primals_3", "primals_5", "addmm")
    assert "gelu" in plan.recomputed and "t_1" in plan.recomputed
    assert plan.saved_bytes == 192 * KIB
    assert plan.decisions["primals_3"].nbytes == 0


def test_roles_of_joint_graph():
    joint = ckptfx.trace_joint(chain, _x(8, 8))
    roles = joint.roles
    assert roles["primals_1"] is Role.PRIMAL and roles["tangents_1"] is Role.TANGENT
    assert roles["sin"] is Role.FORWARD and roles["output"] is Role.OUTPUT
    assert {n.name for n in joint.nodes_with(Role.BACKWARD)} >= {"mul"}
    assert "tangents_1" not in joint.fw_computable and "sin" in joint.fw_computable


def test_multi_output_and_views():
    def f(x):
        var, mean = torch.var_mean(x, dim=-1, keepdim=True)
        y = (x - mean) / (var + 1e-5).sqrt()
        return y.transpose(0, 1).reshape(-1).sin().sum()

    x = _x(64, 32)
    out_ref, g_ref = grads_of(f, [x])
    out, g, reports = run_partitioned(f, [x])
    assert_bitwise(g, g_ref)
    joint = ckptfx.trace_joint(f, x)
    plan = ckptfx.plan_remat(joint)
    tuple_nodes = [n.name for n in joint.graph.nodes if isinstance(n.meta.get("val"), tuple)]
    assert tuple_nodes and not set(tuple_nodes) & set(plan.saved)  # tuples are never saved
