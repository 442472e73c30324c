"""What the ``ckptfx`` subcommands do once :mod:`ckptfx.cli` has checked their arguments.

``report``: build the target, capture its joint graphs through Dynamo
(:func:`ckptfx.capture.capture_joints`), plan and apply each, simulate the memory timeline,
print the reports; ``--json``, ``--plot`` and ``--timeline`` write files. ``frontier``: the
same capture, then a budget sweep per graph with progress on stderr. ``demo``: trains the
built-in GPT (:mod:`ckptfx.demo`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any


def run(args) -> int:
    """Runs the parsed, validated command; returns the exit status."""
    return {"demo": demo, "report": report, "frontier": frontier}[args.command](args)


def _progress(text: str) -> None:
    print(f"ckptfx: {text}", file=sys.stderr, flush=True)


def _sizes(args):
    from ckptfx.target import Sizes

    return Sizes(layers=args.layers, width=args.width, seq=args.seq, batch=args.batch,
                 vocab=args.vocab)


def demo(args) -> int:
    from ckptfx.demo import GPTConfig, format_table, run_demo

    s = _sizes(args)
    width = s.get("width", 256)
    cfg = GPTConfig(vocab=s.get("vocab", 4096), seq=s.get("seq", 128),
                    layers=s.get("layers", 4), width=width, heads=max(1, width // 64),
                    batch=s.get("batch", 8))
    rows = run_demo(cfg, steps=args.steps, inner=args.inner, options=args.options)
    print(format_table(rows))
    bad = [r.name for r in rows if not r.grads_match]
    if bad:
        print(f"gradients differ from eager for: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def capture(args) -> list[Any]:
    """The joint graphs of the command's target.

    Raises:
        TargetError: the target cannot be built.
        UnsupportedGraphError: the compile gave no graph to plan.
        CkptfxError: Dynamo or AOTAutograd failed on the model (one line, the cause).
    """
    from ckptfx.capture import capture_joints
    from ckptfx.errors import CkptfxError, UnsupportedGraphError
    from ckptfx.hf import build_hf
    from ckptfx.target import build, check_target

    target = args.target or (None if args.hf else "gpt")
    if args.hf:
        check_target(target, args.hf)
        model, inputs = build_hf(args.hf, _sizes(args))
    else:
        model, inputs = build(target, _sizes(args))
    name = target or f"--hf {args.hf}"
    _progress(f"capturing {name} with torch.compile"
              + (" (dynamic=True)" if args.dynamic else ""))
    try:
        return capture_joints(model, inputs, dynamic=True if args.dynamic else None)
    except CkptfxError:
        raise
    except Exception as exc:  # Dynamo/AOTAutograd on the user's model: one line, the cause
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UnsupportedGraphError(f"capturing {name} failed: {type(exc).__name__}: {first} "
                                    f"(rerun with --debug for the traceback)") from exc


def plan_graph(joint, options: dict, graph_id: int, with_timeline: bool = True):
    """(report, plan) of one joint graph under ``options``, with its timeline."""
    from ckptfx.config import RematConfig
    from ckptfx.pipeline import partition_joint
    from ckptfx.timeline import memory_timeline

    config = RematConfig.from_options(options)
    fw, bw, rep, plan = partition_joint(joint, config, graph_id, return_plan=True)
    if with_timeline:
        rep = dataclasses.replace(rep, timeline=memory_timeline(joint, plan, config, (fw, bw)))
    return rep, plan


def report(args) -> int:
    from ckptfx.config import RematConfig

    options = args.options
    _print_combination_note(RematConfig.from_options(options), "--budget")
    joints = capture(args)
    reports = []
    for i, joint in enumerate(joints):
        _progress(f"planning graph {i + 1} of {len(joints)} "
                  f"({sum(1 for _ in joint.graph.nodes)} nodes)")
        reports.append(plan_graph(joint, options, i)[0])
    print("\n\n".join(str(r) for r in reports))
    main = max(reports, key=lambda r: r.saved_bytes_no_remat)
    if args.json:
        _write_json(args.json, {"graphs": [r.to_dict() for r in reports]})
    if args.plot:
        main.plot(args.plot)
        print(f"plot written to {args.plot}")
    if args.timeline:
        from ckptfx.timeline import plot_timeline

        plot_timeline(main.timeline, args.timeline, title=_title(args, main))
        print(f"timeline written to {args.timeline}"
              + (f" (graph {main.graph_id}, the largest of {len(reports)})"
                 if len(reports) > 1 else ""))
    return 0


def _title(args, rep) -> str:
    from ckptfx.report_text import budget_words

    name = args.target or (f"--hf {args.hf}" if args.hf else "gpt")
    return (f"{name}: memory through one training step (policy {rep.policy or 'none'}, "
            f"solver {rep.solver}, budget {budget_words(rep)})")


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
    print(f"JSON written to {path}")


def frontier(args) -> int:
    from ckptfx.config import RematConfig
    from ckptfx.frontier import pareto, plot_frontier
    from ckptfx.report_text import frontier_table

    budgets = args.budget_values
    # the first budget makes the base config valid (budget_kind needs a budget); pareto
    # replaces it with each budget in turn
    base = RematConfig.from_options({**args.options, "memory_budget": budgets[0]})
    _print_combination_note(base, "--budgets")
    joints = capture(args)
    results = []
    for i, joint in enumerate(joints):
        def tick(k, n, budget, i=i):
            _progress(f"graph {i + 1}/{len(joints)}: budget {budget} ({k + 1} of {n})")

        rows = pareto(joint, budgets, base, progress=tick)
        results.append(rows)
        print(f"graph {i}: {_plan_words(base)}")
        print(frontier_table(rows))
    if args.json:
        _write_json(args.json, frontier_json(results, base))
    if args.plot:
        plot_frontier(max(results, key=lambda rows: rows[0].saved_bytes), args.plot)
        print(f"plot written to {args.plot}")
    return 0


FRONTIER_FORMAT = "ckptfx.frontier/1"


def frontier_json(results, config) -> dict:
    """The frontier as JSON (``--json``); its shape, ``format`` ``ckptfx.frontier/1``::

        {"format": "ckptfx.frontier/1",
         "policy": str, "solver": str, "budget_kind": "saved" | "peak",
         "graphs": [{"graph_id": int,
                     "points": [{"id": "g<graph>/b<index>", "budget": str,
                                 "budget_bytes": int | null, "saved_bytes": int,
                                 "predicted_peak_bytes": int | null, "extra_flops": int,
                                 "extra_cost_s": float, "feasible": bool}, ...]}, ...]}

    A point's ``id`` is its graph's number and its budget's position in ``--budgets``: the
    same command gives the same ids. Bytes are bytes, ``extra_cost_s`` cost-model seconds;
    ``saved_bytes`` counts as the report's saved line does.
    """
    from ckptfx.report_text import policy_name

    return {
        "format": FRONTIER_FORMAT,
        "policy": policy_name(config.policy) or "none",
        "solver": _solver_name(config),
        "budget_kind": config.effective_budget_kind,
        "graphs": [{"graph_id": g, "points": [
            {"id": f"g{g}/b{k}", **dataclasses.asdict(r)} for k, r in enumerate(rows)]}
            for g, rows in enumerate(results)],
    }


def _plan_words(config) -> str:
    from ckptfx.report_text import policy_name

    return (f"policy={policy_name(config.policy) or 'none'}, solver={_solver_name(config)}, "
            f"budget kind={config.effective_budget_kind}")


def _solver_name(config) -> str:
    from ckptfx.planner import select_solver

    return select_solver(config)[0]


def _print_combination_note(config, option: str) -> None:
    """Says how a policy and a budget combine, when both are given."""
    note = combination_note(config, option)
    if note:
        print(f"note: {note}\n")


def combination_note(config, option: str = "--budget") -> str:
    """How a policy and a memory budget combine, in a sentence ("" unless both are set).

    Args:
        config: the RematConfig.
        option: how the user gave the budget (``--budget``, ``--budgets``).
    """
    if config.policy is None or config.memory_budget is None:
        return ""
    from ckptfx.planner import select_solver
    from ckptfx.policies import solver_request
    from ckptfx.report_text import policy_name

    name, kind = policy_name(config.policy), config.effective_budget_kind
    what = ("the step's peak fits" if kind == "peak"
            else "the bytes saved for the backward fit")
    solver, _ = select_solver(config)
    if solver_request(config.policy) is not None:  # a structural policy picks the solver
        return (f"policy {name} with {option}: the policy chooses which block outputs are "
                f"saved (solver {solver}); the rest of the graph is planned so that {what} the "
                f"budget")
    return (f"policy {name} with {option}: the policy's MUST votes are constraints the "
            f"{solver} solver keeps and its PREFER votes are preferences; within them the "
            f"solver chooses what to save so that {what} the budget. If the policy alone "
            f"keeps more than the budget, the budget is not met and the report says so")
