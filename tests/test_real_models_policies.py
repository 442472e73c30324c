"""Policies on transformers models (random weights, nothing downloaded): uniform's saved-bytes
formula on GPT-2, megatron_selective on GPT-2 / LLaMA / BERT with eager attention and SDPA, and
a model checkpointed per block (transformers' gradient_checkpointing_enable) compiled."""

from __future__ import annotations


import pytest
import torch

import ckptfx
from ckptfx.testing import train
from ckptfx.pipeline import plan

from ckptfx.capture import dynamo_joints

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

LAYERS, HIDDEN, BATCH, SEQ, VOCAB = 6, 384, 2, 64, 8192
B = BATCH * SEQ * HIDDEN * 4  # one residual-stream tensor, fp32 (bytes)


def gpt2(attn="eager", layers=LAYERS, hidden=HIDDEN, heads=6):
    cfg = transformers.GPT2Config(
        n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        use_cache=False)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).float().train()


def llama(attn):
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=SEQ, use_cache=False)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float().train()


def bert(attn):
    cfg = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=512, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg).float().train()


def _ids(vocab=VOCAB):
    torch.manual_seed(1)
    return torch.randint(0, vocab, (BATCH, SEQ))


def train_step(model, backend, ids, checkpointed=False):
    """(loss, grads, saved bytes, reports) of one step on a deep copy."""
    def checkpointing(m):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    torch._dynamo.reset()
    (step,) = train(model, backend, {"input_ids": ids, "labels": ids}, meter_saved=True,
                    prepare=checkpointing if checkpointed else None)
    reports = getattr(backend, "reports", [])
    assert not any(r.fallback for r in reports), [r.fallback for r in reports]
    return step.loss, step.grads, step.saved_bytes, reports


def max_rel_err(grads, ref):
    return max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
               for g, r in zip(grads, ref))


def _gpt2_joint(attn):
    return dynamo_joints(gpt2(attn), _ids(), loss=lambda o: o.logits.float().pow(2).mean())[0]


@pytest.fixture(scope="module")
def gpt2_joint():
    return _gpt2_joint("eager")


def _in_block_bytes(planned):
    blocks = {n for layer in planned.problem.layers for n in layer}
    return sum(planned.plan.decisions[s].nbytes for s in planned.plan.saved if s in blocks)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_uniform_saved_bytes_follow_the_formula(gpt2_joint, attn):
    """saved = floor(n / k) * b + c: the checkpoints inside the blocks, c outside (constant).
    With SDPA, block 0 also builds the attention mask every block reads: recomputed, not a
    checkpoint (Note [Uniform boundaries])."""
    if attn == "sdpa":
        gpt2_joint = _gpt2_joint("sdpa")
    assert len(plan(gpt2_joint, ckptfx.RematConfig(policy="uniform")).problem.layers) == LAYERS
    outside = set()
    for k in (1, 2, 3, 4, 6, None):
        planned = plan(gpt2_joint, ckptfx.RematConfig(policy="uniform", layers_per_checkpoint=k))
        k_eff = k or 2  # round(sqrt(6))
        assert _in_block_bytes(planned) == (LAYERS // k_eff) * B, k
        outside.add(planned.plan.saved_bytes - _in_block_bytes(planned))
        assert planned.plan.saved_bytes < plan(gpt2_joint).plan.saved_bytes
    assert len(outside) == 1  # c does not depend on k


def test_gpt2_uniform_measured_bytes_and_bitwise_gradients():
    model, ids = gpt2(layers=4, hidden=128, heads=4), _ids()
    loss_ref, grads_ref, _, _ = train_step(model, None, ids)
    backend = ckptfx.CkptBackend(inner="eager", policy="uniform")
    loss, grads, saved, reports = train_step(model, backend, ids)
    assert torch.equal(loss, loss_ref) and max_rel_err(grads, grads_ref) == 0.0
    planned = sum(r.saved_bytes for r in reports)
    assert abs(planned - saved) <= 0.02 * saved
    assert reports[0].solver == "uniform" and "k=2" in reports[0].notes[0]


def test_gpt2_megatron_selective_saves_less_than_the_min_cut_with_eager_attention(gpt2_joint):
    default = plan(gpt2_joint).plan
    megatron = plan(gpt2_joint, ckptfx.RematConfig(policy="megatron_selective"))
    assert megatron.plan.saved_bytes < default.saved_bytes
    table = megatron.table
    assert {"bmm.default", "_softmax.default"} <= {table[r].op_name for r in megatron.plan.recomputed}
    # fewer extra FLOPs than uniform k=1 (one block forward each, like checkpoint per block)
    per_block = plan(gpt2_joint, ckptfx.RematConfig(policy="uniform", layers_per_checkpoint=1))
    assert (sum(table[r].flops for r in megatron.plan.recomputed)
            < sum(table[r].flops for r in per_block.plan.recomputed))


@pytest.mark.parametrize("make,attn", [(gpt2, "eager"), (gpt2, "sdpa"), (llama, "eager"),
                                       (llama, "sdpa"), (bert, "eager"), (bert, "sdpa")])
def test_megatron_selective_on_transformers_models(make, attn):
    small = dict(layers=2, hidden=64, heads=4) if make is gpt2 else {}
    model = make(attn, **small)
    ids = _ids(model.config.vocab_size)
    loss_ref, grads_ref, saved_ref, _ = train_step(model, None, ids)
    backend = ckptfx.CkptBackend(inner="eager", policy="megatron_selective", strict=True)
    loss, grads, saved, reports = train_step(model, backend, ids)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert max_rel_err(grads, grads_ref) <= 1e-5
    recomputed = {r.op for r in reports[0].recomputed}
    if attn == "eager":  # the attention core is recomputed: no seq x seq activation is kept
        assert {"bmm.default", "_softmax.default"} <= recomputed
        assert not any(s.op in ("_softmax.default", "bmm.default") for s in reports[0].saved)
    else:
        assert not any("scaled_dot_product" in op for op in recomputed)
    assert saved < saved_ref


def test_gpt2_checkpointed_per_block_compiles_like_eager_checkpointing():
    model, ids = gpt2(layers=4, hidden=128, heads=4), _ids()
    loss_ref, grads_ref, _, _ = train_step(model, None, ids)
    _, grads_ck, saved_eager_ck, _ = train_step(model, None, ids, checkpointed=True)
    backend = ckptfx.CkptBackend(inner="eager")
    loss, grads, saved, reports = train_step(model, backend, ids, checkpointed=True)
    assert torch.equal(loss, loss_ref) and max_rel_err(grads, grads_ref) == 0.0
    # the tags are honoured: no more than eager per-block checkpointing keeps
    assert saved <= saved_eager_ck
    reasons = [r.reason for rep in reports for r in rep.recomputed]
    assert any(r.endswith("(preferred: torch.utils.checkpoint tag PREFER_RECOMPUTE)")
               for r in reasons)
