"""Memory, speed and the batch that fits, side by side: ckptfx against what users pick today.

The contenders: eager, transformers' per-block checkpointing, torch.compile with and without
PyTorch's ``activation_memory_budget``, and ``backend="ckpt"`` with its budgets and policies.

Every (model, layers, contender) runs in its own process (fresh Dynamo and Inductor state;
Inductor's caches disabled, so every compile plans), the contenders interleaved within each
repeat; the table gives medians over repeats. Each process trains a few steps on the same
weights and batch (gradients released each step, no optimizer) and measures:

* saved MiB: bytes autograd keeps for the backward (saved-tensor hooks, unique storages,
  parameters excluded);
* peak MiB: the step's peak at the allocator above the memory before it (CPU: the profiler's
  allocator events, see Note [Allocator peak on CPU] in ``bench/_measure.py``; CUDA:
  ``torch.cuda.max_memory_allocated``); for ckptfx the peak its report predicts (the
  liveness simulation of the graphs that ran) follows in parentheses when the step is one
  compiled graph; RSS MiB: peak resident memory, a cross-check (CPU);
* step: median step time over the timed steps, as a ratio to torch.compile's default;
* extra GFLOP: matmul-class FLOPs of the step (profiler) minus eager's; for ckptfx the
  planned figure from its report follows in parentheses;
* compile s: first step's time minus the median step's;
* grad err: max over parameters of max|g - g_eager| / max|g_eager|;
* batch @ limit: the largest batch whose measured peak fits ``--limit-mib`` (doubling from
  ``--batch``, then bisection; the batch dimension is recompiled dynamic by Dynamo after the
  first new size), and the tokens/s of a step at that batch.

Usage:
    python bench/compare.py --quick                       # GPT-2, 6 layers, 1 repeat (17 min on a busy 2-core CPU)
    python bench/compare.py                               # 4 models x 6 and 24 layers (hours on 2 cores)
    python bench/compare.py --models llama --layers 6 --contenders eager,compile,ckpt
    python bench/compare.py --md t.md --json t.json --png t.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _models import BY_KEY, CONTENDERS, MODELS, Shape, build, prepare  # noqa: E402

MIB = 2 ** 20
QUICK_CONTENDERS = ("eager", "block_ckpt", "compile", "torch_0.1", "ckpt_peak_0.0")
QUICK_FIT = ("eager", "block_ckpt", "torch_0.1", "ckpt_peak_0.0")


def _timed(step, device: str) -> float:
    from _measure import synchronize

    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def run_child(spec: dict) -> dict:
    """Trains one contender in this process and returns its figures (see the module doc)."""
    import torch

    from _measure import max_rel_err, measure_step, rss_peak
    from ckptfx.measure import saved_tensor_bytes

    device, shape = spec["device"], Shape(**spec["shape"])
    with torch.device(device):  # weights made where they train
        model, loss_of = build(spec["model"], shape)
    fn, reports = prepare(model, spec["contender"])
    params = list(model.parameters())

    def ids_of(batch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        return torch.randint(0, shape.vocab, (batch, shape.seq), generator=gen).to(device)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(device, dtype=torch.bfloat16) if spec["dtype"] == "bf16"
               else contextlib.nullcontext())
        with ctx:
            return loss_of(fn, ids)

    def step(ids: torch.Tensor) -> None:
        for p in params:
            p.grad = None
        loss, _ = saved_tensor_bytes(lambda: forward(ids), exclude=params)
        loss.backward()

    ids = ids_of(spec["batch"])
    first = _timed(lambda: step(ids), device)
    times = [_timed(lambda: step(ids), device) for _ in range(spec["steps"])]
    m = measure_step(lambda: forward(ids), params, device)
    rss = rss_peak(lambda: step(ids)) if device == "cpu" else None
    grads = [p.grad.detach().float().cpu() for p in params]
    out = {"saved_bytes": m.saved_bytes, "peak_bytes": m.peak_bytes, "rss_bytes": rss,
           "flops": m.flops, "step_s": statistics.median(times),
           "compile_s": max(0.0, first - statistics.median(times)), "max_rel_err": None,
           "planned_extra_flops": sum(r.extra_flops for r in reports) if reports else None,
           "predicted_peak_bytes": reports[0].predicted_peak_bytes if len(reports) == 1 else None,
           "fallbacks": [r.fallback for r in reports if r.fallback]}
    if spec.get("ref_save"):
        torch.save(grads, spec["ref_save"])
    elif spec.get("ref_load") and os.path.exists(spec["ref_load"]):
        out["max_rel_err"] = max_rel_err(grads, torch.load(spec["ref_load"]))
    if spec.get("limit_mib"):
        out.update(_fit(spec, step, forward, ids_of, params, m.peak_bytes))
    return out


def _fit(spec: dict, step, forward, ids_of, params, peak_at_batch: int) -> dict:
    """The largest batch within ``spec["limit_mib"]`` and the tokens/s of a step at it."""
    import torch
    from torch._dynamo.utils import counters

    from _measure import largest_fitting, measure_step

    device, known = spec["device"], {spec["batch"]: peak_at_batch}

    def peak_of(batch: int) -> int | None:
        if batch in known:
            return known[batch]
        ids = ids_of(batch)
        try:
            # a new size recompiles once (Dynamo then makes the batch dimension dynamic):
            # measure again when the measured step compiled
            for _ in range(2):
                graphs = counters["stats"]["unique_graphs"]
                peak = measure_step(lambda: forward(ids), params, device).peak_bytes
                if counters["stats"]["unique_graphs"] == graphs:
                    break
            print(f"batch {batch}: peak {peak / MIB:.1f} MiB", file=sys.stderr, flush=True)
            return peak
        except torch.OutOfMemoryError:
            for p in params:
                p.grad = None
            torch.cuda.empty_cache()
            return None

    fit, probes = largest_fitting(peak_of, int(spec["limit_mib"] * MIB), spec["batch"],
                                  spec["max_batch"])
    tokens_s = None
    if fit:
        ids = ids_of(fit)
        t = statistics.median(_timed(lambda: step(ids), device) for _ in range(2))
        tokens_s = fit * ids.shape[1] / t
    return {"fit_batch": fit, "fit_tokens_s": tokens_s,
            "fit_probes_mib": {str(b): None if v is None else v / MIB for b, v in probes.items()}}


def spawn(spec: dict, timeout_s: float) -> dict:
    """Runs :func:`run_child` in a fresh process; {"error": ...} when it fails."""
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln[len("RESULT "):] for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        tail = [ln for ln in res.stderr.strip().splitlines() if ln.strip()][-1:] or ["failed"]
        return {"error": tail[0][-300:]}
    return json.loads(lines[-1])


def aggregate(spec: dict, runs: list[dict]) -> dict:
    """One row from a configuration's repeats: medians of times, the first run's bytes."""
    ok = [r for r in runs if "error" not in r]
    row = {k: spec[k] for k in ("model", "contender", "device", "dtype", "batch")}
    row.update(layers=spec["shape"]["layers"], seq=spec["shape"]["seq"],
               label=BY_KEY[spec["contender"]].label, repeats=len(ok),
               limit_mib=spec.get("limit_mib"))
    if not ok:
        row["error"] = runs[0]["error"] if runs else "not run"
        return row
    row.update({k: v for k, v in ok[0].items() if k not in ("step_s", "compile_s")})
    for k in ("step_s", "compile_s"):
        row[k] = statistics.median(r[k] for r in ok)
    return row


def add_ratios(rows: list[dict]) -> None:
    """Step time / torch.compile's and FLOPs - eager's, within each (model, layers)."""
    for row in rows:
        same = [r for r in rows if (r["model"], r["layers"]) == (row["model"], row["layers"])
                and "error" not in r]
        base = next((r for r in same if r["contender"] == "compile"), None)
        eager = next((r for r in same if r["contender"] == "eager"), None)
        if "error" in row:
            continue
        row["step_ratio"] = row["step_s"] / base["step_s"] if base else None
        row["extra_flops"] = row["flops"] - eager["flops"] if eager else None


def specs_of(args) -> list[dict]:
    """The configurations to run, eager first in each (model, layers) group."""
    keys = sorted(args.contenders, key=lambda k: k != "eager")
    out = []
    for model in args.models:
        for layers in args.layers:
            shape = {"layers": layers, "hidden": args.hidden, "heads": args.heads,
                     "seq": args.seq, "vocab": args.vocab}
            for key in keys:
                out.append({"model": model, "contender": key, "shape": shape,
                            "device": args.device, "dtype": args.dtype, "batch": args.batch,
                            "steps": args.steps, "max_batch": args.max_batch,
                            "limit_mib": args.limit_mib if key in args.fit else None})
    return out


def run_all(args) -> list[dict]:
    """Runs every configuration ``args.repeats`` times, interleaved; returns the rows."""
    specs, runs, deadline = specs_of(args), {}, time.time() + args.budget_s
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for i, spec in enumerate(specs):
                if time.time() > deadline:
                    runs.setdefault(i, []).append({"error": f"not run: --budget-s {args.budget_s:g} spent"})
                    continue
                ref = os.path.join(tmp, f"ref-{spec['model']}-{spec['shape']['layers']}.pt")
                one = dict(spec, ref_save=ref if spec["contender"] == "eager" and rep == 0 else None,
                           ref_load=ref, limit_mib=spec["limit_mib"] if rep == 0 else None)
                res = spawn(one, min(args.timeout, max(1.0, deadline - time.time())))
                runs.setdefault(i, []).append(res)
                print(f"[{rep + 1}/{args.repeats}] {spec['model']}-{spec['shape']['layers']} "
                      f"{spec['contender']}: {res.get('error') or 'ok'}", file=sys.stderr, flush=True)
    rows = [aggregate(spec, runs.get(i, [])) for i, spec in enumerate(specs)]
    add_ratios(rows)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"GPT-2 at 6 layers, 1 repeat, 2 timed steps, contenders {','.join(QUICK_CONTENDERS)}, "
                        f"batch fit for {','.join(QUICK_FIT)} (17 min on a busy 2-core CPU)")
    p.add_argument("--models", default=None, help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--layers", default=None, help="comma-separated layer counts (default 6,24)")
    p.add_argument("--contenders", default=None,
                   help=f"comma-separated, from {','.join(c.key for c in CONTENDERS)}")
    p.add_argument("--fit", default=None,
                   help="contenders whose batch that fits is searched ('none': skip; default all)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default 3; --quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="processes per configuration (default 3)")
    p.add_argument("--limit-mib", type=float, default=128.0, help="memory limit of the batch search, MiB")
    p.add_argument("--max-batch", type=int, default=256, help="the batch search stops doubling here")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: bf16 autocast over fp32 weights")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="wall-clock seconds for the whole run; what is left is reported as not run")
    p.add_argument("--md", default=None, help="also write the Markdown table here")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--png", default=None, help="also plot peak memory vs step time here (matplotlib)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    split = lambda v: [x for x in v.split(",") if x]  # noqa: E731
    args.models = split(args.models or ("gpt2" if args.quick else ",".join(MODELS)))
    args.layers = [int(x) for x in split(args.layers or ("6" if args.quick else "6,24"))]
    args.contenders = split(args.contenders or ",".join(
        QUICK_CONTENDERS if args.quick else (c.key for c in CONTENDERS)))
    fit = args.fit or (",".join(QUICK_FIT) if args.quick else ",".join(args.contenders))
    args.fit = [] if fit == "none" else split(fit)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.steps = args.steps or (2 if args.quick else 3)
    for name in args.models:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for key in args.contenders + args.fit:
        if key not in BY_KEY:
            p.error(f"unknown contender {key!r}; choose from {', '.join(BY_KEY)}")
    return args


def check_device(device: str) -> None:
    """Raises SystemExit with one line when ``device`` is not usable here."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"compare.py: --device cuda, but torch {torch.__version__} sees no CUDA GPU "
                         f"here; run on a machine with an NVIDIA GPU (bench/gpu.sh) or use --device cpu")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    check_device(args.device)
    from _output import machine, markdown, plot

    start = time.time()
    rows = run_all(args)
    meta = {"machine": machine(args.device), "command": "python bench/compare.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "wall_s": time.time() - start,
            "limit_mib": args.limit_mib, "dtype": args.dtype}
    table = markdown(rows, meta)
    print(table)
    if args.md:
        pathlib.Path(args.md).write_text(table + "\n")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
