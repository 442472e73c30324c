"""The models and the contenders of ``bench/compare.py`` (bench only).

Models are built from configs with random weights (nothing is downloaded), dropout off so
that every contender computes the same gradients: ``gpt`` (the built-in GPT of
``ckptfx.demo``), and transformers' ``gpt2``, ``llama`` and ``bert`` (masked LM).

Every contender trains the same training configuration (as :mod:`ckptfx.hf` builds it):
``use_cache=False``, which transformers itself sets under gradient checkpointing (with the
cache on, a compiled forward returns every layer's keys and values, and the backward
receives a zero tangent for each of them, alive until that layer's gradient); and GPT-2's
loss named (``"ForCausalLM"``, the one transformers falls back to), since the one-time
warning it logs otherwise breaks the compiled graph between the logits and the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

MODELS = ("gpt", "gpt2", "llama", "bert")


@dataclasses.dataclass(frozen=True)
class Contender:
    """One way to train: a key (for the command line), a label (for the table)."""

    key: str
    label: str


CONTENDERS = (
    Contender("eager", "eager"),
    Contender("block_ckpt", "eager + per-block checkpointing"),
    Contender("compile", "torch.compile"),
    Contender("torch_0.5", "torch.compile, activation_memory_budget=0.5"),
    Contender("torch_0.1", "torch.compile, activation_memory_budget=0.1"),
    Contender("ckpt", 'backend="ckpt"'),
    Contender("ckpt_peak_0.5", 'ckpt, memory_budget=0.5 (peak)'),
    Contender("ckpt_peak_0.0", 'ckpt, memory_budget=0.0 (peak)'),
    Contender("ckpt_uniform", 'ckpt, policy="uniform"'),
    Contender("ckpt_megatron", 'ckpt, policy="megatron_selective"'),
)
BY_KEY = {c.key: c for c in CONTENDERS}
CKPT_OPTIONS = {
    "ckpt": {},
    "ckpt_peak_0.5": {"memory_budget": 0.5, "budget_kind": "peak"},
    "ckpt_peak_0.0": {"memory_budget": 0.0, "budget_kind": "peak"},
    "ckpt_uniform": {"policy": "uniform"},
    "ckpt_megatron": {"policy": "megatron_selective"},
}
TORCH_BUDGETS = {"compile": 1.0, "torch_0.5": 0.5, "torch_0.1": 0.1}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model sizes: layers, hidden width, heads, sequence length (tokens), vocabulary."""

    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int


class _CheckpointedBlock(nn.Module):
    """Runs a block under ``torch.utils.checkpoint`` (non-reentrant), as transformers does."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def _hf_model(name: str, s: Shape) -> nn.Module:
    import transformers

    common = dict(vocab_size=s.vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                  use_cache=False)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=s.layers, n_embd=s.hidden, n_head=s.heads,
                                      n_positions=s.seq, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, **common)
        model = transformers.GPT2LMHeadModel(cfg)
        model.loss_type = "ForCausalLM"  # the loss transformers falls back to, named
        return model
    if name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=s.hidden, intermediate_size=s.hidden * 11 // 4,
                                       num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                       num_key_value_heads=s.heads, max_position_embeddings=s.seq,
                                       **common)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.BertConfig(hidden_size=s.hidden, intermediate_size=4 * s.hidden,
                                  num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                  max_position_embeddings=s.seq, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **common)
    return transformers.BertForMaskedLM(cfg)


def build(name: str, s: Shape) -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """The model (random weights, seed 0, fp32) and ``loss_of(fn, ids)``.

    Raises:
        SystemExit: an unknown model name (lists the known ones).
    """
    torch.manual_seed(0)
    if name == "gpt":
        from ckptfx.demo import GPTConfig, TinyGPT

        model = TinyGPT(GPTConfig(vocab=s.vocab, seq=s.seq, layers=s.layers, heads=s.heads,
                                  width=s.hidden))
        return model, lambda fn, ids: fn(ids)
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model = _hf_model(name, s).float()
    return model, lambda fn, ids: fn(input_ids=ids, labels=ids).loss


def prepare(model: nn.Module, key: str) -> tuple[Callable, list]:
    """Applies contender ``key`` to ``model``: (the callable to train, ckptfx's report list).

    Raises:
        SystemExit: an unknown contender key (lists the known ones).
    """
    if key not in BY_KEY:
        raise SystemExit(f"unknown contender {key!r}; choose from {', '.join(BY_KEY)}")
    model.train()
    if key == "eager":
        return model, []
    if key == "block_ckpt":
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.blocks = nn.ModuleList(_CheckpointedBlock(b) for b in model.blocks)
        return model, []
    if key in TORCH_BUDGETS:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = TORCH_BUDGETS[key]
        return torch.compile(model, backend="inductor"), []
    import ckptfx

    backend = ckptfx.CkptBackend(**CKPT_OPTIONS[key])
    return torch.compile(model, backend=backend), backend.reports
