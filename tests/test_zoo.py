"""Model zoo: small configs with random weights (nothing downloaded), trained 2 SGD steps
under ``backend="ckpt"`` (inner eager) at budgets 1.0, 0.5 and the smallest feasible (0.0),
with and without dropout: losses, gradients and buffers equal eager's bit for bit.

Models: GPT-2, LLaMA, BERT, T5, ViT, Mixtral (mixture of experts with sliding-window
attention) from transformers, and a BatchNorm CNN in plain torch. Every model is 2 layers,
hidden size 32, sequences of 16 tokens (images 16x16), so the tier runs in CI in minutes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ckptfx

from ckptfx.testing import assert_same_run, train

V, S, B = 128, 16, 2


def _transformers():
    return pytest.importorskip("transformers")


def gpt2(p):
    t = _transformers()
    return t.GPT2LMHeadModel(t.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32, resid_pdrop=p,
        embd_pdrop=p, attn_pdrop=p, bos_token_id=0, eos_token_id=0))


def llama(p):
    t = _transformers()
    return t.LlamaForCausalLM(t.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, max_position_embeddings=32, attention_dropout=p))


def bert(p):
    t = _transformers()
    return t.BertForMaskedLM(t.BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        vocab_size=V, max_position_embeddings=32, hidden_dropout_prob=p,
        attention_probs_dropout_prob=p))


def t5(p):
    t = _transformers()
    return t.T5ForConditionalGeneration(t.T5Config(
        num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, d_kv=16, num_heads=2,
        vocab_size=V, dropout_rate=p, decoder_start_token_id=0))


def vit(p):
    t = _transformers()
    return t.ViTForImageClassification(t.ViTConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        image_size=16, patch_size=4, num_labels=5, hidden_dropout_prob=p,
        attention_probs_dropout_prob=p))


def mixtral(p):
    """Mixture of experts (4 experts, top-2 routing) with sliding-window attention."""
    t = _transformers()
    return t.MixtralForCausalLM(t.MixtralConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, max_position_embeddings=32, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, attention_dropout=p))


class SmallCNN(nn.Module):
    """A vision CNN in plain torch: conv, BatchNorm, ReLU, pooling, Dropout2d, linear head."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout2d(p),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 5)

    def forward(self, pixel_values, labels):
        return nn.functional.cross_entropy(self.head(self.features(pixel_values)), labels)


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert, "t5": t5, "vit": vit,
          "mixtral": mixtral, "cnn": SmallCNN}
BUDGETS = (1.0, 0.5, 0.0)


def _batch(name):
    g = torch.Generator().manual_seed(1)
    if name in ("vit", "cnn"):
        return {"pixel_values": torch.randn(B, 3, 16, 16, generator=g),
                "labels": torch.randint(0, 5, (B,), generator=g)}
    ids = torch.randint(0, V, (B, S), generator=g)
    return {"input_ids": ids, "labels": ids}


def _unique_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_trains_like_eager_at_every_budget(name, dropout):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = MODELS[name](dropout)
    batch = _batch(name)
    ref = train(model, None, batch, steps=2, seed=7)
    peaks = []
    for budget in BUDGETS:
        torch._dynamo.reset()
        counters.clear()
        backend = ckptfx.CkptBackend(inner="eager", memory_budget=budget)
        got = train(model, backend, batch, steps=2, seed=7)
        assert_same_run(got, ref)
        reports = backend.reports
        assert reports and not [r.fallback for r in reports if r.fallback], budget
        assert len(reports) == _unique_graphs()  # one plan per Dynamo graph, no recompiles
        for report in reports:
            assert not [r.op for r in report.recomputed if "dropout" in r.op or "rand" in r.op]
        peaks.append([r.predicted_peak_bytes for r in reports])
    # a peak budget (the default kind): a smaller budget never has a higher simulated peak
    for graph in zip(*peaks):
        assert graph[2] <= graph[1] <= graph[0], dict(zip(BUDGETS, peaks))
