"""Toy graphs: exact saved sets of the min-cut, invariants of the emitted graphs, gradient
parity with eager (bit-identical: the inner compiler is eager, so the kernels are the same)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ckptfx
from ckptfx.errors import PlanValidationError
from ckptfx.joint import Role
from ckptfx.passes.verify import verify
from ckptfx.testing import attention, chain, diamond, mlp, residual
from ckptfx.testing import ops_of as ops

from conftest import assert_bitwise, grads_of, run_partitioned

KIB = 1024
N = 256  # a 256x256 fp32 tensor is 256 KiB


def _x(*shape):
    torch.manual_seed(0)
    return torch.randn(*shape, requires_grad=True)


CASES = {
    # name: (fn, input shapes, ops of the saved values, ops recomputed, saved bytes)
    "chain": (chain, [(N, N)], ("primal",), ("sin", "cos", "tanh"), 256 * KIB),
    "mlp": (mlp, [(N, N)] * 3, ("primal", "primal", "primal", "relu"), (), 1024 * KIB),
    "residual": (residual, [(N, N)] * 2, ("primal", "primal", "tanh"), ("add", "relu"), 768 * KIB),
    "diamond": (diamond, [(N, N)], ("primal",), ("sin", "cos", "mul", "exp"), 256 * KIB),
    "attention": (attention, [(4, 64, 32)], ("primal", "_softmax"),
                  ("transpose",) + ("expand", "view") * 4, 96 * KIB),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_saved_set(name):
    fn, shapes, saved, recomputed, nbytes = CASES[name]
    inputs = [_x(*s) for s in shapes]
    joint = ckptfx.trace_joint(fn, *inputs)
    plan = ckptfx.plan_remat(joint)
    assert ops(plan, plan.saved) == saved
    assert ops(plan, plan.recomputed) == recomputed
    assert plan.saved_bytes == nbytes
    assert plan.saved_bytes <= plan.no_remat_bytes
    for name_ in plan.saved:
        assert plan.decisions[name_].action is ckptfx.Action.SAVE and plan.decisions[name_].reason


@pytest.mark.parametrize("name", sorted(CASES))
def test_invariants_of_emitted_graphs(name):
    fn, shapes, *_ = CASES[name]
    joint = ckptfx.trace_joint(fn, *[_x(*s) for s in shapes])
    plan = ckptfx.plan_remat(joint)
    fw, bw, report = ckptfx.apply_plan(joint, plan)  # verified there; checked apart here
    roles = joint.roles
    assert not [n for n in fw.graph.nodes if roles.get(n.name) is Role.TANGENT]
    bw_recomputed = [n.name for n in bw.graph.nodes if n.meta.get("ckptfx.recompute")]
    assert sorted(bw_recomputed) == sorted(plan.recomputed)
    # a recomputed node is never emitted twice, and only tangent-independent nodes lie
    # between it and its first user
    assert len(bw_recomputed) == len(set(bw_recomputed))
    nodes = list(bw.graph.nodes)
    for i, n in enumerate(nodes):
        if n.name in plan.recomputed:
            first = min(nodes.index(u) for u in n.users)
            assert all(m.name in joint.fw_computable for m in nodes[i + 1:first]), n.name
    assert report.saved_bytes == plan.saved_bytes
    assert len(report.recomputed) == len(plan.recomputed)


def test_verify_rejects_a_recomputation_placed_early():
    """The invariants checker is not a formality: a recomputed node moved before the
    backward's first tangent-dependent node is rejected."""
    joint = ckptfx.trace_joint(chain, _x(8, 8))
    plan = ckptfx.plan_remat(joint)
    fw, bw, _ = ckptfx.apply_plan(joint, plan)
    verify(joint, plan, fw, bw)
    tangent_dependent = next(n for n in bw.graph.nodes
                             if n.op == "call_function" and n.name not in joint.fw_computable)
    first = next(n for n in bw.graph.nodes if n.meta.get("ckptfx.recompute"))
    tangent_dependent.prepend(first)
    with pytest.raises(PlanValidationError, match="just before their first use"):
        verify(joint, plan, fw, bw)


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
    assert ops(plan, plan.saved) == ("primal", "primal", "addmm")
    assert {"gelu", "t"} <= set(ops(plan, plan.recomputed))
    assert plan.saved_bytes == 192 * KIB
    assert [plan.decisions[s].nbytes for s in plan.saved] == [0, 64 * KIB, 128 * KIB]


def test_roles_of_joint_graph():
    joint = ckptfx.trace_joint(chain, _x(8, 8))
    aten = torch.ops.aten

    def role_set(op):
        return {joint.roles[n.name] for n in joint.graph.nodes if n.target is op}

    placeholders = joint.graph.find_nodes(op="placeholder")
    assert [joint.roles[p.name] for p in placeholders] == [Role.PRIMAL, Role.TANGENT]
    assert role_set(aten.sin.default) == {Role.FORWARD, Role.BACKWARD}  # sin, and cos's grad
    assert role_set(aten.tanh_backward.default) == {Role.BACKWARD}
    assert joint.roles[joint.graph.find_nodes(op="output")[0].name] is Role.OUTPUT
    assert placeholders[1].name not in joint.fw_computable
    assert all(n.name in joint.fw_computable for n in joint.nodes_with(Role.FORWARD))


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


def test_apply_plan_reads_only_the_plan(monkeypatch):
    """A plan carries its size hints, its options and what the report shows of each
    decision: applying it never analyses the graph again."""
    import ckptfx.analysis.table as table
    import ckptfx.planner as planner

    joint = ckptfx.trace_joint(residual, _x(64, 64), _x(64, 64))
    plan = ckptfx.plan_remat(joint, {"memory_budget": 0.0})
    assert plan.hints is not None and plan.config.memory_budget is not None

    def no_analysis(*args, **kwargs):
        raise AssertionError("apply_plan analysed the graph again")

    monkeypatch.setattr(table, "build_table", no_analysis)
    monkeypatch.setattr(planner, "build_table", no_analysis)
    _, _, report = ckptfx.apply_plan(joint, plan)
    assert [r.op for r in report.recomputed] == [plan.decisions[r].op for r in plan.recomputed]
    assert report.extra_flops == sum(plan.decisions[r].flops for r in plan.recomputed) > 0
