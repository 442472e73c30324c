"""Robustness: mixed precision, dynamic shapes and data-dependent (unbacked) sizes.

See the index in test_robustness.py.
"""

from __future__ import annotations

import copy
import logging

import pytest
import sympy
import torch
from torch import nn

import ckptfx

from ckptfx.testing import assert_same_run, train
from robust_util import captured_plans, fallbacks, warnings_of

# --- mixed precision -----------------------------------------------------------------------


class RMSBlock(nn.Module):
    """A block whose norm upcasts its bf16 input to fp32 (LLaMA's RMSNorm does), while the
    same bf16 value also feeds a matmul: both copies are candidates to save."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = self.l1(x)
        hf = h.float()
        n = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)
        return self.l3(n) + self.l2(h)


def _rms_block():
    torch.manual_seed(0)
    return RMSBlock(), (torch.randn(16, 64),)


AUTOCAST_CONFIGS = {
    "mincut": {},
    "budget-1.0": {"memory_budget": 1.0},
    "budget-0.7": {"memory_budget": 0.7},
    "budget-0.0": {"memory_budget": 0.0},
    "greedy-0.9": {"solver": "greedy", "memory_budget": 0.9},
}


def _widened_pairs(joint, saved):
    """(low, high) pairs of saved nodes where ``high`` is a float upcast of ``low``."""
    by_name = {n.name: n for n in joint.graph.nodes}
    pairs = []
    for name in saved:
        node = by_name[name]
        val = node.meta.get("val")
        if node.op != "call_function" or not isinstance(val, torch.Tensor):
            continue
        for src in node.all_input_nodes:
            sval = src.meta.get("val")
            if (src.name in saved and isinstance(sval, torch.Tensor) and sval.is_floating_point()
                    and val.is_floating_point() and val.element_size() > sval.element_size()
                    and val.numel() == sval.numel()):
                pairs.append((src.name, name))
    return pairs


@pytest.mark.parametrize("name", sorted(AUTOCAST_CONFIGS))
def test_autocast_saves_bf16_bytes_and_never_its_fp32_copy_too(name):
    model, x = _rms_block()
    backend = ckptfx.CkptBackend(inner="eager", **AUTOCAST_CONFIGS[name])
    with captured_plans() as seen:
        train(model, backend, x, autocast=torch.bfloat16)
    ((joint, planned),) = seen
    by_name = {n.name: n for n in joint.graph.nodes}
    static = joint.static_input_names
    dtypes = set()
    for s in planned.plan.saved:
        val = by_name[s].meta["val"]
        if isinstance(val, torch.Tensor) and s not in static:
            # bytes counted at the tensor's real dtype
            assert planned.plan.decisions[s].nbytes == val.numel() * val.element_size()
            dtypes.add(val.dtype)
    assert torch.bfloat16 in dtypes
    assert _widened_pairs(joint, planned.plan.saved) == []
    assert fallbacks(backend) == []


def test_autocast_planned_bytes_are_what_autograd_keeps():
    from ckptfx.testing import saved_tensor_bytes

    model, (x,) = _rms_block()
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=0.5)
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    params = list(compiled.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, measured = saved_tensor_bytes(lambda: compiled(x), exclude=params)
    out.float().sum().backward()
    assert measured == backend.reports[0].saved_bytes


@pytest.mark.parametrize("name", ["mincut", "budget-0.7", "budget-0.0"])
def test_autocast_gradients_equal_eager(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 64),
                          nn.Tanh(), RMSBlock())
    x = (torch.randn(16, 64),)
    ref = train(model, None, x, steps=2, autocast=torch.bfloat16)
    backend = ckptfx.CkptBackend(inner="eager", **AUTOCAST_CONFIGS[name])
    got = train(model, backend, x, steps=2, autocast=torch.bfloat16)
    assert_same_run(got, ref)
    assert fallbacks(backend) == []


@pytest.mark.inductor
@pytest.mark.parametrize("budget", [None, 0.0])
def test_autocast_inductor_gradients_close_to_eager(budget):
    """Inductor compiles what ckptfx emits under autocast. (Two bf16 bias gradients reduce
    the same tangent: without the CSE PyTorch's partitioner also runs, Inductor fused the
    duplicate reductions into C++ that does not compile.)"""

    model, x = _rms_block()
    ref = train(model, None, x, autocast=torch.bfloat16)
    backend = ckptfx.CkptBackend(inner="inductor", memory_budget=budget)
    got = train(model, backend, x, autocast=torch.bfloat16)
    assert_same_run(got, ref, rtol=2e-2, atol=1e-2)  # bf16 kernels round differently
    assert fallbacks(backend) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget", [None, 0.0])
def test_low_precision_parameters_bitwise(dtype, budget):
    model, (x,) = _rms_block()
    model = model.to(dtype)
    ref = train(model, None, (x.to(dtype),), steps=2)
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget)
    with captured_plans() as seen:
        got = train(model, backend, (x.to(dtype),), steps=2)
    assert_same_run(got, ref)
    ((joint, planned),) = seen
    assert _widened_pairs(joint, planned.plan.saved) == []
    by_name = {n.name: n for n in joint.graph.nodes}
    static = {id(by_name[p].meta["val"].untyped_storage()) for p in joint.static_input_names}
    for s in planned.plan.saved:
        val = by_name[s].meta["val"]
        if isinstance(val, torch.Tensor):
            # the storage it keeps alive, at its real dtype; views of parameters cost nothing
            expected = 0 if id(val.untyped_storage()) in static else val.untyped_storage().nbytes()
            assert planned.plan.decisions[s].nbytes == expected
            assert expected == 0 or val.element_size() == 2


# --- dynamic shapes ------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 4))


SIZES = (8, 13, 29, 3)


def _run_sizes(model, backend, how):
    """One fresh copy of ``model`` called on batches of every size in SIZES."""
    from torch._dynamo.utils import counters

    counters.clear()
    m = copy.deepcopy(model)
    kwargs = {"dynamic": True} if how == "dynamic" else {}
    fn = torch.compile(m, backend=backend, **kwargs) if backend else m
    grads = []
    for n in SIZES:
        torch.manual_seed(n)
        x = torch.randn(n, 16)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 0)
        fn(x).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        for p in m.parameters():
            p.grad = None
    return grads, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("how", ["dynamic", "mark_dynamic"])
@pytest.mark.parametrize("budget", [None, 0.5, 0.0])
def test_dynamic_shapes_one_plan_valid_for_every_size(how, budget):
    model = _mlp()
    ref, _ = _run_sizes(model, None, how)
    torch._dynamo.reset()
    _, dynamo_graphs = _run_sizes(model, "aot_eager", how)
    torch._dynamo.reset()
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget)
    with captured_plans() as seen:
        got, graphs = _run_sizes(model, backend, how)
    assert graphs == dynamo_graphs == 1  # no recompilation beyond Dynamo's own
    assert len(backend.reports) == 1 and fallbacks(backend) == []
    for g_size, r_size in zip(got, ref):
        assert all(torch.equal(a, b) for a, b in zip(g_size, r_size))
    ((joint, planned),) = seen
    symbolic = [r.nbytes for r in planned.table.rows if r.name in planned.plan.saved
                and sympy.sympify(r.nbytes).free_symbols]
    assert symbolic, "saved sizes stay sympy expressions in the batch size"


# --- unbacked sizes ------------------------------------------------------------------------


def _nonzero_rows(x, w):
    idx = (x[:, 0] > 0).nonzero().squeeze(1)  # u0 in [0, 32]: the ShapeEnv bounds it
    return torch.tanh(x[idx] @ w).sin().exp().sum()


def _item_rows(x, w, n):
    k = n.item()
    torch._check(k >= 1)
    torch._check(k <= x.shape[0])
    return torch.tanh(x[:k] @ w).sin().exp().sum()


def _item_unbounded(x, w, n):
    k = n.item()
    torch._check(k >= 0)  # no upper bound the ShapeEnv knows
    return torch.tanh(x.sum() * torch.ones(k, 16) @ w).sin().exp().sum()


UNBACKED = {
    "nonzero": (_nonzero_rows, lambda x, w: (x, w)),
    "item": (_item_rows, lambda x, w: (x, w, torch.tensor(7))),
    "item-unbounded": (_item_unbounded, lambda x, w: (x, w, torch.tensor(5))),
}


def _unbacked_run(name, options):
    import torch._dynamo.config as dynamo_config

    fn, make_args = UNBACKED[name]
    torch.manual_seed(0)
    x, w = torch.randn(32, 16), torch.randn(16, 16, requires_grad=True)
    args = make_args(x, w)
    fn(*args).backward()
    ref, w.grad = w.grad.clone(), None
    backend = ckptfx.CkptBackend(inner="eager", strict=True, **options)
    with dynamo_config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True), \
            captured_plans() as seen:
        torch.compile(fn, backend=backend, fullgraph=True)(*args).backward()
    return ref, w.grad, backend, seen


@pytest.mark.parametrize("name", sorted(UNBACKED))
@pytest.mark.parametrize("budget", [None, 0.5, 0.0])
def test_unbacked_sizes_plan_without_fallback(name, budget):
    ref, got, backend, _ = _unbacked_run(name, {"memory_budget": budget})
    assert torch.equal(got, ref)
    assert len(backend.reports) == 1 and fallbacks(backend) == []


@pytest.mark.parametrize("name", ["nonzero", "item"])
def test_unbacked_sizes_data_dependent_ops_are_not_recomputed(name):
    """An op that defines a data-dependent size (nonzero, .item()) is saved, never recomputed:
    recomputing would re-bind the size in the backward and sync with the host again."""
    _, _, backend, seen = _unbacked_run(name, {"memory_budget": 0.0})
    ((joint, planned),) = seen
    for node in joint.graph.nodes:
        if node.meta.get("unbacked_bindings") and node.name in planned.plan.decisions:
            assert planned.plan.decisions[node.name].action is not ckptfx.Action.RECOMPUTE, node.name


def test_unbacked_size_uses_the_shape_envs_bound_and_says_so(caplog):
    with warnings_of(caplog, "ckptfx") as records:
        _, _, backend, seen = _unbacked_run("nonzero", {})
    ((joint, planned),) = seen
    notes = [n for n in backend.reports[0].notes if "data-dependent" in n]
    assert notes and "upper bound 32" in notes[0], backend.reports[0].notes
    # one warning for the graph, naming the symbols and the rule
    unbacked = [r for r in records if "data-dependent" in r.getMessage()]
    assert len(unbacked) == 1 and "upper bound" in unbacked[0].getMessage()
    assert not [r for r in records if "no hint" in r.getMessage()]


def test_unbounded_unbacked_size_uses_the_configured_hint(caplog):
    sizes = []
    for hint in (64, 100_000):
        torch._dynamo.reset()
        with warnings_of(caplog, "ckptfx") as records:
            _, _, backend, seen = _unbacked_run("item-unbounded",
                                                {"unbacked_size_hint": hint})
        ((joint, planned),) = seen
        notes = [n for n in backend.reports[0].notes if "data-dependent" in n]
        assert notes and f"unbacked_size_hint={hint}" in notes[0], notes
        assert len([r for r in records if "data-dependent" in r.getMessage()]) == 1
        sizes.append(planned.plan.no_remat_bytes)
    assert sizes[1] > sizes[0]  # the hint is what the bytes were evaluated with


@pytest.mark.parametrize("name", ["item", "item-unbounded"])
def test_least_peak_is_the_least_with_value_less_nodes(name):
    """``torch._check`` leaves ``_assert_scalar`` nodes, which return nothing and carry no
    ``meta["val"]``: the simulation counts them as 0 bytes (Note [Memory model]), so every
    candidate of the peak search has a real peak; an unknown one would never count as 0."""
    options = {"unbacked_size_hint": 100_000}
    _, _, _, seen = _unbacked_run(name, {**options, "memory_budget": 0.0, "budget_kind": "peak"})
    ((joint, planned),) = seen
    least = planned.plan
    fw, bw, report = ckptfx.apply_plan(joint, least)
    assert any("_assert_scalar" in str(n.target) and "val" not in n.meta
               for n in joint.graph.nodes)
    assert least.feasible and least.predicted_peak_bytes == report.predicted_peak_bytes > 0
    for other in ({}, {"memory_budget": 0.0}, {"memory_budget": 0.5}):
        plan = ckptfx.plan_remat(joint, {**options, **other})
        _, _, other_report = ckptfx.apply_plan(joint, plan)
        assert least.predicted_peak_bytes <= other_report.predicted_peak_bytes, other
