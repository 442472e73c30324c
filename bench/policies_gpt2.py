"""Policies on transformers' GPT-2: saved bytes, extra FLOPs and gradient parity.

Not a test: prints one table. Rows: eager (reference), eager with ``torch.utils.checkpoint``
per block (transformers' ``gradient_checkpointing_enable``), and ``backend="ckpt"``
(``inner="eager"``) with no policy (the default min-cut), ``uniform`` at several k,
``megatron_selective``, and the per-block-checkpointed model compiled (the tags honoured).

Columns:
    saved MiB      bytes autograd keeps for the backward (saved_tensors_hooks, unique storages,
                   parameters excluded), one training step.
    planned MiB    what ckptfx's plans say they save (sum over compiled graphs).
    formula MiB    uniform rows: floor(n/k) * b + c (Note [Uniform saved bytes]), b the bytes
                   of one residual-stream tensor, c what the plan saves outside the blocks.
    extra GFLOP    FLOPs added by recomputation: for ckptfx rows the FLOPs of the recomputed
                   ops (sum of RematReport.extra_flops, counted with torch.utils.flop_counter's
                   formulas); for eager checkpointing, the FLOPs of one forward+backward
                   (FlopCounterMode) minus eager's.
    grads          against eager without checkpointing: "bitwise" or the max relative error.

Run:
    python bench/policies_gpt2.py                       # the issue's sizes (a few minutes)
    python bench/policies_gpt2.py --layers 2 --seq 64   # quick
"""

from __future__ import annotations

import argparse
import copy
import re

import torch
from torch.utils.flop_counter import FlopCounterMode

import ckptfx
from ckptfx.testing import saved_tensor_bytes

MIB = 2 ** 20


def gpt2(args):
    import transformers

    cfg = transformers.GPT2Config(
        n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=args.vocab,
        n_positions=args.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, use_cache=False)
    cfg._attn_implementation = args.attn
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).float().train()


def step(model, fn, ids):
    """One forward+backward: (saved bytes, grads)."""
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    loss, saved = saved_tensor_bytes(lambda: fn(input_ids=ids, labels=ids).loss, exclude=params)
    loss.backward()
    return saved, [p.grad.clone() for p in params]


def eager_flops(model, ids):
    """FLOPs of one eager forward+backward (FlopCounterMode; Dynamo does not run under it)."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


def compare(grads, ref):
    if all(torch.equal(g, r) for g, r in zip(grads, ref)):
        return "bitwise"
    err = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(grads, ref))
    return f"max rel err {err:.1e}"


def run_variant(base, ids, policy=None, k=None, checkpointed=False):
    """A compiled variant: (saved, grads, reports)."""
    model = copy.deepcopy(base)
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backend = ckptfx.CkptBackend(inner="eager", policy=policy, layers_per_checkpoint=k)
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend)
    saved, grads = step(model, fn, ids)
    fallbacks = [r.fallback for r in backend.reports if r.fallback]
    if fallbacks or not backend.reports:
        raise RuntimeError(f"ckptfx did not plan every graph: {fallbacks or 'nothing compiled'}")
    return saved, grads, backend.reports


_BLOCK = re.compile(r"\.h\.\d+(\.|$)")


def formula(reports, n, k, b):
    """floor(n/k) * b + c, with c the planned bytes outside the blocks."""
    c = sum(s.nbytes for r in reports for s in r.saved if not _BLOCK.search(s.module))
    return (n // k) * b + c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    args = p.parse_args(argv)
    base = gpt2(args)
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    n, b = args.layers, args.batch * args.seq * args.hidden * 4
    sqrt_k = max(1, round(n ** 0.5))

    model = copy.deepcopy(base)
    ref_saved, ref_grads = step(model, model, ids)
    ref_flops = eager_flops(model, ids)
    rows = [("eager", ref_saved, None, None, 0, None, "reference")]
    model = copy.deepcopy(base)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    saved, grads = step(model, model, ids)
    rows.append(("eager + torch.utils.checkpoint/block", saved, None, None,
                 eager_flops(model, ids) - ref_flops, None, compare(grads, ref_grads)))

    variants = [("ckpt: no policy (min-cut)", {}),
                *[(f"ckpt: uniform k={k}" + (" (=round(sqrt n))" if k == sqrt_k else ""),
                   {"policy": "uniform", "k": k}) for k in sorted({1, 2, sqrt_k, 3, n}) if k <= n],
                ("ckpt: megatron_selective", {"policy": "megatron_selective"}),
                ("ckpt: checkpoint/block model", {"checkpointed": True})]
    for name, kw in variants:
        saved, grads, reports = run_variant(base, ids, **kw)
        planned = sum(r.saved_bytes for r in reports)
        extra = sum(r.extra_flops for r in reports)
        est = formula(reports, n, kw["k"], b) if kw.get("policy") == "uniform" else None
        rows.append((name, saved, planned, est, extra, None, compare(grads, ref_grads)))

    print(f"GPT-2 ({n} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, "
          f"seq {args.seq}, batch {args.batch}, fp32, dropout 0, {args.attn} attention; "
          f"b = {b / MIB:.2f} MiB per residual-stream tensor)")
    head = (f"{'variant':<40}{'saved MiB':>10}{'planned':>9}{'formula':>9}"
            f"{'extra GFLOP':>12}  grads vs eager")
    print(head)
    print("-" * len(head))
    for name, saved, planned, est, extra, extra_planned, grads in rows:
        fmt = lambda v: f"{v / MIB:>9.1f}" if v is not None else f"{'':>9}"  # noqa: E731
        print(f"{name:<40}{saved / MIB:>10.1f}{fmt(planned)}{fmt(est)}{extra / 1e9:>12.2f}  {grads}")


if __name__ == "__main__":
    main()
