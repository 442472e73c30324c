"""Robustness: odd graphs, and the safety net failing in each stage.

See the index in test_robustness.py.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
import torch.fx as fx
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint

import ckptfx

from ckptfx.testing import assert_same_run, assert_same_tensors, grads_of, train
from robust_util import fallbacks, warnings_of

BUDGETS = [None, 0.5, 0.0]


class ScaledTanh(torch.autograd.Function):
    """A custom autograd.Function saving its inputs and output."""

    @staticmethod
    def forward(ctx, x, w):
        y = (x @ w).tanh()
        ctx.save_for_backward(x, w, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, y = ctx.saved_tensors
        gy = g * (1 - y * y)
        return gy @ w.t(), x.t() @ gy


class Odd(nn.Module):
    """Frozen parameters, a user input without grad, detach, a custom autograd.Function,
    torch.utils.checkpoint, and nested (dict/tuple/list) outputs, some unused."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(16, 16).requires_grad_(False)
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)
        self.w = nn.Parameter(torch.randn(32, 32) * 0.1)

    def forward(self, x, mask):
        h = self.a(self.frozen(x).relu()).sin()
        h = ScaledTanh.apply(h, self.w) + h.detach() * 2
        h = checkpoint.checkpoint(lambda t: F.gelu(self.b(t)).cos(), h, use_reentrant=False)
        return {"out": self.c(h) * mask, "aux": (h.sum(-1), [h.exp()]), "const": mask * 3}


def _odd_loss(out):
    return out["out"].pow(2).mean() + out["aux"][0].mean()  # aux[1] and const unused


@pytest.mark.parametrize("budget", BUDGETS)
def test_odd_module_bitwise(budget):
    torch.manual_seed(0)
    model, inputs = Odd(), (torch.randn(8, 16), torch.rand(8, 16))
    ref = train(model, None, inputs, steps=2, loss_fn=_odd_loss)
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget)
    got = train(model, backend, inputs, steps=2, loss_fn=_odd_loss)
    assert_same_run(got, ref)
    for g, r in zip(got, ref):
        for key in ("out", "const"):
            assert torch.equal(g.out[key], r.out[key])
        assert torch.equal(g.out["aux"][1][0], r.out["aux"][1][0])
    assert fallbacks(backend) == []


def test_input_grads_with_frozen_model():
    """Every parameter frozen; only a user input requires grad."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)

    def grads(backend):
        fn = torch.compile(copy.deepcopy(model), backend=backend) if backend else model
        return grads_of(lambda xx: fn(xx).sin(), [x])[1][0]

    backend = ckptfx.CkptBackend(inner="eager", memory_budget=0.0)
    assert torch.equal(grads(backend), grads(None))
    assert len(backend.reports) == 1 and fallbacks(backend) == []


def _breaks(x, w):
    y = torch.tanh(x @ w)
    torch._dynamo.graph_break()
    z = (y.sin() @ w).relu()
    torch._dynamo.graph_break()
    return (z.exp() * y).sum()


@pytest.mark.parametrize("budget", BUDGETS)
def test_graph_breaks_every_subgraph_planned(budget):
    torch.manual_seed(0)
    x, w = torch.randn(16, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)

    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget)
    _, got = grads_of(torch.compile(_breaks, backend=backend), [x, w])
    assert_same_tensors(got, grads_of(_breaks, [x, w])[1])
    assert len(backend.reports) == 3 and fallbacks(backend) == []


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_forward_only_graphs(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.0), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=0.0, strict=True)
    m = copy.deepcopy(model)
    if mode == "frozen":
        m.requires_grad_(False)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "frozen": torch.enable_grad}[mode]
    with ctx():
        out = torch.compile(m, backend=backend)(x)
    assert torch.equal(out, model(x).detach())
    assert backend.reports == []  # nothing to partition


TINY = {
    "scale": lambda x: x * 2,
    "sum": lambda x: x.sum(),
    "identity-view": lambda x: x.view(-1)[:3],
    "tuple-with-detach": lambda x: (x + 1, x.detach()),
    "params-only": lambda x: (x + torch.ones(4, 4)).mean(),
    "one-op": lambda x: x.sin(),
}


@pytest.mark.parametrize("budget", [None, 0.0])
@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_graphs_and_nothing_worth_saving(name, budget):
    fn = TINY[name]
    x = torch.randn(4, 4, requires_grad=True)

    def grads(f):
        xx = x.detach().clone().requires_grad_()
        out = f(xx)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        return xx.grad

    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget, strict=True)
    assert torch.equal(grads(torch.compile(fn, backend=backend)), grads(fn))
    for report in backend.reports:
        assert report.saved_bytes <= 4 * 4 * 4 and not report.fallback


class SelectiveCheckpoint(nn.Module):
    """torch.utils.checkpoint with a selective policy: save matmuls, recompute the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def block(self, x):
        return self.l2(F.gelu(self.l1(x))).tanh().sin()

    def forward(self, x):
        def policy(ctx, op, *args, **kwargs):
            if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                return checkpoint.CheckpointPolicy.MUST_SAVE
            return checkpoint.CheckpointPolicy.PREFER_RECOMPUTE

        ctx = functools.partial(checkpoint.create_selective_checkpoint_contexts, policy)
        return self.l3(checkpoint.checkpoint(self.block, x, use_reentrant=False, context_fn=ctx))


@pytest.mark.parametrize("budget", BUDGETS)
def test_selective_checkpoint_inside(budget):
    torch.manual_seed(0)
    model, x = SelectiveCheckpoint(), (torch.randn(8, 16),)
    ref = train(model, None, x, steps=2)
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget)
    got = train(model, backend, x, steps=2)
    assert_same_run(got, ref)
    assert fallbacks(backend) == []
    saved_ops = {s.op for s in backend.reports[0].saved}
    assert "addmm.default" in saved_ops  # the model's MUST_SAVE tags are kept


# --- the safety net, failing in each stage -------------------------------------------------

STAGES = {
    "analysis": ("ckptfx.planner.build_table", "analysis"),
    "solve": ("ckptfx.solvers.mincut.MinCutSolver.solve", "solve"),
    "rewrite": ("ckptfx.passes.rewrite.place_just_in_time", "rewrite"),
    "verify": ("ckptfx.passes.rewrite.verify", "verify"),
}


def _raise(stage):
    def fail(*args, **kwargs):
        raise RuntimeError(f"forced failure in {stage}")
    return fail


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_failure_in_each_stage_falls_back_with_one_warning(stage, monkeypatch, caplog):
    target, label = STAGES[stage]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Tanh(), nn.Linear(32, 4))
    x = (torch.randn(8, 16),)
    ref = train(model, None, x, seed=3)
    monkeypatch.setattr(target, _raise(label))
    backend = ckptfx.CkptBackend(inner="eager")
    with warnings_of(caplog) as records:
        got = train(model, backend, x, seed=3)
    assert_same_run(got, ref)
    (cause,) = fallbacks(backend)
    assert f"forced failure in {label}" in cause
    falling = [r for r in records if "falling back" in r.getMessage()]
    assert len(falling) == 1 and label in falling[0].getMessage()
    torch._dynamo.reset()
    with pytest.raises(Exception, match=f"forced failure in {label}"):
        train(model, ckptfx.CkptBackend(inner="eager", strict=True), x)


# --- merging duplicate ops before planning (ckptfx.passes.cse) -----------------------------


def _merge(fn, *inputs):
    from torch.fx.experimental.proxy_tensor import make_fx

    from ckptfx.passes.cse import merge_duplicates

    gm = make_fx(fn)(*inputs)
    before = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    merged = merge_duplicates(gm)
    gm.graph.lint()
    return gm, merged, before


def test_cse_merges_pure_duplicates_only():
    def fn(x):
        a = torch.ops.aten.native_dropout(x, 0.5, True)[0]
        b = torch.ops.aten.native_dropout(x, 0.5, True)[0]  # a second draw: never merged
        c, d = x.sin(), x.sin()                               # merged
        e, f = x * 1, x * 1.0                                 # int vs float scalar: apart
        return a + b + (c + d).exp() + e + f

    gm, merged, _ = _merge(fn, torch.randn(8))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert merged == 1
    assert targets.count(torch.ops.aten.native_dropout.default) == 2
    assert targets.count(torch.ops.aten.sin.default) == 1
    assert targets.count(torch.ops.aten.mul.Tensor) == 2


def test_cse_keeps_mutation_regions_and_outputs_apart():
    def fn(x, y):
        a = y.sin()
        y.add_(1)         # a mutation between two identical ops: they differ
        b = y.sin()
        return a + b, x.sum(0), x.sum(0)  # two outputs with one value stay two tensors

    x, y = torch.randn(4, 4), torch.randn(4)
    gm, merged, _ = _merge(fn, x, y)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert merged == 0
    assert targets.count(torch.ops.aten.sin.default) == 2
    assert targets.count(torch.ops.aten.sum.dim_IntList) == 2


def test_cse_keeps_checkpoint_regions_apart():
    """Identical ops in two checkpoint regions stay two: each region recomputes its own."""
    from ckptfx.passes.cse import merge_duplicates

    g = fx.Graph()
    x = g.placeholder("x")
    outs = []
    for region in (0, 1, 1):
        n = g.call_function(torch.ops.aten.cos.default, (x,))
        n.meta.update(recompute=checkpoint.CheckpointPolicy.PREFER_RECOMPUTE, ac_graph_id=region)
        outs.append(g.call_function(torch.ops.aten.exp.default, (n,)))
    g.output(tuple(outs))
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert merge_duplicates(gm) == 1  # the two region-1 cos (the exps are outputs)
    assert [n.meta["ac_graph_id"] for n in gm.graph.nodes
            if n.target is torch.ops.aten.cos.default] == [0, 1]


def test_duplicate_gradients_stay_separate_tensors(monkeypatch):
    """Two biases whose gradients are the same reduction of one tangent (under autocast, the
    bf16 sum before each fp32 cast): merged before planning, still two gradient tensors."""
    import ckptfx.passes.cse as cse

    counts = []
    original = cse.merge_duplicates
    monkeypatch.setattr(cse, "merge_duplicates", lambda gm: counts.append(original(gm)) or 0)
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.a(x) + self.b(x)

    net, x = Two(), (torch.randn(8, 16),)
    ref = train(net, None, x, steps=2, autocast=torch.bfloat16)
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=0.0)
    got = train(net, backend, x, steps=2, autocast=torch.bfloat16)
    assert_same_run(got, ref)
    assert counts and counts[0] >= 1
    bias_a, bias_b = got[0].grads[1], got[0].grads[3]
    assert torch.equal(bias_a, bias_b) and bias_a.data_ptr() != bias_b.data_ptr()
