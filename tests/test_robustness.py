"""Robustness: correct under everything real training throws at the pass.

Index of kinds and the tests that cover them, with the fix each one led to (every name
below is checked to exist by test_index_names_real_tests):

RNG (random ops recomputed only with their RNG state replayed: every solver, policy, budget)
    test_robustness.py: test_dropout_mlp_bitwise_equal_eager_same_seed,
    test_dropout_mlp_grads_implied_by_forward_mask, test_dropout_masks_replayed_by_inductor_rng,
    test_dropout_inductor_fallback_random_draws_eagers_masks,
    test_dropout_inside_checkpoint_bitwise, test_recompute_vote_on_random_op_falls_back_safely,
    test_fallback_never_recomputes_random_ops, test_sdpa_without_dropout_may_be_recomputed,
    test_transformer_dropout_eager_inner_bitwise,
    test_transformer_dropout_inductor_grads_match_masks; test_zoo.py (dropout 0.1).
    Fixes: the fallback pins PyTorch's partitioner to activation_memory_budget=1.0 and
    checks its backward; the table's random/effect predicate (recompute_ban) is the one the
    invariants checker and the just-in-time placement use (SDPA at dropout_p=0 no longer
    falls back). Note [Random ops] in ckptfx/analysis/table.py.
Side effects and mutation (BatchNorm statistics once, in-place ops, input/buffer mutation,
aliased outputs, copy_ epilogues, nothing effectful recomputed)
    test_robustness.py: test_batchnorm_running_stats_updated_once,
    test_batchnorm_running_stats_updated_once_inductor,
    test_batchnorm_in_checkpoint_region_updated_once, test_inplace_ops_and_buffer_mutation,
    test_input_mutation_and_aliased_outputs, test_copy_epilogue_runs_in_forward,
    test_verify_rejects_recomputed_side_effects.
    Fix: copy_ epilogues and what they copy are forward nodes (ckptfx.joint.classify).
Mixed precision (real dtype bytes, the low-precision copy saved rather than its upcast)
    test_robustness_shapes.py: test_autocast_saves_bf16_bytes_and_never_its_fp32_copy_too,
    test_autocast_planned_bytes_are_what_autograd_keeps, test_autocast_gradients_equal_eager,
    test_autocast_inductor_gradients_close_to_eager, test_low_precision_parameters_bitwise;
    test_robustness_graphs.py: test_cse_merges_pure_duplicates_only,
    test_cse_keeps_mutation_regions_and_outputs_apart, test_cse_keeps_checkpoint_regions_apart,
    test_duplicate_gradients_stay_separate_tensors.
    Fixes: NodeFacts.widens + a preference to recompute lossless upcasts (planner); duplicate
    pure ops merged before planning, as PyTorch's partitioner does (ckptfx.passes.cse):
    Inductor failed to compile the duplicated bf16 reductions ckptfx used to emit.
Dynamic shapes and unbacked sizes
    test_robustness_shapes.py: test_dynamic_shapes_one_plan_valid_for_every_size,
    test_unbacked_sizes_plan_without_fallback,
    test_unbacked_sizes_data_dependent_ops_are_not_recomputed,
    test_unbacked_size_uses_the_shape_envs_bound_and_says_so,
    test_unbounded_unbacked_size_uses_the_configured_hint.
    Fixes: Note [Unbacked sizes] in ckptfx/analysis/sizes.py (ShapeEnv bound, else the
    configured hint; one warning per graph; the report's notes); nodes defining a
    data-dependent size are never recomputed (.item() used to fall back).
Odd graphs (frozen parameters, inputs without grad, nested and unused outputs, detach, custom
autograd.Function, graph breaks, inference, nothing worth saving, tiny graphs, checkpoint)
    test_robustness_graphs.py: test_odd_module_bitwise, test_input_grads_with_frozen_model,
    test_graph_breaks_every_subgraph_planned, test_forward_only_graphs,
    test_tiny_graphs_and_nothing_worth_saving, test_selective_checkpoint_inside.
Safety net (an exception in any stage: fallback + one warning, or raise with strict=True)
    test_backend.py: test_fallback_on_failure_is_safe_and_warns,
    test_strict_raises_instead_of_falling_back; test_robustness_graphs.py:
    test_failure_in_each_stage_falls_back_with_one_warning.
Model zoo (GPT-2, LLaMA, BERT, T5, ViT, Mixtral, a CNN; budgets 1.0/0.5/0.0; dropout 0/0.1)
    test_zoo.py: test_zoo_trains_like_eager_at_every_budget.

Most tests use ``inner="eager"``: the emitted graphs run on eager kernels, so gradients are
bit-identical to eager's and dropout draws eager's random numbers in eager's order.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint

import ckptfx
from ckptfx import policies
from ckptfx.errors import PlanValidationError

from ckptfx.testing import assert_same_run, train
from robust_util import (
    captured_plans,
    fallbacks,
    recorded_dropout,
    replayed_dropout,
    warnings_of,
)

RANDOM_OPS = ("native_dropout", "bernoulli", "rand", "randn", "inductor_seeds")


def _prefer_recompute_everything(facts):
    return policies.Vote(policies.PREFER_RECOMPUTE, "test: prefer recomputing everything")


def _must_recompute_cheap_ops(facts):
    if facts.compute_intensive:
        return None
    return policies.Vote(policies.MUST_RECOMPUTE, "test: recompute every cheap op")


# Every solver, policy and budget a random op must survive.
CONFIGS = {
    "mincut": {},
    "mincut-recompute-expensive": {"solver": "mincut", "recompute_expensive": True},
    "budget-1.0": {"memory_budget": 1.0},
    "budget-0.5": {"memory_budget": 0.5},
    "budget-0.3": {"memory_budget": 0.3},
    "budget-0.0": {"memory_budget": 0.0},
    "greedy-0.3": {"solver": "greedy", "memory_budget": 0.3},
    "peak-0.3": {"memory_budget": 0.3, "budget_kind": "peak"},
    "uniform": {"policy": "uniform"},
    "megatron-selective": {"policy": "megatron_selective"},
    "prefer-recompute-policy": {"policy": _prefer_recompute_everything,
                                "recompute_expensive": True},
}


class DropMLP(nn.Module):
    """The issue's two-layer MLP with nn.Dropout(0.5) between the layers."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.l1, self.drop, self.l2 = nn.Linear(32, 64), nn.Dropout(p), nn.Linear(64, 16)

    def forward(self, x):
        return self.l2(self.drop(torch.relu(self.l1(x))))


def _drop_mlp():
    torch.manual_seed(0)
    return DropMLP(), (torch.randn(16, 32),)


def _no_random_recomputed(backend):
    for report in backend.reports:
        ops = [r.op for r in report.recomputed]
        assert not [o for o in ops if o.split(".")[0] in RANDOM_OPS], ops


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dropout_mlp_bitwise_equal_eager_same_seed(name):
    model, x = _drop_mlp()
    ref = train(model, None, x, steps=2, seed=7)
    backend = ckptfx.CkptBackend(inner="eager", **CONFIGS[name])
    got = train(model, backend, x, steps=2, seed=7)
    assert_same_run(got, ref)
    assert fallbacks(backend) == []
    _no_random_recomputed(backend)


def _mask_reference(model, x, masks):
    """Loss and grads of ``model`` on ``x`` with dropout replaced by the given masks."""
    with replayed_dropout(masks):
        return train(model, None, x)[0]


@pytest.mark.parametrize("name", ["budget-0.3", "budget-0.0", "mincut-recompute-expensive",
                                  "prefer-recompute-policy"])
def test_dropout_mlp_grads_implied_by_forward_mask(name):
    model, x = _drop_mlp()
    with recorded_dropout() as masks:
        (got,) = train(model, ckptfx.CkptBackend(inner="eager", **CONFIGS[name]), x, seed=3)
    assert len(masks) == 1 and 0.3 < masks[0].float().mean() < 0.7
    ref = _mask_reference(model, x, masks)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-7)
    for g, r in zip(got.grads, ref.grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)


@pytest.mark.inductor
@pytest.mark.parametrize("budget", [0.3, 0.0])
def test_dropout_masks_replayed_by_inductor_rng(budget):
    """Inductor draws its own random numbers (seeds + philox); recomputing its random op from
    the saved seed replays the forward's mask: gradients equal the ones that mask implies."""
    import torch._inductor.config as inductor_config

    model, x = _drop_mlp()
    backend = ckptfx.CkptBackend(inner="inductor", memory_budget=budget)
    with inductor_config.patch(fallback_random=False), recorded_dropout() as masks:
        (got,) = train(model, backend, x, seed=3)
    ref = _mask_reference(model, x, masks)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(got.grads, ref.grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert fallbacks(backend) == []


@pytest.mark.inductor
def test_dropout_inductor_fallback_random_draws_eagers_masks():
    import torch._inductor.config as inductor_config

    model, x = _drop_mlp()
    with recorded_dropout() as eager_masks:
        (ref,) = train(model, None, x, seed=3)
    backend = ckptfx.CkptBackend(inner="inductor", memory_budget=0.0)
    with inductor_config.patch(fallback_random=True), recorded_dropout() as masks:
        (got,) = train(model, backend, x, seed=3)
    assert len(masks) == len(eager_masks) == 1 and torch.equal(masks[0], eager_masks[0])
    for g, r in zip(got.grads, ref.grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    _no_random_recomputed(backend)


class CheckpointedDropout(nn.Module):
    """Selective checkpointing that asks to recompute every op, dropout included."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def block(self, x):
        return self.l2(F.dropout(torch.relu(self.l1(x)), 0.5, True)).tanh()

    def forward(self, x):
        ctx = functools.partial(checkpoint.create_selective_checkpoint_contexts,
                                lambda *a, **k: checkpoint.CheckpointPolicy.MUST_RECOMPUTE)
        return checkpoint.checkpoint(self.block, x, use_reentrant=False, context_fn=ctx)


class DropoutInCheckpoint(nn.Module):
    """Plain torch.utils.checkpoint around a block with dropout: every op in the region is
    tagged PREFER_RECOMPUTE, the dropout too."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def block(self, x):
        return F.dropout(torch.tanh(self.l2(F.dropout(self.l1(x).relu(), 0.3, True))), 0.3,
                         True)

    def forward(self, x):
        return self.l3(checkpoint.checkpoint(self.block, x, use_reentrant=False))


@pytest.mark.parametrize("budget", [None, 0.5, 0.0])
def test_dropout_inside_checkpoint_bitwise(budget):
    torch.manual_seed(0)
    model, x = DropoutInCheckpoint(), (torch.randn(8, 16),)
    ref = train(model, None, x, steps=2, seed=9)
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget)
    got = train(model, backend, x, steps=2, seed=9)
    assert_same_run(got, ref)
    assert fallbacks(backend) == []
    _no_random_recomputed(backend)


@pytest.mark.parametrize("source", ["checkpoint-tag", "user-policy"])
def test_recompute_vote_on_random_op_falls_back_safely(source, caplog):
    """A MUST_RECOMPUTE vote on a random op cannot be planned without replaying RNG: the pass
    falls back with one warning naming the op; gradients stay eager's; strict raises."""
    torch.manual_seed(0)
    if source == "checkpoint-tag":
        model, options = CheckpointedDropout(), {}
    else:
        model = DropMLP()
        options = {"policy": _must_recompute_cheap_ops}
    x = (torch.randn(8, model.l1.in_features),)
    ref = train(model, None, x, seed=5)
    backend = ckptfx.CkptBackend(inner="eager", **options)
    with warnings_of(caplog) as records:
        got = train(model, backend, x, seed=5)
    assert_same_run(got, ref)
    (cause,) = fallbacks(backend)
    assert "native_dropout" in cause
    assert len([r for r in records if "falling back" in r.getMessage()]) == 1
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        train(model, ckptfx.CkptBackend(inner="eager", strict=True, **options), x)
    assert "native_dropout" in str(info.value)


def _boom(joint):
    raise RuntimeError("forced failure")


@pytest.mark.parametrize("guard", ["pinned-budget", "checked-result"])
def test_fallback_never_recomputes_random_ops(guard, caplog, monkeypatch):
    """PyTorch's partitioner recomputes random ops with fresh randomness below
    ``activation_memory_budget`` 1.0 (pytorch/pytorch#190758); the fallback must not. It
    pins the budget to 1.0 and, should PyTorch's backward still recompute a random op (here
    forced by unpinning it), uses PyTorch's default partitioner instead."""
    import torch._functorch.config as functorch_config
    from functorch.compile import make_boxed_func

    from ckptfx import _torch_compat as compat

    if guard == "checked-result":
        monkeypatch.setattr(compat, "torch_safe_partition", compat.torch_min_cut_partition)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 64),
                          nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 4))
    x = (torch.randn(8, 16),)
    ref = train(model, None, x, seed=5)
    nop = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    reports = []
    backend = compat.aot_autograd_backend(
        fw_compiler=nop, bw_compiler=nop,
        partition_fn=ckptfx.partition_fn(None, reports.append, fault=_boom))
    with functorch_config.patch(activation_memory_budget=0.1), warnings_of(caplog) as records:
        got = train(model, backend, x, seed=5)
    assert_same_run(got, ref)
    assert reports[0].fallback
    assert len([r for r in records if "falling back" in r.getMessage()]) == 1
    default = [r for r in records if "default partitioner" in r.getMessage()]
    assert len(default) == (guard == "checked-result")
    if default:
        assert "native_dropout" in default[0].getMessage()


def test_sdpa_without_dropout_may_be_recomputed():
    """SDPA carries the nondeterministic_seeded tag whatever its dropout_p; at dropout_p=0 it
    draws nothing, so recomputing it is safe and the invariants checker agrees."""
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0).sin().sum()

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16, requires_grad=True) for _ in range(3))
    _, ref = _grads(attn, (q, k, v))
    backend = ckptfx.CkptBackend(inner="eager", strict=True, solver="mincut",
                                 recompute_expensive=True)
    _, got = _grads(torch.compile(attn, backend=backend), (q, k, v))
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    recomputed = [r.op for r in backend.reports[0].recomputed]
    assert any("scaled_dot_product" in op for op in recomputed), recomputed


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [t.grad for t in leaves]


def _transformer(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128,
                                      n_positions=32, resid_pdrop=0.1, embd_pdrop=0.1,
                                      attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=2, vocab_size=128,
                                      max_position_embeddings=32, hidden_dropout_prob=0.1,
                                      attention_probs_dropout_prob=0.1)
        model = transformers.BertForMaskedLM(cfg)
    # eager attention: its dropout goes through F.dropout, so masks can be recorded
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    return model, {"input_ids": ids, "labels": ids}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("budget", [0.0, None])
def test_transformer_dropout_eager_inner_bitwise(kind, budget):
    """Dropout 0.1: the compiled forward draws eager's masks (same seed) and the gradients
    are eager's bit for bit, at the smallest budget and with the min-cut."""
    model, batch = _transformer(kind)
    with recorded_dropout() as eager_masks:
        ref = train(model, None, batch, steps=2, seed=11)
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget)
    with recorded_dropout() as masks:
        got = train(model, backend, batch, steps=2, seed=11)
    assert len(masks) == len(eager_masks) > 0
    assert all(torch.equal(a, b) for a, b in zip(masks, eager_masks))
    assert_same_run(got, ref)
    assert fallbacks(backend) == []
    _no_random_recomputed(backend)


@pytest.mark.slow
@pytest.mark.inductor
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_transformer_dropout_inductor_grads_match_masks(kind):
    """Inductor's own RNG: gradients equal those implied by the masks the compiled forward
    drew (the reference is rebuilt from those masks)."""
    import torch._inductor.config as inductor_config

    model, batch = _transformer(kind)
    backend = ckptfx.CkptBackend(inner="inductor", memory_budget=0.0)
    with inductor_config.patch(fallback_random=False), recorded_dropout() as masks:
        (got,) = train(model, backend, batch, seed=11)
    assert masks and all(0.8 < m.float().mean() < 0.97 for m in masks)
    with replayed_dropout(masks):
        (ref,) = train(model, None, batch)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(got.grads, ref.grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert fallbacks(backend) == []


# --- side effects and mutation -------------------------------------------------------------


def _bn_chain():
    """The issue's BatchNorm1d followed by a pointwise chain."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Sigmoid(),
                          nn.GELU(), nn.SiLU(), nn.Linear(32, 4))
    return model, (torch.randn(8, 16),)


@pytest.mark.parametrize("name", ["budget-0.2", "budget-0.0", "mincut-recompute-expensive",
                                  "prefer-recompute-policy"])
def test_batchnorm_running_stats_updated_once(name):
    options = {**CONFIGS.get(name, {}), **({"memory_budget": 0.2} if name == "budget-0.2" else {})}
    model, x = _bn_chain()
    ref = train(model, None, x, steps=2)
    backend = ckptfx.CkptBackend(inner="eager", **options)
    got = train(model, backend, x, steps=2)
    assert_same_run(got, ref)  # running_mean/var and num_batches_tracked included
    assert int(got[0].state["1.num_batches_tracked"]) == 1
    assert int(got[1].state["1.num_batches_tracked"]) == 2
    assert fallbacks(backend) == []


@pytest.mark.inductor
def test_batchnorm_running_stats_updated_once_inductor():

    model, x = _bn_chain()
    ref = train(model, None, x)
    backend = ckptfx.CkptBackend(inner="inductor", memory_budget=0.2)
    got = train(model, backend, x)
    assert_same_run(got, ref, rtol=1e-4, atol=1e-6)
    assert int(got[0].state["1.num_batches_tracked"]) == 1


class CheckpointedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)
        self.use_checkpoint = True

    def block(self, x):
        return self.bn(self.l1(x)).tanh().sin()

    def forward(self, x):
        if self.use_checkpoint:
            return self.l2(checkpoint.checkpoint(self.block, x, use_reentrant=False))
        return self.l2(self.block(x))


@pytest.mark.parametrize("budget", [None, 0.0])
def test_batchnorm_in_checkpoint_region_updated_once(budget):
    """A checkpoint region asks to recompute BatchNorm; its running statistics are still
    updated once per step. (Eager's checkpoint updates them twice, once more in its
    recomputation; the reference is the model without the checkpoint.)"""
    torch.manual_seed(0)
    model, x = CheckpointedBN(), (torch.randn(8, 16),)
    plain = copy.deepcopy(model)
    plain.use_checkpoint = False
    ref = train(plain, None, x, steps=2)
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget)
    got = train(model, backend, x, steps=2)
    assert_same_run(got, ref)
    assert int(got[1].state["bn.num_batches_tracked"]) == 2
    assert fallbacks(backend) == []


class InPlace(nn.Module):
    """In-place ops on activations and a buffer counter mutated every step."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(32))

    def forward(self, x):
        h = self.l1(x)
        h.add_(1.0).mul_(0.5)
        h.tanh_()
        self.calls.add_(1)
        self.ema.mul_(0.9).add_(h.detach().mean(0), alpha=0.1)
        y = self.l2(h.sin())
        return y.relu_()


@pytest.mark.parametrize("name", ["mincut", "budget-0.0", "mincut-recompute-expensive"])
def test_inplace_ops_and_buffer_mutation(name):
    torch.manual_seed(0)
    model, x = InPlace(), (torch.randn(8, 16),)
    ref = train(model, None, x, steps=2)
    backend = ckptfx.CkptBackend(inner="eager", **CONFIGS[name])
    got = train(model, backend, x, steps=2)
    assert_same_run(got, ref)
    assert float(got[1].state["calls"]) == 2.0
    assert fallbacks(backend) == []


class MutatesInputs(nn.Module):
    """Mutates a user input and copies into a second one; returns outputs aliasing an input
    and each other."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 16)

    def forward(self, x, out_buf, counter):
        y = self.l1(x).sin()
        out_buf.copy_(y.detach().cos())
        counter.mul_(2)
        return {"y": y.exp(), "y_raw": y, "y_flat": y.view(-1), "x_head": x[:2],
                "counter": counter}


@pytest.mark.parametrize("budget", [None, 0.0])
def test_input_mutation_and_aliased_outputs(budget):
    torch.manual_seed(0)
    model = MutatesInputs()
    x = torch.randn(8, 16, requires_grad=True)

    def run(backend):
        m = copy.deepcopy(model)
        fn = torch.compile(m, backend=backend) if backend else m
        xx, buf, counter = x.detach().clone().requires_grad_(), torch.zeros(8, 16), torch.ones(3)
        out = fn(xx, buf, counter)
        (out["y"].pow(2).mean() + out["y_flat"].sum() + out["x_head"].sum()).backward()
        return out, xx, buf, counter, [p.grad for p in m.parameters()]

    out_r, x_r, buf_r, c_r, g_r = run(None)
    backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget)
    out, xx, buf, counter, grads = run(backend)
    assert torch.equal(buf, buf_r) and torch.equal(counter, c_r) and torch.equal(counter, 2 * torch.ones(3))
    assert torch.equal(xx.grad, x_r.grad)
    assert all(torch.equal(a, b) for a, b in zip(grads, g_r))
    for key in out_r:
        assert torch.equal(out[key].detach(), out_r[key].detach()), key
    assert out["counter"] is counter or out["counter"].data_ptr() == counter.data_ptr()
    assert out["x_head"].data_ptr() == xx.data_ptr()  # still a view of the input
    assert out["y_flat"].data_ptr() == out["y_raw"].data_ptr()  # outputs still alias
    assert fallbacks(backend) == []


def test_copy_epilogue_runs_in_forward():
    """Input and buffer mutations reach the joint graph as ``copy_`` epilogues: they are
    forward nodes (with the values they copy), run once by the forward, never by the
    backward."""
    from ckptfx.joint import Role

    model, x = _bn_chain()
    with captured_plans() as seen:
        train(model, ckptfx.CkptBackend(inner="eager", memory_budget=0.0), x)
    ((joint, planned),) = seen
    copies = [n for n in joint.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert len(copies) == 3  # running_mean, running_var, num_batches_tracked
    for node in copies:
        assert joint.roles[node.name] is Role.FORWARD
        for producer in node.all_input_nodes:
            assert joint.roles[producer.name] in (Role.FORWARD, Role.PRIMAL)
        assert planned.plan.decisions[node.name].action is not ckptfx.Action.RECOMPUTE


def test_verify_rejects_recomputed_side_effects():
    """The invariants checker refuses emitted graphs that recompute a random op, whatever
    the plan says."""
    from ckptfx.joint import Role
    from ckptfx.plan import RematPlan

    torch.manual_seed(0)
    x = torch.randn(16, 16, requires_grad=True)
    joint = ckptfx.trace_joint(lambda t: F.dropout(t.sin(), 0.5, True).cos().sum(), x)
    plan = ckptfx.plan_remat(joint)
    dropout = next(n.name for n in joint.graph.nodes
                   if n.target is torch.ops.aten.native_dropout.default)
    assert dropout not in plan.recomputed
    # a hand-made plan that saves the dropout's input instead of its outputs
    sin = next(n.name for n in joint.graph.nodes if n.target is torch.ops.aten.sin.default)
    getitems = [n.name for n in joint.graph.nodes if n.op == "call_function"
                and n.args and getattr(n.args[0], "name", "") == dropout
                and joint.roles[n.name] is Role.FORWARD]
    bad = RematPlan(saved=("primals_1", sin), recomputed=(dropout, *getitems),
                    decisions=plan.decisions, solver="hand", saved_bytes=0)
    with pytest.raises(PlanValidationError, match="random"):
        ckptfx.apply_plan(joint, bad)


def test_index_names_real_tests():
    """Every test the index above names exists in the file it names."""
    import pathlib
    import re

    here = pathlib.Path(__file__).parent
    named = {}
    current = "test_robustness.py"  # a name belongs to the last file named before it
    for token in re.findall(r"(test_\w+\.py)|\b(test_\w+)\b", __doc__):
        if token[0]:
            current = token[0]
        else:
            named[token[1]] = current
    assert len(named) > 30
    for name, file in named.items():
        assert f"def {name}(" in (here / file).read_text(), f"{file} has no {name}"
