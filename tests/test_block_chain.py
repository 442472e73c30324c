"""Budgets at depth: repeated blocks found structurally, the block chain's dynamic program,
and peak budgets (the default kind) on a GPT: monotone, kept, measured."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import ckptfx
from ckptfx import RematConfig
from ckptfx.analysis.layers import find_blocks
from ckptfx.analysis.repeats import find_repeats, repeats_from_signatures
from ckptfx.analysis.sizes import SizeHints
from ckptfx.analysis.table import build_table
from ckptfx.capture import capture_joints
from ckptfx.config import MemoryBudget
from ckptfx.demo import GPTConfig, TinyGPT
from ckptfx.memory import simulate
from ckptfx.passes.rewrite import rewrite
from ckptfx.pipeline import plan as plan_all
from ckptfx.planner import size_hints
from ckptfx.solvers.blocks import block_options, block_problem
from ckptfx.solvers.chain import (
    BlockOption,
    ChainModel,
    chain_cost,
    chain_peak,
    least_chain_peak,
    solve_chain,
)
from ckptfx.testing import assert_same_run, measure_step, train

CFG = GPTConfig(vocab=256, seq=32, layers=6, heads=2, width=64, batch=4)


def _gpt():
    torch.manual_seed(0)
    return TinyGPT(CFG), torch.randint(0, CFG.vocab, (CFG.batch, CFG.seq))


@pytest.fixture(scope="module")
def joint():
    model, ids = _gpt()
    return capture_joints(model, ids)[0]


def _peak(joint, plan) -> int:
    fw, bw = rewrite(joint, plan)
    return simulate(fw, bw, plan.hints).peak_bytes


# --- structural repeats -----------------------------------------------------------------------

def test_structural_blocks_are_the_module_blocks(joint):
    table = build_table(joint, size_hints(joint, RematConfig()))
    by_path = find_blocks(table)
    by_structure = find_repeats(table)
    assert len(by_path) == CFG.layers
    assert [b.nodes for b in by_structure] == [b.nodes for b in by_path]


def test_graphs_without_module_paths_get_blocks_from_structure(joint):
    stripped = copy.copy(joint)
    stripped.gm = copy.deepcopy(joint.gm)
    for node in stripped.gm.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    planned = plan_all(stripped, RematConfig(policy="uniform", layers_per_checkpoint=1))
    assert planned.problem.layers_from == "structure"
    assert len(planned.problem.layers) == CFG.layers
    assert any(f"n={CFG.layers} blocks" in n for n in planned.plan.notes)


def test_no_repeats_in_a_graph_that_does_not_repeat():
    sigs = ["a", "b", "c", "d", "e", "f", "g", "h", "a", "b"]
    assert repeats_from_signatures(sigs, [()] * len(sigs)) == []
    toy = ckptfx.trace_joint(lambda x: x.sin().cos().exp().sum(), torch.randn(8, requires_grad=True))
    table = build_table(toy, SizeHints())
    assert find_repeats(table) == ()


# --- the dynamic program against brute force --------------------------------------------------

def _random_chain(seed: int, n: int, k: int) -> ChainModel:
    g = torch.Generator().manual_seed(seed)

    def r(lo, hi):
        return float(torch.randint(lo, hi, (1,), generator=g))

    blocks = tuple(tuple(BlockOption(f"o{o}", r(0, 10), r(0, 5), r(5, 30)) for o in range(k))
                   for _ in range(n))
    return ChainModel(blocks, r(0, 10))


@pytest.mark.parametrize("seed", range(12))
def test_chain_solution_is_the_cheapest_that_fits(seed):
    n, k = 2 + seed % 4, 2 + seed % 2
    model = _random_chain(seed, n, k)
    every = list(itertools.product(range(k), repeat=n))
    least = min(chain_peak(model, a) for a in every)
    assert least_chain_peak(model) == pytest.approx(least, rel=1e-3)
    for target in sorted({chain_peak(model, a) for a in every}) + [least - 1]:
        got = solve_chain(model, target)
        fits = [a for a in every if chain_peak(model, a) <= target]
        if not fits:
            assert got is None
            continue
        assert got is not None and chain_peak(model, got) <= target
        assert chain_cost(model, got) == pytest.approx(min(chain_cost(model, a) for a in fits))


# --- block problems ---------------------------------------------------------------------------

def test_block_options_are_a_pareto_set(joint):
    planned = plan_all(joint, RematConfig())
    problem = planned.problem
    block = problem.layers[len(problem.layers) // 2]
    needed = {n for n in block if problem.by_name()[n].needed_by_backward}
    options = block_options(block_problem(problem, block, needed), recompute_expensive=False)
    assert len(options) >= 2
    assert [o.saved_bytes for o in options] == sorted(o.saved_bytes for o in options)
    assert all(a.cost > b.cost for a, b in zip(options, options[1:]))


# --- peak budgets on a GPT --------------------------------------------------------------------

def test_peak_is_the_default_budget_kind():
    assert RematConfig(memory_budget=0.5).effective_budget_kind == "peak"


def test_peak_budgets_are_monotone_kept_and_one_is_the_no_budget_plan(joint):
    default = plan_all(joint, RematConfig()).plan
    peaks = []
    for f in (1.0, 0.75, 0.5, 0.25, 0.0):
        plan = plan_all(joint, RematConfig(memory_budget=f)).plan
        assert plan.feasible and plan.predicted_peak_bytes <= plan.budget_bytes
        assert plan.predicted_peak_bytes == _peak(joint, plan)
        assert any("block chain over 6 blocks" in n for n in plan.notes), plan.notes
        if f == 1.0:
            assert plan.saved == default.saved
        peaks.append(plan.predicted_peak_bytes)
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0]
    for nbytes in (peaks[-1], (peaks[-1] + peaks[0]) // 2, peaks[0]):  # bytes are kept too
        plan = plan_all(joint, RematConfig(memory_budget=MemoryBudget(nbytes=nbytes))).plan
        assert plan.feasible and _peak(joint, plan) <= nbytes


def test_least_peak_is_at_most_uniform_checkpointing(joint):
    least = plan_all(joint, RematConfig(memory_budget=0.0)).plan
    for k in (1, 2, 3):
        uniform = plan_all(joint, RematConfig(policy="uniform", layers_per_checkpoint=k)).plan
        assert least.predicted_peak_bytes <= _peak(joint, uniform), k


def test_least_peak_plan_measures_as_predicted(joint):
    planned = plan_all(joint, RematConfig(memory_budget=0.0))
    fw, bw = rewrite(joint, planned.plan)
    primals = [p.meta["val"] for p in joint.gm.graph.find_nodes(op="placeholder")
               if p.name.startswith("primals")]
    real = [torch.randn(v.shape, dtype=v.dtype) if v.is_floating_point()
            else torch.randint(0, CFG.vocab, v.shape) for v in primals]
    measured = measure_step(fw, bw, real)
    assert measured.peak == simulate(fw, bw, planned.plan.hints).peak_bytes


def test_block_chain_plans_train_like_eager():
    model, ids = _gpt()
    ref = train(model, None, (ids,), steps=2)
    for budget in (0.0, 0.5):
        got = train(model, ckptfx.CkptBackend(inner="eager", memory_budget=budget), (ids,),
                    steps=2)
        assert_same_run(got, ref)  # bit for bit: the same ops in the same order


def test_a_frontier_plans_every_budget_as_alone(joint):
    from ckptfx.config import parse_budget
    from ckptfx.pipeline import plan_budgets

    budgets = [parse_budget(b) for b in (1.0, 0.3, 0.0)]
    together = plan_budgets(joint, RematConfig(), budgets)
    for budget, planned in zip(budgets, together):
        alone = plan_all(joint, RematConfig(memory_budget=budget)).plan
        assert planned.plan.saved == alone.saved
        assert planned.plan.predicted_peak_bytes == alone.predicted_peak_bytes


@pytest.mark.parametrize("options", [{"memory_budget": 0.0},
                                     {"memory_budget": 0.0, "budget_kind": "saved"},
                                     {"policy": "uniform", "layers_per_checkpoint": 1}])
def test_recompute_expensive_false_binds_every_path(joint, options):
    free = plan_all(joint, RematConfig(**options)).plan
    bound = plan_all(joint, RematConfig(recompute_expensive=False, **options)).plan
    assert any(free.decisions[n].op.startswith(("addmm", "mm", "_scaled")) for n in free.recomputed)
    assert not [n for n in bound.recomputed
                if bound.decisions[n].op.startswith(("addmm", "mm", "bmm", "_scaled"))]


def test_strict_budget_error_reaches_the_caller_by_its_class():
    model, ids = _gpt()
    backend = ckptfx.CkptBackend(inner="eager", memory_budget="1KiB", strict=True)
    with pytest.raises(ckptfx.InfeasibleBudgetError):
        torch.compile(model, backend=backend)(ids).float().sum().backward()
