"""Memory budgets side by side: ckptfx's budget solver vs PyTorch's activation_memory_budget
vs transformers' gradient_checkpointing_enable(), on GPT-2 and LLaMA configs.

Variants: eager; transformers' per-block checkpointing (eager); torch.compile's default;
PyTorch's ``activation_memory_budget`` at each fraction; ckptfx's budget solver at each
fraction (``budget_kind="saved"``: saved bytes <= fraction of the no-recompute plan's, 0 =
least achievable); ckptfx with ``budget_kind="peak"`` and budget 0 (the least simulated peak).

Every variant runs in its own process (fresh allocator, fresh compile caches) and reports:
bytes saved for backward (saved_tensors_hooks, unique storages, parameters excluded), the
peak resident memory of one training step above the memory before it, the median step time,
and the max relative gradient error against eager. Ratios are relative to torch.compile's
default (Inductor, no budget) in the same run.

Usage:
    python bench/budget.py                      # both models, every variant (~30 min on 2 cores)
    python bench/budget.py --models gpt2 --budgets 0.5
    python bench/budget.py --one gpt2 ckpt 0.5  # one variant, prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MIB = 2 ** 20


def build(model_name: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if model_name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=6, n_embd=384, n_head=6, vocab_size=8192,
                                      n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif model_name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=384, intermediate_size=1024,
                                       num_hidden_layers=6, num_attention_heads=6,
                                       num_key_value_heads=6, vocab_size=8192,
                                       max_position_embeddings=256, bos_token_id=0,
                                       eos_token_id=0, pad_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise SystemExit(f"unknown model {model_name!r}; choose gpt2 or llama")
    torch.manual_seed(1)
    ids = torch.randint(0, 8192, (8, 256))
    return model.float(), ids


def run_one(model_name: str, variant: str, budget: float | None, steps: int = 3) -> dict:
    """Trains ``steps`` SGD-free steps (same weights each step) and measures the last one."""
    import copy

    import torch

    from ckptfx.measure import peak_rss_delta, release_large_blocks
    from ckptfx.testing import saved_tensor_bytes

    release_large_blocks()
    model, ids = build(model_name)
    ref = copy.deepcopy(model)
    ref(input_ids=ids, labels=ids).loss.backward()
    ref_grads = [p.grad for p in ref.parameters()]
    del ref

    reports = []
    if variant == "eager":
        fn = model
    elif variant == "hf_checkpointing":
        model.gradient_checkpointing_enable()
        model.train()
        fn = model
    elif variant == "torch_budget":
        import torch._functorch.config as fconfig

        fconfig.activation_memory_budget = 1.0 if budget is None else budget
        fn = torch.compile(model, backend="inductor")
    elif variant in ("ckpt", "ckpt_peak"):
        import ckptfx

        options = {} if budget is None else {"memory_budget": budget}
        if variant == "ckpt_peak":
            options["budget_kind"] = "peak"
        backend = ckptfx.CkptBackend(**options)
        reports = backend.reports
        fn = torch.compile(model, backend=backend)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    params = list(model.parameters())
    times, saved, peak = [], 0, 0
    for step in range(steps):
        for p in params:
            p.grad = None

        def one_step():
            loss, nbytes = saved_tensor_bytes(lambda: fn(input_ids=ids, labels=ids).loss,
                                              exclude=params)
            loss.backward()
            return loss, nbytes

        start = time.perf_counter()
        if step == steps - 1:
            (loss, saved), peak = peak_rss_delta(one_step)
        else:
            loss, saved = one_step()
        times.append(time.perf_counter() - start)
    err = max(float((p.grad - r).abs().max() / r.abs().max().clamp_min(1e-30))
              for p, r in zip(params, ref_grads))
    return {
        "model": model_name, "variant": variant, "budget": budget,
        "saved_mib": saved / MIB, "peak_mib": peak / MIB,
        "step_s": statistics.median(times[1:]), "loss": float(loss.detach()), "max_rel_err": err,
        "plan_budget_mib": (sum(r.budget_bytes or 0 for r in reports) / MIB) if reports else None,
        "plan_saved_mib": (sum(r.saved_bytes for r in reports) / MIB) if reports else None,
        "fallbacks": [r.fallback for r in reports if r.fallback],
    }


def variants(budgets: list[float]) -> list[tuple[str, float | None]]:
    out: list[tuple[str, float | None]] = [("eager", None), ("hf_checkpointing", None),
                                           ("torch_budget", None), ("ckpt", None)]
    for b in budgets:
        out += [("torch_budget", b), ("ckpt", b)]
    out += [("ckpt_peak", 0.0)]  # the least simulated peak
    return out


def spawn(model: str, variant: str, budget: float | None) -> dict:
    cmd = [sys.executable, __file__, "--one", model, variant, "none" if budget is None else str(budget)]
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"model": model, "variant": variant, "budget": budget,
                "error": res.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    head = (f"{'model':<6}{'variant':<18}{'budget':>7}{'saved MiB':>10}{'plan budget':>12}"
            f"{'peak MiB':>9}{'peak/dflt':>10}{'step s':>8}{'step/dflt':>10}{'grad err':>10}")
    lines = [head, "-" * len(head)]
    for model in dict.fromkeys(r["model"] for r in rows):
        base = next((r for r in rows if r["model"] == model and r["variant"] == "torch_budget"
                     and r["budget"] is None and "error" not in r), None)
        for r in (r for r in rows if r["model"] == model):
            budget = "-" if r["budget"] is None else f"{r['budget']:g}"
            if "error" in r:
                lines.append(f"{model:<6}{r['variant']:<18}{budget:>7}  error: {r['error']}")
                continue
            pb = f"{r['plan_budget_mib']:.1f}" if r.get("plan_budget_mib") else "-"
            rp = f"{r['peak_mib'] / base['peak_mib']:.2f}" if base and base["peak_mib"] else "-"
            rs = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
            name = "torch.compile" if r["variant"] == "torch_budget" and r["budget"] is None else r["variant"]
            lines.append(f"{model:<6}{name:<18}{budget:>7}{r['saved_mib']:>10.1f}{pb:>12}"
                         f"{r['peak_mib']:>9.1f}{rp:>10}{r['step_s']:>8.3f}{rs:>10}"
                         f"{r['max_rel_err']:>10.1e}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,llama")
    p.add_argument("--budgets", default="0.8,0.5,0.3,0.0")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "VARIANT", "BUDGET"))
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.one:
        model, variant, budget = args.one
        print(json.dumps(run_one(model, variant, None if budget == "none" else float(budget))))
        return
    budgets = [float(b) for b in args.budgets.split(",") if b]
    rows = []
    for model in args.models.split(","):
        for variant, budget in variants(budgets):
            row = spawn(model, variant, budget)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
