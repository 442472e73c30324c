"""The package's structure: one direction of imports, one door to torch's private APIs.

Note [Layers]
    Data flows one way through ckptfx, and so do imports: a module imports only modules of
    its own layer or of a layer listed before it, and no two modules import each other,
    directly or through others (function-level imports count). The layers, lowest first:

    foundation  errors, _torch_compat (the only module that touches torch's private APIs)
    analysis    joint (roles), analysis/* (node predicates, sizes, costs, NodeTable, blocks),
                passes/cse and passes/prepare (the joint graph made ready for analysis)
    votes       votes, selective, policies
    solvers     solvers/* (plain data, no torch: leaves the solve stage calls)
    config      config (validates policies, names the registered solvers)
    problem     problem (votes + table -> SolveProblem)
    plan        plan (RematPlan), planner (solve -> RematPlan), stages (pipeline budgets)
    apply       passes/verify, passes/rewrite
    simulate    memory
    report      report_text, formula, timeline (curves of this plan, no recompute and
                PyTorch's partitioner), report
    search      candidates, peak_chain, peak_budget (compose plan, apply and simulate)
    entry       pipeline, passes/partition, passes/remat, passes, backend (and its ledger),
                capture, frontier, distributed
    package     ckptfx (public names)
    tools       measure, testing, demo, target, hf, commands, cli (users of the public API)

    A stage that searches over plans sits above plan, apply and simulate and is the only one
    that calls them together; nothing below it calls it.
"""

from __future__ import annotations

import ast
import fnmatch
import pathlib

import networkx as nx
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ckptfx"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("ckptfx.errors", "ckptfx._torch_compat")),
    ("analysis", ("ckptfx.joint", "ckptfx.analysis", "ckptfx.analysis.*", "ckptfx.passes.cse",
                  "ckptfx.passes.prepare")),
    ("votes", ("ckptfx.votes", "ckptfx.selective", "ckptfx.policies")),
    ("solvers", ("ckptfx.solvers", "ckptfx.solvers.*")),
    ("config", ("ckptfx.config",)),
    ("problem", ("ckptfx.problem",)),
    ("plan", ("ckptfx.plan", "ckptfx.planner", "ckptfx.stages")),
    ("apply", ("ckptfx.passes.verify", "ckptfx.passes.rewrite")),
    ("simulate", ("ckptfx.memory", "ckptfx.passes.emitted")),
    ("report", ("ckptfx.report_text", "ckptfx.formula", "ckptfx.timeline", "ckptfx.report")),
    ("search", ("ckptfx.candidates", "ckptfx.peak_chain", "ckptfx.peak_budget")),
    ("entry", ("ckptfx.pipeline", "ckptfx.passes.partition", "ckptfx.passes.remat",
               "ckptfx.passes", "ckptfx.backend", "ckptfx.ledger", "ckptfx.capture",
               "ckptfx.frontier", "ckptfx.distributed")),
    ("package", ("ckptfx",)),
    ("tools", ("ckptfx.measure", "ckptfx.testing", "ckptfx.demo", "ckptfx.target", "ckptfx.hf",
               "ckptfx.commands", "ckptfx.cli")),
)

# Torch modules only ckptfx/_torch_compat.py may import or name (any ``torch._*`` module or
# attribute, ``torch.utils._*``, ``torch.fx.experimental``), and private attributes of torch
# objects (ops' schemas, graphs' code generators).
PRIVATE_ATTRIBUTES = frozenset({"_schema", "_codegen", "_ops", "_C", "_dynamo", "_inductor",
                                "_functorch", "_subclasses", "_guards", "_prims_common",
                                "_pytree"})


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = PACKAGE.parent / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, tree: ast.Module) -> set[str]:
    """The ckptfx modules ``module`` imports anywhere (module level or in functions)."""
    is_package = _is_module(module + ".__init__") or (PACKAGE.parent / module.replace(".", "/")
                                                       / "__init__.py").exists()
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "ckptfx")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ckptfx":
                continue
            subs = {f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")}
            out.update(subs or {target})
    out.discard(module)
    return out


def import_graph() -> nx.DiGraph:
    """module -> the ckptfx modules it imports."""
    graph = nx.DiGraph()
    for module, tree in _sources().items():
        graph.add_node(module)
        graph.add_edges_from((module, target) for target in _imported(module, tree))
    return graph


def layer_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and Note [Layers]")


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph()))
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles)


def test_no_upward_imports():
    graph = import_graph()
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
              for a, b in graph.edges if layer_of(b) > layer_of(a)]
    assert upward == [], "imports against the layer order (Note [Layers]):\n" + "\n".join(upward)


def _is_private_torch(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "torch" or (len(parts) > 1 and parts[1] == "ops"):
        return False  # torch.ops.aten._to_copy is an op's name, not a private API
    return any(p.startswith("_") and not p.startswith("__") for p in parts[1:]) or \
        dotted.startswith("torch.fx.experimental")


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def private_torch_references(module: str, tree: ast.Module) -> list[str]:
    """``module:line name``, one per line, of the private torch references in one module."""
    found: dict[int, str] = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            private_attr = node.attr in PRIVATE_ATTRIBUTES and not dotted.startswith("torch.ops.")
            names = [dotted or ast.unparse(node)] if private_attr else [dotted]
            names = [n for n in names if private_attr or _is_private_torch(n)]
        for name in names:
            if _is_private_torch(name) or isinstance(node, ast.Attribute):
                found.setdefault(node.lineno, name)
    return [f"{module}:{line} {name}" for line, name in sorted(found.items())]


def test_private_torch_only_through_the_compat_module():
    found = [ref for module, tree in _sources().items() if module != "ckptfx._torch_compat"
             for ref in private_torch_references(module, tree)]
    assert found == [], ("private torch references outside ckptfx/_torch_compat.py (add a "
                         "wrapper there):\n" + "\n".join(found))


@pytest.mark.parametrize("source, expected", [
    ("import torch._dynamo", 1),
    ("import torch.utils._pytree as pytree", 1),
    ("from torch.fx.experimental.symbolic_shapes import ShapeEnv", 1),
    ("isinstance(t, torch._ops.OpOverload)", 1),
    ("node.target._schema.is_mutable", 1),
    ("torch.ops.aten._to_copy.default", 0),
    ("torch.utils.checkpoint.CheckpointPolicy", 0),
])
def test_private_reference_detector(source, expected):
    assert len(private_torch_references("m", ast.parse(source))) == expected


def test_cycle_and_upward_detection_on_a_toy_graph():
    toy = nx.DiGraph([("ckptfx.memory", "ckptfx.planner"), ("ckptfx.planner", "ckptfx.memory")])
    assert list(nx.simple_cycles(toy))
    assert layer_of("ckptfx.planner") < layer_of("ckptfx.memory")  # memory -> planner is upward
