"""Policies: exact saved sets of every built-in on toy graphs, bit-identical gradients, the
user-policy chokepoint, hashability, combinators, PREFER as a genuinely soft preference, and
torch.utils.checkpoint / selective-checkpoint tags inside a compiled model."""

from __future__ import annotations

import collections
import copy
import functools
import math

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import ckptfx
from ckptfx import ConfigError, policies
from ckptfx.analysis.table import NodeFacts
from ckptfx.joint import Role
from ckptfx.solvers.base import Force
from ckptfx.policies import MUST_RECOMPUTE, MUST_SAVE, PREFER_RECOMPUTE, PREFER_SAVE, Vote

from ckptfx.testing import ops_of
from conftest import assert_bitwise, grads_of, run_partitioned

aten = torch.ops.aten
KIB = 1024
N = 256  # a 256x256 fp32 tensor is 256 KiB


def _x(*shape, grad=True):
    torch.manual_seed(0)
    return torch.randn(*shape, requires_grad=grad)


def facts(**kw) -> NodeFacts:
    """A NodeFacts with neutral defaults (a forward tensor op outside every module)."""
    base = dict(name="n", role=Role.FORWARD, target=aten.sin.default, fw_computable=True,
                nbytes=sympy.Integer(4), is_tensor=True, is_sym=False, is_view=False,
                is_random=False, has_side_effect=False, is_collective=False,
                compute_intensive=False, flops=0, cost_s=0.0, module_path="", module_types=(),
                checkpoint_tag=None, ban_reason="")
    base.update(kw)
    return NodeFacts(**base)


# ---- toy models -----------------------------------------------------------------------------

class ToyAttention(nn.Module):
    """Causal multi-head attention written out (eager) or through SDPA."""

    def __init__(self, d, heads, sdpa=False, max_seq=16):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        # a buffer, not ones().tril() in forward: AOTAutograd may CSE such constants across
        # checkpoint regions, which makes the exact saved sets below depend on it
        future = torch.ones(max_seq, max_seq, dtype=torch.bool).triu(1)
        self.register_buffer("future", future, persistent=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(d, dim=-1))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
            out = scores.masked_fill(self.future[:s, :s], float("-inf")).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.out(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d, heads, sdpa):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), ToyAttention(d, heads, sdpa)
        self.ln2, self.mlp = nn.LayerNorm(d), MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Net(nn.Module):
    """``blocks`` transformer blocks; ``sac``: None (no checkpoint), "plain" (each block in
    torch.utils.checkpoint), or a selective-checkpoint policy function."""

    def __init__(self, blocks=2, d=64, heads=4, sdpa=False, sac=None):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(d, heads, sdpa) for _ in range(blocks)])
        self.sac = sac

    def forward(self, x):
        for block in self.blocks:
            if self.sac is None:
                x = block(x)
            elif self.sac == "plain":
                x = checkpoint(block, x, use_reentrant=False)
            else:
                ctx = functools.partial(create_selective_checkpoint_contexts, self.sac)
                x = checkpoint(block, x, use_reentrant=False, context_fn=ctx)
        return x


X_BYTES = 2 * 16 * 64 * 4  # the (2, 16, 64) input and every residual-stream tensor: 8 KiB


def _net_x():
    torch.manual_seed(1)
    return torch.randn(2, 16, 64)


def _eager_grads(model, x):
    m = copy.deepcopy(model)
    loss = m(x).float().pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad for p in m.parameters()]


def compiled(model, x, **options):
    """(loss, grads, report) of a deep copy compiled with CkptBackend(inner="eager")."""
    backend = ckptfx.CkptBackend(inner="eager", strict=True, **options)
    m = copy.deepcopy(model)
    loss = torch.compile(m, backend=backend)(x).float().pow(2).mean()
    loss.backward()
    (report,) = backend.reports
    return loss.detach(), [p.grad for p in m.parameters()], report


def saved_with_bytes(report):
    """Saved values that cost bytes (parameters cost none), by name."""
    return tuple(s.name for s in report.saved if s.nbytes)


def op_counts(values):
    """Saved or recomputed values of a report, counted by op without its overload."""
    return collections.Counter(v.op.split(".")[0] for v in values)


def _check_parity(model, x, **options):
    ref_loss, ref_grads = _eager_grads(model, x)
    loss, grads, report = compiled(model, x, **options)
    assert torch.equal(loss, ref_loss)
    assert_bitwise(grads, ref_grads)
    assert not report.fallback
    return report


# ---- the Vote and the user-policy chokepoint --------------------------------------------------

def test_vote_validates_its_fields():
    with pytest.raises(ConfigError, match="must be a ckptfx.policies.VoteKind"):
        Vote("must_save", "why")
    with pytest.raises(ConfigError, match="reason a str"):
        Vote(MUST_SAVE, None)


@pytest.mark.parametrize("bad,hint", [
    (True, "a bool is ambiguous"), (MUST_SAVE, "add a reason"),
    (CheckpointPolicy.MUST_SAVE, "Vote\\(VoteKind.MUST_SAVE"), ("save", "must return None or")])
def test_user_policy_bad_return_value_says_how_to_fix(bad, hint):
    joint = ckptfx.trace_joint(lambda x: x.sin().sum(), _x(4, 4))
    with pytest.raises(ConfigError, match=hint) as info:
        ckptfx.plan_remat(joint, ckptfx.RematConfig(policy=lambda f: bad))
    assert "for node sin" in str(info.value)
    assert "Vote(ckptfx.policies.MUST_SAVE, 'why')" in str(info.value)


def test_user_policy_that_raises_names_the_node():
    joint = ckptfx.trace_joint(lambda x: x.sin().sum(), _x(4, 4))
    with pytest.raises(ConfigError, match="raised KeyError.*on node sin"):
        ckptfx.plan_remat(joint, ckptfx.RematConfig(policy=lambda f: {}["x"]))


def test_user_policy_error_is_the_users_whether_strict_or_not():
    # a bad policy is the user's mistake to fix, not a graph the pass cannot handle: no fallback
    fn = lambda x: x.sin().cos().sum()  # noqa: E731
    for strict in (False, True):
        with pytest.raises(ConfigError, match="returned 1"):
            run_partitioned(fn, [_x(8, 8)], ckptfx.RematConfig(policy=lambda f: 1, strict=strict))


def test_policy_option_validation():
    with pytest.raises(ConfigError, match="megatron_selective, respect_checkpoint_tags, uniform"):
        ckptfx.RematConfig(policy="megatron")
    with pytest.raises(ConfigError, match="is not a policy"):
        ckptfx.RematConfig.from_options({"policy": 3})
    with pytest.raises(ConfigError, match="not ops"):
        policies.save_ops("mm")
    with pytest.raises(ConfigError, match="str globs"):
        policies.save_modules(3)
    with pytest.raises(ConfigError, match="layers_per_checkpoint=0"):
        policies.uniform(0)


def test_a_user_callable_is_a_policy():
    def save_sin(f):
        return Vote(MUST_SAVE, "mine") if f.op_name == "sin.default" else None

    joint = ckptfx.trace_joint(lambda x: x.sin().cos().tanh().sum(), _x(N, N))
    plan = ckptfx.plan_remat(joint, ckptfx.RematConfig(policy=save_sin))
    assert "sin" in plan.saved and plan.decisions["sin"].reason == "mine"


# ---- hashability and the public namespace ----------------------------------------------------

BUILTINS = [
    lambda: policies.save_ops(aten.mm, aten.addmm.default),
    lambda: policies.recompute_ops(aten.gelu, prefer=True),
    lambda: policies.save_modules("*.mlp.*"),
    lambda: policies.megatron_selective(),
    lambda: policies.uniform(2),
    lambda: policies.respect_checkpoint_tags(),
    lambda: policies.first_of("megatron_selective", policies.save_ops(aten.mm)),
    lambda: policies.strongest(policies.uniform(), "respect_checkpoint_tags"),
]


@pytest.mark.parametrize("make", BUILTINS)
def test_builtins_are_frozen_and_hash_by_value(make):
    a, b = make(), make()
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert ckptfx.RematConfig(policy=a).cache_key() == ckptfx.RematConfig(policy=b).cache_key()
    with pytest.raises(AttributeError):
        a.prefer = True  # frozen (a FrozenInstanceError is an AttributeError)


def test_different_arguments_are_different_policies():
    assert policies.uniform(2) != policies.uniform(3)
    assert policies.save_ops(aten.mm) != policies.save_ops(aten.mm, prefer=True)
    assert policies.megatron_selective() != policies.megatron_selective(recompute_cheap=False)


def test_builtin_names_resolve_to_the_classes():
    assert policies.resolve("uniform") == policies.uniform()
    assert policies.resolve("megatron_selective") == policies.megatron_selective()
    policies.register_builtin("save_mm", lambda: policies.save_ops(aten.mm))
    try:
        assert ckptfx.RematConfig(policy="save_mm").policy == "save_mm"
    finally:
        del policies.BUILTIN["save_mm"]


def test_solver_request_finds_structural_policies_inside_combinators():
    assert policies.solver_request(None) is None
    assert policies.solver_request("megatron_selective") is None
    assert policies.solver_request("uniform") == ("uniform", {})
    nested = policies.first_of(policies.save_ops(aten.mm), policies.uniform(3))
    assert policies.solver_request(nested) == ("uniform", {"layers_per_checkpoint": 3})


# ---- combinators ------------------------------------------------------------------------------

def _const(kind):
    return lambda f: Vote(kind, kind.name)


def test_first_of_first_vote_wins():
    p = policies.first_of(lambda f: None, _const(PREFER_SAVE), _const(MUST_RECOMPUTE))
    assert p(facts()).kind is PREFER_SAVE
    assert policies.first_of(lambda f: None)(facts()) is None


def test_strongest_must_beats_prefer_first_among_equals():
    p = policies.strongest(_const(PREFER_SAVE), _const(MUST_RECOMPUTE), _const(MUST_SAVE))
    assert p(facts()).kind is MUST_RECOMPUTE
    assert policies.strongest(_const(PREFER_RECOMPUTE), _const(PREFER_SAVE))(facts()).kind is (
        PREFER_RECOMPUTE)
    assert policies.strongest(lambda f: None)(facts()) is None


def test_combinators_validate_their_members_votes():
    with pytest.raises(ConfigError, match="returned 7"):
        policies.first_of(lambda f: 7)(facts())


# ---- the op and module policies on toy graphs --------------------------------------------------

def chain(x):
    return x.sin().cos().tanh().sum()


def mlp(x, w1, w2):
    return (torch.relu(x @ w1) @ w2).sum()


def attention(q):
    s = q @ q.transpose(-1, -2) / 8.0
    return (s.softmax(-1) @ q).sum()


OP_CASES = {
    # name: (fn, shapes, policy, saved, recomputed, saved KiB); defaults in test_toy_graphs
    # (ops of the saved values and of the recomputed nodes, in graph order)
    "save_ops_sin": (chain, [(N, N)], policies.save_ops(aten.sin), ("sin", "cos"),
                     ("cos", "tanh"), 512),
    "save_ops_overload": (chain, [(N, N)], policies.save_ops(aten.cos.default),
                          ("primal", "tanh"), ("sin",), 512),
    "recompute_ops_relu": (mlp, [(N, N)] * 3, policies.recompute_ops(aten.relu),
                           ("primal", "primal", "primal", "mm"), ("relu",), 1024),
    "recompute_ops_mm": (mlp, [(N, N)] * 3, policies.recompute_ops(aten.mm),
                         ("primal", "primal", "primal"), ("mm", "relu"), 768),
    "recompute_ops_softmax": (attention, [(4, 64, 32)], policies.recompute_ops(aten._softmax),
                              ("primal", "div"),
                              ("transpose", "expand", "view", "expand", "view", "_softmax",
                               "expand", "view", "expand", "view"), 96),
    # no module metadata under aot_function: the attention core is found by op (bmm, softmax)
    "megatron_no_modules": (attention, [(4, 64, 32)], policies.megatron_selective(),
                            ("primal",),
                            ("transpose", "expand", "view", "expand", "view", "bmm",
                             "view", "div", "_softmax", "expand", "view", "expand",
                             "view"), 32),
}


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_op_policies_exact_saved_set_and_bitwise_gradients(name):
    fn, shapes, policy, saved, recomputed, kib = OP_CASES[name]
    inputs = [_x(*s) for s in shapes]
    plan = ckptfx.plan_remat(ckptfx.trace_joint(fn, *inputs), ckptfx.RematConfig(policy=policy))
    assert ops_of(plan, plan.saved) == saved and ops_of(plan, plan.recomputed) == recomputed
    assert plan.saved_bytes == kib * KIB
    out_ref, grads_ref = grads_of(fn, inputs)
    out, grads, reports = run_partitioned(fn, inputs, ckptfx.RematConfig(policy=policy))
    assert not reports[-1].fallback
    assert torch.equal(out, out_ref)
    assert_bitwise(grads, grads_ref)


def test_save_ops_must_save_is_never_recomputed():
    plan = ckptfx.plan_remat(ckptfx.trace_joint(chain, _x(N, N)),
                             ckptfx.RematConfig(policy=policies.save_ops(aten.sin)))
    assert "sin" not in plan.recomputed and plan.decisions["sin"].reason == "save_ops: sin.default"


# ---- PREFER is soft ---------------------------------------------------------------------------

def tie(x):  # the backward reads exp(x): save exp (256 KiB) or x (256 KiB) and recompute exp
    return x.exp().sin().sum()


def lopsided(x):  # save exp(repeat(x)) (1 MiB) or x (256 KiB) and recompute both ops
    return x.repeat(4, 1).exp().sin().sum()


@pytest.mark.parametrize("fn,policy,saved", [
    (tie, None, ("exp",)),                                                # tie-break: latest
    (tie, policies.recompute_ops(aten.exp, prefer=True), ("primals_1",)),  # PREFER wins a tie
    (tie, policies.save_ops(aten.exp, prefer=True), ("exp",)),
    (lopsided, None, ("primals_1",)),
    (lopsided, policies.save_ops(aten.exp, prefer=True), ("primals_1",)),  # loses to 4x bytes
    (lopsided, policies.save_ops(aten.exp), ("exp",)),                     # MUST is hard
])
def test_prefer_wins_ties_and_loses_to_large_byte_differences(fn, policy, saved):
    x = _x(N, N)
    plan = ckptfx.plan_remat(ckptfx.trace_joint(fn, x), ckptfx.RematConfig(policy=policy))
    assert plan.saved == saved
    out_ref, grads_ref = grads_of(fn, [x])
    _, grads, _ = run_partitioned(fn, [x], ckptfx.RematConfig(policy=policy))
    assert_bitwise(grads, grads_ref)


def test_prefer_recompute_lifts_the_compute_intensive_default():
    # mm is compute-intensive: the min-cut never recomputes it unless a policy asks to
    plan = ckptfx.plan_remat(ckptfx.trace_joint(mlp, *[_x(N, N)] * 3), ckptfx.RematConfig(
        policy=policies.first_of(policies.recompute_ops(aten.relu),
                                 policies.recompute_ops(aten.mm, prefer=True))))
    assert "mm" in plan.recomputed


# ---- module policies on a compiled toy transformer ---------------------------------------------

def test_save_modules_saves_what_ran_in_matching_modules():
    model, x = Net(blocks=1), _net_x()
    default = compiled(model, x)[2]
    report = _check_parity(model, x, policy=policies.save_modules("*.mlp"))
    # the default plan recomputes gelu from the fc output; the glob keeps gelu's output too
    assert set(saved_with_bytes(default)) < set(saved_with_bytes(report))
    (extra,) = [s for s in report.saved if s.nbytes and s.name not in saved_with_bytes(default)]
    assert extra.op == "gelu.default" and extra.nbytes == 4 * X_BYTES
    assert report.saved_bytes == default.saved_bytes + 4 * X_BYTES
    assert op_counts(report.recomputed)["gelu"] == 0 < op_counts(default.recomputed)["gelu"]


def test_megatron_selective_on_eager_attention():
    model, x = Net(blocks=2), _net_x()
    default = compiled(model, x)[2]
    report = _check_parity(model, x, policy="megatron_selective")
    # per block: the qkv output (3 x 8 KiB), the attention projection's output (8 KiB; with
    # the residual adds preferred recomputed it stands in for the residual stream) and the
    # fc output (32 KiB); block 0's MLP output too (block 1 recomputes its input from it).
    # No seq x seq scores: QK^T, mask, softmax and .V are recomputed.
    assert op_counts(s for s in report.saved if s.nbytes) == {"primal": 1, "addmm": 7}
    assert report.saved_bytes == X_BYTES * (1 + 2 * (3 + 1 + 4) + 1)
    assert report.saved_bytes < default.saved_bytes
    assert op_counts(default.saved)["_softmax"] >= 1
    recomputed = op_counts(report.recomputed)
    assert recomputed["bmm"] >= 4 and recomputed["_softmax"] >= 2  # QK^T and .V, 2 blocks
    assert recomputed["div"] >= 2 and recomputed["masked_fill"] >= 2
    assert {r.reason for r in report.recomputed if r.op == "bmm.default"} == {
        "megatron_selective: attention core (bmm.default)"}
    assert {s.module for s in report.saved if s.nbytes} == {
        ""} | {f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.qkv", "attn.proj", "mlp.fc")} | {
        "blocks.0.mlp.out"}  # module paths as the user writes them


def test_megatron_selective_on_sdpa_keeps_the_fused_kernel():
    model, x = Net(blocks=2, sdpa=True), _net_x()
    default = compiled(model, x)[2]
    report = _check_parity(model, x, policy="megatron_selective")
    assert not any("scaled_dot_product" in r.op for r in report.recomputed)
    # the fused kernel keeps no seq x seq activation: nothing to gain over the default plan
    assert report.saved_bytes == default.saved_bytes
    assert {f"blocks.{i}.attn.qkv" for i in (0, 1)} <= {s.module for s in report.saved}


# ---- checkpoint tags inside the compiled model ------------------------------------------------

def _sac_save_addmm(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op is aten.addmm.default else CheckpointPolicy.PREFER_RECOMPUTE


def test_plain_checkpoint_regions_save_only_block_inputs():
    model, x = Net(blocks=2, sac="plain"), _net_x()
    report = _check_parity(model, x)
    # the input of block 0 and the output of block 0 (= input of block 1, tagged MUST_SAVE by
    # AOTAutograd's cleanup_recompute_tags); everything inside both blocks is recomputed
    assert op_counts(s for s in report.saved if s.nbytes) == {"primal": 1, "add": 1}
    assert report.saved_bytes == 2 * X_BYTES
    assert {"addmm", "bmm", "_softmax", "gelu"} <= set(op_counts(report.recomputed))
    assert all("PREFER_RECOMPUTE" in r.reason or r.reason.startswith("min-cut")
               for r in report.recomputed)


def test_selective_checkpoint_policy_must_save_is_a_constraint():
    model, x = Net(blocks=2, sac=_sac_save_addmm), _net_x()
    report = _check_parity(model, x)
    addmms = [s for s in report.saved if s.op == "addmm.default"]
    # every block's qkv, attention projection and fc output; the MLP output is not read by
    # the backward
    assert sorted(s.module.split("blocks.")[-1] for s in addmms) == [
        f"{i}.{m}" for i in (0, 1) for m in ("attn.proj", "attn.qkv", "mlp.fc")]
    assert {s.reason for s in addmms} == {"torch.utils.checkpoint tag MUST_SAVE"}
    assert report.saved_bytes == X_BYTES * (2 + 2 * (3 + 1 + 4))


def test_user_must_vote_beats_a_prefer_tag_and_the_solver_plans_the_rest():
    model, x = Net(blocks=2, sac="plain"), _net_x()
    report = _check_parity(model, x, policy=policies.save_ops(aten.gelu))
    assert op_counts(s for s in report.saved if s.nbytes)["gelu"] == 2  # one per block
    assert op_counts(report.recomputed)["addmm"] >= 1  # still recomputed (PREFER tag)


@pytest.mark.parametrize("tag,kind", [
    (CheckpointPolicy.MUST_SAVE, MUST_SAVE), (CheckpointPolicy.PREFER_SAVE, PREFER_SAVE),
    (CheckpointPolicy.MUST_RECOMPUTE, MUST_RECOMPUTE),
    (CheckpointPolicy.PREFER_RECOMPUTE, PREFER_RECOMPUTE),
    (CheckpointPolicy.MUST_CPU_OFFLOAD, MUST_SAVE),
    (CheckpointPolicy.PREFER_CPU_OFFLOAD, PREFER_SAVE),
    (True, MUST_SAVE), (False, PREFER_RECOMPUTE), (None, None)])
def test_respect_checkpoint_tags_maps_every_tag(tag, kind):
    vote = policies.respect_checkpoint_tags()(facts(checkpoint_tag=tag))
    assert (vote and vote.kind) == kind
    if "OFFLOAD" in str(tag):
        assert "CPU offload is not modelled" in vote.reason


# ---- megatron_selective's classification, node by node ----------------------------------------

ATTN = dict(module_path="L['self'].h.0.attn", module_types=("GPT2Model", "GPT2Block",
                                                             "GPT2Attention"))
PROJ = dict(module_path="L['self'].h.0.attn.c_attn", module_types=(
    "GPT2Model", "GPT2Block", "GPT2Attention", "Conv1D"))


@pytest.mark.parametrize("kw,kind", [
    (dict(target=aten.bmm.default, compute_intensive=True, **ATTN), MUST_RECOMPUTE),
    (dict(target=aten._softmax.default, **ATTN), MUST_RECOMPUTE),
    (dict(target=aten.addmm.default, compute_intensive=True, **PROJ), MUST_SAVE),
    (dict(target=aten.addmm.default, compute_intensive=True, **ATTN), MUST_SAVE),  # MHA in-proj
    (dict(target=aten.gelu.default, module_path="h.0.mlp", module_types=("MLP",)),
     PREFER_RECOMPUTE),
    (dict(target=aten.bmm.default, compute_intensive=True, module_path="h.0.moe",
          module_types=("MoE",)), MUST_SAVE),
    (dict(target=aten._scaled_dot_product_flash_attention_for_cpu.default,
          compute_intensive=True, is_tensor=False, **ATTN), None),
    (dict(target=aten.transpose.int, is_view=True, **ATTN), None),
    (dict(target=aten.native_dropout.default, is_random=True, **ATTN), None),
    (dict(target=aten.bmm.default, compute_intensive=True), MUST_RECOMPUTE),  # no modules
])
def test_megatron_selective_votes(kw, kind):
    vote = policies.megatron_selective()(facts(**kw))
    assert (vote and vote.kind) == kind
    assert policies.megatron_selective(recompute_cheap=False)(
        facts(target=aten.gelu.default, module_types=("MLP",), module_path="mlp")) is None


def test_save_modules_matches_ancestors_and_paths_without_the_dynamo_root():
    inner = facts(module_path="L['self'].transformer.h.0.mlp.c_fc")
    for glob in ("*.mlp", "*.mlp.*", "transformer.h.0.*", "transformer.h.0.mlp.c_fc"):
        vote = policies.save_modules(glob)(inner)
        assert vote.kind is MUST_SAVE, glob
    assert policies.save_modules("*.attn*")(inner) is None
    assert policies.save_modules("*.mlp", prefer=True)(inner).kind is PREFER_SAVE
    assert policies.save_modules("*")(facts(module_path="", name="x")) is None


@pytest.mark.inductor
def test_policies_under_inductor_pickle_and_plan():
    """Inductor keys its caches on the partitioner (config and policy included) and pickles it."""
    import pickle

    model, x = Net(blocks=2), _net_x()
    ref_loss, ref_grads = _eager_grads(model, x)
    policy = policies.first_of(policies.uniform(1), policies.save_modules("*.mlp.fc"))
    assert pickle.loads(pickle.dumps(policy)) == policy
    backend = ckptfx.CkptBackend(policy=policy, strict=True)  # inner="inductor"
    m = copy.deepcopy(model)
    loss = torch.compile(m, backend=backend)(x).float().pow(2).mean()
    loss.backward()
    (report,) = backend.reports
    assert report.solver == "uniform" and "k=1" in report.notes[0]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for p, r in zip(m.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6)


def test_megatron_selective_composes_with_a_memory_budget():
    """The budget solver plans what the votes leave open; MUST_RECOMPUTE covers the views of
    the attention core too (a saved ``view`` of QK^T would keep the scores by another name)."""
    from ckptfx.pipeline import plan

    from ckptfx.capture import dynamo_joints

    joint = dynamo_joints(Net(blocks=2), _net_x())[0]
    core = {"bmm", "view_5", "div", "masked_fill", "_softmax", "bmm_1"}  # block 0
    for budget in (1.0, 0.5, 0.3):
        planned = plan(joint, ckptfx.RematConfig(policy="megatron_selective", memory_budget=budget))
        assert planned.plan.solver == "budget" and planned.plan.feasible
        assert planned.plan.saved_bytes <= planned.plan.budget_bytes
        assert not core & set(planned.plan.saved)
        assert {"bmm", "_softmax", "bmm_1"} <= set(planned.plan.recomputed)
    assert planned.votes["_softmax"].kind is MUST_RECOMPUTE
    assert planned.problem.by_name()["view_5"].force is Force.RECOMPUTE  # alias of bmm
