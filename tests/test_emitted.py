"""The emitted graphs predicted without building them (Note [Emitted graphs without building
them]): for every plan below, the simulated timeline from the predicted node orders equals,
step for step, the one simulated on the GraphModules the rewrite emits.

Every test of the suite checks this too for each candidate a peak search simulates
(``tests/conftest.py``); here the plans are chosen to reach each rule: dead-code elimination
of random ops, saved values the backward does not read, size symbols bound by the saved
values, mutations tagged for the forward, tuple outputs and views.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import ckptfx
from ckptfx import RematConfig
from ckptfx.candidates import Simulator
from ckptfx.capture import capture_joints
from ckptfx.pipeline import plan as plan_all
from ckptfx.passes.rewrite import rewrite
from ckptfx.planner import prepare
from ckptfx.solvers.base import Solution
from ckptfx.testing import TOY_GRAPHS

CONFIGS = (
    {},
    {"memory_budget": 0.0, "budget_kind": "saved"},
    {"memory_budget": 0.5, "budget_kind": "saved"},
    {"memory_budget": 0.0},
)


def _same(joint, plan) -> None:
    got = Simulator(joint).timeline(plan)
    ref = Simulator(joint, emitted=False).timeline(plan)
    assert got is not None and ref is not None
    assert got == ref


def _plans(joint):
    """The plans of CONFIGS, and plans saving the no-budget plan's values minus one each
    (the rest recomputed, or read by no backward node and dropped)."""
    plans = [plan_all(joint, RematConfig.coerce(c)).plan for c in CONFIGS]
    prep = prepare(joint, RematConfig())
    base = plans[0]
    for name in base.saved[:6]:
        saved = tuple(s for s in base.saved if s != name)
        try:
            plan = prep.to_plan(prep.problem, Solution(saved), "mincut")
            rewrite(joint, plan)
        except ckptfx.PlanValidationError:
            continue  # a value that may not be recomputed: no such plan
        plans.append(plan)
    return plans


def _toy(name):
    fn, inputs = TOY_GRAPHS[name]()
    if isinstance(fn, nn.Module):
        return capture_joints(fn, tuple(inputs))[0]
    return ckptfx.trace_joint(fn, *inputs)


@pytest.mark.parametrize("name", sorted(TOY_GRAPHS))
def test_toy_graphs(name):
    joint = _toy(name)
    for plan in _plans(joint):
        _same(joint, plan)


class _Block(nn.Module):
    def __init__(self, width: int, p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(torch.relu(self.fc(self.norm(x))))


class _Stack(nn.Module):
    def __init__(self, width: int = 32, layers: int = 3, p: float = 0.1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width, p) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def test_dropout_blocks():
    torch.manual_seed(0)
    joint = capture_joints(_Stack(), (torch.randn(4, 8, 32),))[0]
    plans = _plans(joint) + [plan_all(joint, RematConfig(policy="uniform",
                                                         layers_per_checkpoint=1)).plan]
    for plan in plans:
        _same(joint, plan)


def test_dynamic_sizes_bind_their_symbols():
    torch.manual_seed(0)
    x = torch.randn(6, 8, 32)
    torch._dynamo.mark_dynamic(x, 0)
    joint = capture_joints(_Stack(p=0.0), (x,), dynamic=True)[0]
    assert any(isinstance(n.meta.get("val"), torch.SymInt) for n in joint.graph.nodes)
    for plan in _plans(joint):
        _same(joint, plan)


def test_emitted_views_are_used_on_a_gpt():
    from ckptfx.demo import GPTConfig, TinyGPT

    torch.manual_seed(0)
    cfg = GPTConfig(vocab=128, seq=16, layers=3, heads=2, width=32, batch=2)
    joint = capture_joints(TinyGPT(cfg), torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq)))[0]
    simulator = Simulator(joint)
    for plan in _plans(joint):
        assert simulator.timeline(plan) == Simulator(joint, emitted=False).timeline(plan)
    assert simulator.rewrites == 0  # every plan was simulated without building its graphs


def test_a_graph_output_the_extractor_would_replace_is_rewritten():
    joint = _toy("chain")
    plan = plan_all(joint, RematConfig()).plan
    simulator = Simulator(joint)
    layout = simulator.layout
    # a forward output the forward cannot compute (the extractor would look for a
    # replacement): the rule is not covered, so the graphs are built instead
    layout.fwd_outputs = layout.fwd_outputs + layout.tangents[:1]
    assert layout.views(plan.saved) is None
    assert simulator.timeline(dataclasses.replace(plan)) is not None
    assert simulator.rewrites == 1
