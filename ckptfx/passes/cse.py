"""Common-subexpression elimination on the joint graph, before planning.

PyTorch's min-cut partitioner merges duplicate pure ops before it partitions
(``fx_graph_cse``); ckptfx replaces that partitioner, so it merges them too. Without it the
emitted graphs keep duplicates that Inductor fuses into C++ it cannot compile (two bf16
bias gradients reducing one tangent: ``conflicting declaration at_BFloat16_tmp_acc0_vec``;
tests/test_robustness_shapes.py::test_autocast_inductor_gradients_close_to_eager), and the
plan pays twice for one value.

Two nodes merge when they apply the same op to the same inputs and arguments (scalars
compared with their type: ``mul(x, 1)`` and ``mul(x, 1.0)`` differ) and:

* the op is pure: no mutation, no side effect, not random (a second dropout draws anew);
* no mutation lies between them (mutation regions, as ``fx_graph_cse`` keeps them);
* neither is a graph output nor a view of one (two gradients must stay two tensors);
* neither defines a data-dependent size (``unbacked_bindings``);
* both carry the same ``torch.utils.checkpoint`` tag and region (``meta["recompute"]``,
  ``meta["ac_graph_id"]``): merging across regions would turn a value each region
  recomputes into one that crosses regions and must be saved. (PyTorch merges these; its
  partitioner then saves them.)
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ckptfx import _torch_compat as compat
from ckptfx.analysis import nodes


def _freeze(arg: Any) -> Any:
    """A hashable key for an argument; scalars keep their type."""
    if isinstance(arg, fx.Node):
        return arg
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__, tuple(_freeze(a) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in arg.items())))
    if isinstance(arg, (bool, int, float, complex, str, type(None), torch.dtype,
                        torch.device, torch.layout, torch.memory_format)):
        return (type(arg).__name__, arg)
    raise TypeError(f"unhashable argument {arg!r}")


def _mergeable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.meta.get("unbacked_bindings"):
        return False
    if node.target is operator.getitem:
        return True
    if not compat.is_op_overload(node.target) or nodes.is_mutation(node):
        return False
    if nodes.has_random_tag(node) or node.target is torch.ops.aten.empty.memory_format:
        return False
    return not node.is_impure()


def _output_aliases(graph: fx.Graph) -> set[fx.Node]:
    """Outputs and every node an output is a view (or getitem) of."""
    out = graph.find_nodes(op="output")[0]
    seen: set[fx.Node] = set()
    stack = [n for n in out.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if nodes.is_view(n) and n.args and isinstance(n.args[0], fx.Node):
            stack.append(n.args[0])
    return seen


def merge_duplicates(gm: fx.GraphModule) -> int:
    """Merges duplicate pure nodes of ``gm`` in place (see the module docstring).

    Returns:
        How many nodes were merged away.
    """
    graph = gm.graph
    keep_apart = _output_aliases(graph)
    seen: dict[Any, fx.Node] = {}
    region = 0
    merged = 0
    for node in list(graph.nodes):
        if nodes.is_mutation(node):
            region += 1
        if node in keep_apart or not _mergeable(node):
            continue
        try:
            key = (region, node.target, _freeze(node.args), _freeze(node.kwargs),
                   str(node.meta.get("recompute")), node.meta.get("ac_graph_id"))
            hash(key)
        except TypeError:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            merged += 1
    if merged:
        gm.recompile()
    return merged
