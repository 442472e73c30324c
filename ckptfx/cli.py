"""The ckptfx command: demo, report and frontier.

``ckptfx demo`` trains the built-in small GPT under backend="ckpt" and torch.compile's default
and prints a table; it exits 1 when the gradients differ from eager's. ``ckptfx report TARGET``
plans a model and prints what is saved, what is recomputed and why; ``ckptfx frontier TARGET``
sweeps memory budgets. TARGET is a built-in model (gpt), package.module:factory (a callable
returning (model, example_inputs)), or --hf MODEL_TYPE for a transformers model built from its
config with random weights.

Every argument is checked before any work; a mistake is one line on stderr and exit status 2.
This module imports nothing heavy until the arguments are parsed, so --help is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "ckptfx"
_PLOT_EXTS = (".png", ".pdf", ".svg")


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage dump)."""

    argv: list[str] = []

    def error(self, message: str):
        cmd = next((a for a in _Parser.argv if a in ("demo", "report", "frontier")), "")
        prog = f"{PROG} {cmd}" if cmd and self.prog == PROG else self.prog
        hint = ""
        if "--budget" in message and cmd == "frontier":
            hint = "; frontier sweeps --budgets (a comma-separated list) instead"
        self.exit(2, f"{prog}: {message}{hint} (see {prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def budget_value(text: str):
    """A --budget string as memory_budget takes it: a float for a fraction ("0.5", "1.0",
    "0"), else the string (a size with its unit, "64MiB")."""
    try:
        value = float(text)
    except ValueError:
        return text
    return value if text.strip().lower() not in ("nan", "inf", "-inf") else text


def _cli_budget(text: str, option: str):
    """A budget from the command line, parsed; a bare number above 1 is neither a fraction
    nor bytes with a unit.

    Raises:
        UsageError: such a number; ConfigError: any other bad budget.
    """
    from ckptfx.config import parse_budget

    value = budget_value(text)
    if isinstance(value, float) and value > 1:
        raise UsageError(f"{option}: {text} is a bare number, read as a fraction in [0, 1]; "
                         f"for bytes give a unit, e.g. {text}MiB")
    parse_budget(value)
    return value


def _sizes(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model sizes (built-in and --hf models; passed to a factory as "
                             "keyword arguments)")
    g.add_argument("--layers", type=positive_int, help="transformer blocks (gpt: 4, --hf: 2)")
    g.add_argument("--width", type=positive_int, help="hidden size (default 256)")
    g.add_argument("--seq", type=positive_int, help="sequence length (default 128)")
    g.add_argument("--batch", type=positive_int, help="batch size (gpt: 8, --hf: 4)")
    g.add_argument("--vocab", type=positive_int, help="vocabulary size (default 4096)")


def _plan_args(p: argparse.ArgumentParser, budget: bool = True) -> None:
    if budget:
        p.add_argument("--budget", default=None,
                       help="memory_budget: a fraction like 0.5 (0 = least memory, 1 = no "
                            "budget) or a size with its unit like 64MiB")
    p.add_argument("--budget-kind", default=None, choices=["saved", "peak"],
                   help="what the budget bounds: the bytes saved for the backward, or the "
                        "step's peak (default: ckptfx's memory_budget default)")
    p.add_argument("--solver", default=None,
                   choices=["auto", "mincut", "budget", "greedy", "uniform"])
    p.add_argument("--policy", default=None,
                   help="a built-in policy: uniform, megatron_selective, ...")


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", default=None, metavar="TARGET",
                   help="gpt (built-in, the default) or package.module:factory")
    p.add_argument("--hf", default=None, metavar="MODEL_TYPE",
                   help="a transformers model type (llama, qwen2, gpt2, ...) with random weights")
    p.add_argument("--dynamic", action="store_true",
                   help="symbolic sizes (torch.compile dynamic=True): prints saved bytes and "
                        "peak as formulas in the input sizes")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a plot (.png, .pdf, .svg)")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback when something fails")


def build_parser() -> argparse.ArgumentParser:
    """The ``ckptfx`` argument parser (imports nothing heavy)."""
    parser = _Parser(prog=PROG, allow_abbrev=False, description=(
        "Plan which activations a training step saves and which it recomputes. "
        "ckptfx report TARGET: what is saved, what is recomputed, why, and the memory "
        "timeline; ckptfx frontier TARGET: a memory-budget sweep; ckptfx demo: train the "
        "built-in GPT with and without ckptfx. TARGET is gpt (built-in), "
        "package.module:factory (a callable returning (model, example_inputs)), or --hf "
        "MODEL_TYPE (a transformers model from its config, random weights)."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="train the built-in GPT with and without ckptfx",
                          allow_abbrev=False)
    _sizes(demo)
    _plan_args(demo)
    demo.add_argument("--steps", type=positive_int, default=3, help="training steps (default 3)")
    demo.add_argument("--inner", default="inductor", choices=["inductor", "eager"])
    report = sub.add_parser("report", help="plan a model; print what is saved, recomputed, why",
                            allow_abbrev=False)
    _target_args(report)
    _sizes(report)
    _plan_args(report)
    report.add_argument("--timeline", default=None, metavar="FILE",
                        help="draw live memory through the step (this plan, no recompute, "
                             "PyTorch's partitioner) to FILE")
    frontier = sub.add_parser("frontier", help="sweep memory budgets over a model",
                              allow_abbrev=False)
    _target_args(frontier)
    _sizes(frontier)
    _plan_args(frontier, budget=False)
    frontier.add_argument("--budgets", default="1.0,0.8,0.6,0.4,0.2,0.0",
                          help="comma-separated memory_budget values (default 1.0,...,0.0)")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ckptfx")
    except PackageNotFoundError:
        return "unknown"


def _probe_write(path: str, option: str) -> None:
    """Opens ``path`` for writing as the command will (creating and removing it if new): a
    folder that refuses files (``/proc``) fails here, before any work."""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: not writable ({exc.strerror or exc})") from None
    if not existed:
        os.remove(path)


def check_output(path: str | None, option: str, plot: bool = False) -> None:
    """Checks that ``path`` can be written (and drawn) before any work.

    Raises:
        UsageError: its folder does not exist or is not writable, a plot's extension is not
            one matplotlib writes, or matplotlib is missing.
    """
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")
    _probe_write(path, option)
    if plot:
        if os.path.splitext(path)[1].lower() not in _PLOT_EXTS:
            raise UsageError(f"{option} {path}: use a {', '.join(_PLOT_EXTS)} file name")
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(f"{option} needs matplotlib: pip install 'ckptfx[plot]'")


def options_of(args, budgets=()) -> dict:
    """RematConfig options from the parsed arguments, validated as the command will run
    them: with ``--budget``, or (``frontier``) with each of ``budgets`` in turn, so that a
    bad combination fails before the model is built.

    Raises:
        ConfigError: a bad budget, policy or combination (a solver that takes no budget
            given one).
    """
    from ckptfx.config import RematConfig

    options = {}
    if getattr(args, "budget", None) is not None:
        options["memory_budget"] = _cli_budget(args.budget, "--budget")
    if getattr(args, "budget_kind", None) is not None:
        options["budget_kind"] = args.budget_kind
    if args.solver is not None:
        options["solver"] = args.solver
    if args.policy is not None:
        options["policy"] = args.policy
    for budget in budgets or (None,):
        run = {"solver": "budget", **options, "memory_budget": budget} if budgets else options
        unbudgeted = {k: v for k, v in run.items() if k not in ("memory_budget", "budget_kind")}
        check_combination(RematConfig.from_options(unbudgeted), run.get("memory_budget"))
        RematConfig.from_options(run)  # ConfigError naming the option
    return options


def check_combination(config, given) -> None:
    """Refuses, before any work, a memory budget for a solver that takes none (the
    min-cut finds the fewest saved bytes whatever the budget), in the command line's terms.

    Args:
        config: the options without the budget.
        given: the budget (a MemoryBudget or the value given), or None.

    Raises:
        ConfigError: names the solver and the options that would work.
    """
    from ckptfx.config import MemoryBudget
    from ckptfx.errors import ConfigError
    from ckptfx.planner import select_solver
    from ckptfx.solvers import registry

    if given is None or config.solver == "auto":
        return
    name, kwargs = select_solver(config)
    if not getattr(registry.get(name, **kwargs), "takes_budget", True):
        shown = str(given) if isinstance(given, MemoryBudget) else repr(given)
        raise ConfigError(
            f"--solver {name} finds the fewest saved bytes and takes no budget (got "
            f"{shown}); drop --solver (auto: min-cut without a budget, the budget MILP with "
            f"one) or use --solver budget, greedy or uniform")


def validate(args) -> None:
    """Every check that needs no model: raises UsageError or ConfigError. Leaves the
    validated options on ``args.options`` and, for ``frontier``, the budgets on
    ``args.budget_values`` (what :mod:`ckptfx.commands` runs with)."""
    from ckptfx.target import check_target

    if args.command in ("report", "frontier"):
        check_target(args.target or (None if args.hf else "gpt"), args.hf)
        check_output(args.json, "--json")
        check_output(args.plot, "--plot", plot=True)
        check_output(getattr(args, "timeline", None), "--timeline", plot=True)
    if args.command == "frontier":
        budgets = [b.strip() for b in args.budgets.split(",")]
        if not all(budgets):
            raise UsageError(f"--budgets {args.budgets!r} has an empty item")
        for b in budgets:
            _cli_budget(b, "--budgets")
        args.budget_values = [budget_value(b) for b in budgets]
    args.options = options_of(args, getattr(args, "budget_values", ()))


def main(argv: list[str] | None = None) -> int:
    _Parser.argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from ckptfx.errors import CkptfxError

    try:
        validate(args)
        from ckptfx import commands

        return commands.run(args)
    except (UsageError, CkptfxError, ImportError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):  # `ckptfx report ... | head`: the reader left
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if getattr(args, "debug", False):
            raise
        print(f"{PROG} {args.command}: {_one_line(exc)}{_hint(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The message, on one line, with the root cause of a chained error (a model's own
    exception inside a tracing error) appended when it says something the message does not."""
    text = " ".join((str(exc).strip() or type(exc).__name__).split())
    root, seen = exc, {id(exc)}
    while (nxt := root.__cause__ or (None if _ours(root) and root.__suppress_context__
                                     else root.__context__)) is not None and id(nxt) not in seen:
        root = nxt  # the innermost error: a model's own, under the tracer's wrappers
        seen.add(id(root))
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    cause = lines[-1] if lines else ""
    if root is not exc and cause and cause not in text:
        text += f" (caused by {type(root).__name__}: {cause})"
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"cannot write {exc.filename}: {text}"
    return text


def _ours(exc: BaseException) -> bool:
    """An error ckptfx raised (its ``from None`` means the context is not the cause); the
    tracer's own wrappers suppress the model's error, which is the cause."""
    from ckptfx.errors import CkptfxError

    return isinstance(exc, (UsageError, CkptfxError))


def _hint(exc: BaseException) -> str:
    if isinstance(exc, ImportError) and getattr(exc, "name", "") == "transformers":
        return "; --hf needs transformers: pip install transformers"
    if isinstance(exc, ImportError) and getattr(exc, "name", "") == "matplotlib":
        return "; plots need matplotlib: pip install matplotlib"
    return ""


if __name__ == "__main__":
    sys.exit(main())
