"""Uniform every-k-blocks checkpointing (Chen et al. 2016): block discovery, the solver on
hand-built problems, and the saved-bytes formula on an n-layer residual MLP, with exact saved
sets and bit-identical gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ckptfx
from ckptfx.analysis.layers import blocks_from_paths, find_blocks
from ckptfx.pipeline import plan
from ckptfx.planner import select_solver
from ckptfx.solvers.base import ProblemNode, SolveProblem, needed_closure
from ckptfx.solvers.uniform import (
    UniformSolver,
    boundary_outputs,
    checkpoint_values,
    default_k,
    uniform_constraints,
)

from conftest import assert_bitwise, run_module
from ckptfx.capture import dynamo_joints

D, BATCH = 64, 32
B = BATCH * D * 4  # bytes of one residual-stream tensor (fp32)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Stack(nn.Module):
    """x -> n residual layers -> a linear head (its backward reads the last layer's output)."""

    def __init__(self, n):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Layer() for _ in range(n)])
        self.head = nn.Linear(D, D)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _x():
    torch.manual_seed(1)
    return torch.randn(BATCH, D)


@pytest.fixture(scope="module")
def joints():
    """One Dynamo joint graph per depth, planned under many k (tracing is the slow part)."""
    return {n: dynamo_joints(Stack(n), _x())[0] for n in (4, 6, 9)}


# ---- block discovery -----------------------------------------------------------------------

def test_blocks_from_paths_groups_by_outermost_repeated_container():
    pairs = [("emb", "L['self'].wte"),
             ("a", "L['self'].h.0.attn"), ("b", "L['self'].h.0.mlp.experts.0"),
             ("c", "L['self'].h.0.mlp.experts.1"), ("d", "L['self'].h.0"),
             ("e", "L['self'].h.1.attn"), ("f", "L['self'].h[1].mlp"), ("g", "L['self'].ln_f"),
             ("h", "")]
    blocks = blocks_from_paths(pairs)
    assert [(b.path, b.index, b.nodes) for b in blocks] == [
        ("L['self'].h.0", 0, ("a", "b", "c", "d")), ("L['self'].h.1", 1, ("e",)),
        ("L['self'].h[1]", 1, ("f",))]
    assert blocks_from_paths([("a", "m.h.0"), ("b", "m.ln")]) == ()  # one index: no repetition


def test_blocks_of_encoder_and_decoder_in_forward_order():
    pairs = [("e0", "enc.layer.0"), ("e1", "enc.layer.1"), ("d0", "dec.layer.0"),
             ("d1", "dec.layer.1")]
    assert [b.path for b in blocks_from_paths(pairs)] == [
        "enc.layer.0", "enc.layer.1", "dec.layer.0", "dec.layer.1"]


def test_find_blocks_on_a_dynamo_graph_has_only_forward_nodes(joints):
    from ckptfx.analysis.table import build_table
    from ckptfx.planner import size_hints

    joint = joints[4]
    table = build_table(joint, size_hints(joint, ckptfx.RematConfig()))
    blocks = find_blocks(table)
    assert [b.path for b in blocks] == [f"L['self'].layers.{i}" for i in range(4)]
    assert blocks[1].nodes == ("t_1", "addmm_1", "tanh_1", "add_1")
    # aot_function graphs carry no module metadata: no blocks
    plain = ckptfx.trace_joint(Stack(2), _x())
    assert find_blocks(build_table(plain, size_hints(plain, ckptfx.RematConfig()))) == ()


# ---- the solver on hand-built problems -------------------------------------------------------

def _chain(n):
    """x -> n blocks of (mm -> tanh -> add) -> head; every tanh is read by the backward, and
    so is the last add (the head's backward reads its input)."""
    nodes = [ProblemNode("x", 8, 0.0, is_input=True)]
    prev, layers = "x", []
    for i in range(n):
        mm, th, add = f"mm{i}", f"tanh{i}", f"add{i}"
        nodes += [ProblemNode(mm, 8, 5.0, (prev,), expensive=True),
                  ProblemNode(th, 8, 1.0, (mm,), needed_by_backward=True),
                  ProblemNode(add, 8, 1.0, (prev, th), needed_by_backward=i == n - 1)]
        layers.append((mm, th, add))
        prev = add
    nodes.append(ProblemNode("head", 8, 5.0, (prev,), expensive=True))
    return SolveProblem(tuple(nodes), layers=tuple(layers))


def test_uniform_constraints_force_interior_and_checkpoints():
    problem = _chain(4)
    assert boundary_outputs(problem, problem.layers[1]) == ("add1",)
    constrained, layout = uniform_constraints(problem, 2)
    assert layout.checkpoints == ((1, ("add1",)), (3, ("add3",)))
    assert layout.forced_save == {"add1", "add3"}
    assert layout.forced_recompute == {f"{op}{i}" for i in range(4) for op in ("mm", "tanh")} | {
        "add0", "add2"}
    assert constrained.by_name()["head"].force is None  # outside the blocks: left open


@pytest.mark.parametrize("k,saved", [(1, ("x", "add0", "add1", "add2", "add3")),
                                     (2, ("x", "add1", "add3")), (3, ("x", "add2")),
                                     (4, ("x", "add3"))])
def test_uniform_solver_exact_saved_sets(k, saved):
    problem = _chain(4)
    solution = UniformSolver(layers_per_checkpoint=k).solve(problem)
    assert solution.saved == saved
    _, violations = needed_closure(problem, set(solution.saved))
    assert not violations
    reasons = dict(solution.reasons)
    assert reasons["mm0"].startswith("uniform: inside a segment")
    assert reasons[saved[-1]].startswith("uniform: checkpoint")


def test_shared_values_a_block_derives_from_inputs_are_not_checkpoints():
    # block 0 builds a mask from input m (no matmul) that block 1 reads too, like GPT-2's SDPA
    nodes = (ProblemNode("x", 8, 0.0, is_input=True), ProblemNode("m", 8, 0.0, is_input=True),
             ProblemNode("mask0", 8, 1.0, ("m",)),
             ProblemNode("mm0", 8, 5.0, ("x",), expensive=True),
             ProblemNode("add0", 8, 1.0, ("mm0", "mask0"), needed_by_backward=True),
             ProblemNode("mm1", 8, 5.0, ("add0",), expensive=True),
             ProblemNode("add1", 8, 1.0, ("mm1", "mask0"), needed_by_backward=True))
    problem = SolveProblem(nodes, layers=(("mask0", "mm0", "add0"), ("mm1", "add1")))
    assert boundary_outputs(problem, problem.layers[0]) == ("mask0", "add0")
    assert checkpoint_values(problem, problem.layers[0]) == ("add0",)
    _, layout = uniform_constraints(problem, 1)
    assert "mask0" in layout.forced_recompute and "add0" in layout.forced_save
    assert UniformSolver(1).solve(problem).saved == ("m", "add0")  # the mask: recomputed from m


def test_uniform_never_forces_what_cannot_be_recomputed():
    nodes = list(_chain(2).nodes)
    nodes[2] = ProblemNode("tanh0", 8, 1.0, ("mm0",), needed_by_backward=True,
                           can_recompute=False, reason="random op")
    problem = SolveProblem(tuple(nodes), layers=_chain(2).layers)
    constrained, layout = uniform_constraints(problem, 2)
    assert "tanh0" not in layout.forced_recompute
    assert "tanh0" in UniformSolver(2).solve(problem).saved  # planned, not infeasible


def test_uniform_without_blocks_is_the_inner_solver_with_a_note():
    problem = SolveProblem(_chain(2).nodes)
    solution = UniformSolver().solve(problem)
    assert solution.notes[0].startswith("uniform: no repeated blocks found (")


def test_default_k_is_rounded_sqrt():
    assert [default_k(n) for n in (1, 2, 4, 6, 9, 12, 48)] == [1, 1, 2, 2, 3, 3, 7]


# ---- selection of the solver ------------------------------------------------------------------

def test_policy_uniform_selects_the_uniform_solver_wrapping_the_configured_one():
    assert select_solver(ckptfx.RematConfig(policy="uniform"))[0] == "uniform"
    name, kw = select_solver(ckptfx.RematConfig(policy=ckptfx.policies.uniform(3),
                                                layers_per_checkpoint=2))
    assert (name, kw["layers_per_checkpoint"], kw["inner"]) == ("uniform", 3, None)
    name, kw = select_solver(ckptfx.RematConfig(policy="uniform", solver="greedy",
                                                memory_budget=0.5))
    assert (name, kw["inner"]) == ("uniform", "greedy")
    assert select_solver(ckptfx.RematConfig(solver="uniform"))[0] == "uniform"


# ---- the n-layer MLP: saved bytes = (floor(n / k) + 1) * b ------------------------------------

@pytest.mark.parametrize("n", [4, 6, 9])
@pytest.mark.parametrize("k", [1, 2, 3, None])
def test_mlp_saved_bytes_follow_the_formula(joints, n, k):
    planned = plan(joints[n], ckptfx.RematConfig(policy="uniform", layers_per_checkpoint=k))
    k_eff = k or round(math.sqrt(n))
    # the checkpoints (outputs of layers k-1, 2k-1, ...) plus the input x (layer 0 reads it)
    assert planned.plan.saved_bytes == (n // k_eff + 1) * B
    ckpts = tuple(f"add_{i}" if i else "add" for i in range(k_eff - 1, n, k_eff))
    assert tuple(s for s in planned.plan.saved if planned.plan.decisions[s].nbytes) == (
        "primals_3",) + ckpts
    assert f"k={k_eff} blocks per segment over n={n} blocks" in planned.plan.notes[0]


def test_mlp_k_equal_n_keeps_one_checkpoint(joints):
    planned = plan(joints[6], ckptfx.RematConfig(policy="uniform", layers_per_checkpoint=6))
    assert planned.plan.saved_bytes == 2 * B
    # every op of every layer but the last add is recomputed, the matmuls included
    assert {f"addmm_{i}" for i in range(1, 6)} <= set(planned.plan.recomputed)


def test_uniform_composes_with_a_memory_budget(joints):
    # 1.0 is met by the no-budget plan: its min-cut plans the rest (Note [A budget the
    # no-budget plan meets]); a budget below it is the budget solver's
    planned = plan(joints[6], ckptfx.RematConfig(policy="uniform", memory_budget=1.0,
                                                 budget_kind="saved"))
    assert planned.plan.solver == "uniform"
    assert "mincut planned the rest" in planned.plan.notes[0]
    assert planned.plan.saved_bytes == 4 * B  # k = 2: the same checkpoints; nothing else fits
    assert planned.plan.saved_bytes <= planned.plan.budget_bytes
    tight = ckptfx.RematConfig(policy="uniform", memory_budget=planned.plan.saved_bytes - 1,
                               budget_kind="saved")
    planned = plan(joints[6], tight)
    assert "budget planned the rest" in planned.plan.notes[0]


@pytest.mark.parametrize("options", [{"policy": "uniform"},
                                     {"policy": "uniform", "layers_per_checkpoint": 1},
                                     {"solver": "uniform", "layers_per_checkpoint": 3}])
def test_mlp_gradients_bitwise_equal_eager(options):
    model, x = Stack(6), _x()
    ref_loss, ref_grads = run_module(model, [x], backend="eager")
    backend = ckptfx.CkptBackend(inner="eager", **options)
    loss, grads = run_module(model, [x], backend=backend)
    (report,) = backend.reports
    assert report.solver == "uniform" and not report.fallback
    k = options.get("layers_per_checkpoint") or 2
    assert report.saved_bytes == (6 // k + 1) * B
    assert torch.equal(loss, ref_loss)
    assert_bitwise(grads, ref_grads)
