"""transformers models from their configs, with random weights (nothing is downloaded).

``build_hf("llama", Sizes(layers=8))`` builds ``AutoConfig.for_model("llama")`` at small
sizes (the defaults below, or the sizes given), the model with a language-model head
(causal, masked or seq2seq, whichever the type has), and example inputs
``{"input_ids": ids, "labels": ids}`` so the output carries the loss. Every type is built
with ``use_cache=False``: a training step has no use for the key/value cache, and a cache
returned from the forward would keep every layer's keys and values alive through the step.
"""

from __future__ import annotations

from typing import Any

from ckptfx.target import Sizes, TargetError

DEFAULTS = {"layers": 2, "width": 256, "seq": 128, "batch": 4, "vocab": 4096}
_HEAD_WIDTH = 64  # channels per attention head


def hf_config(model_type: str, sizes: Sizes):
    """The transformers config of ``model_type`` at the given sizes.

    Raises:
        TargetError: transformers is not installed, or the type is unknown.
    """
    try:
        import transformers
    except ImportError:
        raise TargetError("--hf needs transformers: pip install transformers") from None
    try:
        cfg = transformers.AutoConfig.for_model(model_type)
    except ValueError:
        raise TargetError(f"--hf {model_type!r} is not a transformers model type; use one such "
                          f"as gpt2, llama, qwen2, mistral, bert, t5") from None
    width = sizes.get("width", DEFAULTS["width"])
    heads = max(1, width // _HEAD_WIDTH)
    if width % heads:
        raise TargetError(f"--width {width} is not a multiple of the head count {heads}; "
                          f"use a multiple of {_HEAD_WIDTH}")
    values = {
        "num_hidden_layers": sizes.get("layers", DEFAULTS["layers"]),
        "num_layers": sizes.get("layers", DEFAULTS["layers"]),
        "num_decoder_layers": sizes.get("layers", DEFAULTS["layers"]),
        "hidden_size": width, "d_model": width,
        "num_attention_heads": heads, "num_key_value_heads": heads, "num_heads": heads,
        "head_dim": width // heads, "d_kv": width // heads,
        "intermediate_size": 4 * width, "n_inner": 4 * width, "d_ff": 4 * width,
        "vocab_size": sizes.get("vocab", DEFAULTS["vocab"]),
        "max_position_embeddings": max(sizes.get("seq", DEFAULTS["seq"]), 64),
    }
    for key, value in values.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop",
                "embd_pdrop", "attn_pdrop", "dropout_rate", "attention_dropout"):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    cfg.use_cache = False  # KV caches returned from forward would inflate the step's memory
    for sub in ("text_config", "decoder"):  # composite configs carry their own flag
        if hasattr(getattr(cfg, sub, None), "use_cache"):
            getattr(cfg, sub).use_cache = False
    cfg.pad_token_id = getattr(cfg, "pad_token_id", None)
    if getattr(cfg, "is_encoder_decoder", False) and \
            getattr(cfg, "decoder_start_token_id", None) is None:
        cfg.decoder_start_token_id = 0  # shifts the labels into decoder inputs
    return cfg


def build_hf(model_type: str, sizes: Sizes) -> tuple[Any, Any]:
    """(model, example inputs) of a transformers model type with random weights.

    Raises:
        TargetError: unknown type, or a type without a language-model head or plain model
            transformers can build from its config.
    """
    import torch
    import transformers

    cfg = hf_config(model_type, sizes)
    torch.manual_seed(0)
    model = None
    for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM"):
        try:
            model = getattr(transformers, auto).from_config(cfg)
            break
        except (ValueError, KeyError):
            continue
    if model is None:
        raise TargetError(f"--hf {model_type!r}: transformers has no language-model head for "
                          f"this type; write a package.module:factory target instead")
    model.train()
    vocab = sizes.get("vocab", DEFAULTS["vocab"])
    ids = torch.randint(0, vocab, (sizes.get("batch", DEFAULTS["batch"]),
                                   sizes.get("seq", DEFAULTS["seq"])))
    return model, {"input_ids": ids, "labels": ids}
