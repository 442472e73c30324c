"""The ``ckptfx`` command: ``ckptfx demo``, ``ckptfx report`` and ``ckptfx frontier``.

``ckptfx demo`` trains the built-in small GPT under ``backend="ckpt"`` and torch.compile's
default and prints a table; it exits 1 when the gradients differ from eager's.
``ckptfx report`` plans the same model and prints what is saved, what is recomputed and why,
optionally drawing a plot. ``ckptfx frontier`` sweeps memory budgets (saved bytes, predicted
peak, extra FLOPs per budget).
"""

from __future__ import annotations

import argparse
import logging
import sys


def _options(args) -> dict:
    options = {}
    if args.budget is not None:
        options["memory_budget"] = _budget_value(args.budget)
    if args.solver is not None:
        options["solver"] = args.solver
    if args.policy is not None:
        options["policy"] = args.policy
    return options


def _budget_value(text: str):
    try:
        return float(text) if "." in text and text.replace(".", "", 1).isdigit() else text
    except ValueError:
        return text


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--width", type=int, default=256, help="hidden size (default 256)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--budget", default=None,
                   help="memory_budget: a fraction like 0.5 or a size like 64MiB")
    p.add_argument("--solver", default=None, help="auto, mincut, budget, greedy, uniform")
    p.add_argument("--policy", default=None, help="a built-in policy name")


def _cfg(args):
    from ckptfx.demo import GPTConfig

    return GPTConfig(layers=args.layers, width=args.width, seq=args.seq, batch=args.batch,
                     heads=max(1, args.width // 64))


def cmd_demo(args) -> int:
    from ckptfx.demo import format_table, run_demo

    rows = run_demo(_cfg(args), steps=args.steps, inner=args.inner, options=_options(args))
    print(format_table(rows))
    bad = [r.name for r in rows if not r.grads_match]
    if bad:
        print(f"gradients differ from eager for: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _demo_joint(args):
    """The built-in GPT of the given sizes, traced to its joint graph."""
    import torch

    import ckptfx
    from ckptfx.demo import TinyGPT

    cfg = _cfg(args)
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq))
    return ckptfx.trace_joint(model, ids)


def cmd_report(args) -> int:
    import ckptfx

    config = ckptfx.RematConfig.from_options(_options(args))
    joint = _demo_joint(args)
    plan = ckptfx.plan_remat(joint, config)
    _, _, report = ckptfx.apply_plan(joint, plan, config)
    print(report)
    if args.plot:
        report.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def cmd_frontier(args) -> int:
    import ckptfx
    from ckptfx.frontier import format_frontier, plot_frontier

    joint = _demo_joint(args)
    budgets = [_budget_value(b) for b in args.budgets.split(",")]
    rows = ckptfx.pareto(joint, budgets, ckptfx.RematConfig.from_options(
        {"solver": args.solver or "budget", **({"policy": args.policy} if args.policy else {})}))
    print(format_frontier(rows))
    if args.plot:
        plot_frontier(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckptfx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the built-in GPT with and without ckptfx")
    _model_args(demo)
    demo.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    demo.add_argument("--inner", default="inductor", choices=["inductor", "eager"])
    report = sub.add_parser("report", help="plan the built-in GPT and print the report")
    _model_args(report)
    report.add_argument("--plot", default=None, help="write a PNG plot to this path")
    frontier = sub.add_parser("frontier", help="sweep memory budgets over the built-in GPT")
    _model_args(frontier)
    frontier.add_argument("--budgets", default="1.0,0.8,0.6,0.4,0.2,0.0",
                          help="comma-separated memory_budget values")
    frontier.add_argument("--plot", default=None, help="write a PNG plot to this path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from ckptfx.errors import CkptfxError

    try:
        return {"demo": cmd_demo, "report": cmd_report,
                "frontier": cmd_frontier}[args.command](args)
    except (CkptfxError, ImportError) as exc:
        print(f"ckptfx: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
