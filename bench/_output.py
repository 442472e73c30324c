"""The outputs of ``bench/compare.py``: the Markdown table and the plot (bench only)."""

from __future__ import annotations

import os
import platform

MIB = 2 ** 20
COLUMNS = ("model", "contender", "saved MiB", "peak MiB", "RSS MiB", "step × compile",
           "extra GFLOP", "compile s", "grad err", "batch @ limit", "tokens/s")
# the budget sweeps drawn as curves, from the most memory to the least
CKPT_SWEEP = ("ckpt", "ckpt_peak_0.5", "ckpt_peak_0.0")
TORCH_SWEEP = ("compile", "torch_0.5", "torch_0.1")


def machine(device: str) -> str:
    """The machine in words: the CPU model and core count, or the GPU's name; torch's version."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores (torch {torch.__version__})"


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _cells(r: dict) -> list[str]:
    name = f"{r['model']}-{r['layers']}"
    if "error" in r:
        return [name, r["label"], f"error: {r['error']}"] + [""] * (len(COLUMNS) - 3)
    extra = _fmt(r.get("extra_flops") and r["extra_flops"] / 1e9, ".2f", "0.00")
    if r.get("planned_extra_flops") is not None:
        extra += f" ({r['planned_extra_flops'] / 1e9:.2f})"
    err = "reference" if r["contender"] == "eager" else _fmt(r.get("max_rel_err"), ".1e")
    if r.get("fallbacks"):
        err += f" (fallback: {len(r['fallbacks'])} graph(s))"
    fit = "" if r.get("fit_batch") is None else str(r["fit_batch"])
    peak = f"{r['peak_bytes'] / MIB:.1f}"
    if r.get("predicted_peak_bytes") is not None:
        peak += f" ({r['predicted_peak_bytes'] / MIB:.1f})"
    return [name, r["label"], f"{r['saved_bytes'] / MIB:.1f}", peak,
            _fmt(r.get("rss_bytes") and r["rss_bytes"] / MIB, ".1f"),
            _fmt(r.get("step_ratio"), ".2f"), extra,
            "-" if r["contender"] in ("eager", "block_ckpt") else f"{r['compile_s']:.1f}", err, fit,
            _fmt(r.get("fit_tokens_s"), ".0f", "")]


def markdown(rows: list[dict], meta: dict) -> str:
    """The table, with the machine, the command and the per-step sizes above it."""
    first = next((r for r in rows if "error" not in r), rows[0] if rows else {})
    lines = [f"Machine: {meta['machine']}. Command: `{meta['command']}` "
             f"({meta['wall_s'] / 60:.0f} min).",
             f"Step: batch {first.get('batch')} x {first.get('seq')} tokens, {meta['dtype']}; "
             f"batch @ limit: the largest batch whose peak fits {meta['limit_mib']:g} MiB.",
             "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(" --- " if i < 2 else " ---: " for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Peak memory vs step time, one panel per (model, layers): a point per contender, the
    ckptfx and PyTorch budget sweeps as curves.

    Raises:
        SystemExit: matplotlib is not installed (says how to install it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--png needs matplotlib ({e}); pip install -e '.[plot]'") from e
    ok = [r for r in rows if "error" not in r and r.get("step_ratio") is not None]
    groups = list(dict.fromkeys((r["model"], r["layers"]) for r in ok))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6.5 * max(1, len(groups)), 5),
                             squeeze=False)
    for ax, (model, layers) in zip(axes[0], groups):
        mine = {r["contender"]: r for r in ok if (r["model"], r["layers"]) == (model, layers)}
        for keys, color, name in ((CKPT_SWEEP, "tab:red", 'backend="ckpt": no budget, peak 0.5, 0.0'),
                                  (TORCH_SWEEP, "tab:blue", "torch.compile: budget 1.0, 0.5, 0.1")):
            pts = [mine[k] for k in keys if k in mine]
            ax.plot([r["step_ratio"] for r in pts], [r["peak_bytes"] / MIB for r in pts],
                    "-o", color=color, label=name)
        others = [r for r in mine.values() if r["contender"] not in CKPT_SWEEP + TORCH_SWEEP]
        ax.plot([r["step_ratio"] for r in others], [r["peak_bytes"] / MIB for r in others],
                "s", color="tab:gray", label="eager, per-block checkpointing, ckpt policies")
        for r in mine.values():
            short = (r["label"].replace("torch.compile, activation_memory_budget=", "torch budget ")
                     .replace("memory_budget=", "").replace("eager + per-block", "per-block"))
            ax.annotate(short, (r["step_ratio"], r["peak_bytes"] / MIB), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set(title=f"{model}, {layers} layers", xlabel="step time / torch.compile's (lower is faster)",
               ylabel="peak memory of a training step, MiB (allocator)")
        ax.margins(x=0.3, y=0.15)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
