"""NodeTable: one row of facts per joint-graph node, read once from ``node.meta``.

Every later stage (policies, solvers, report) reads these rows instead of the fx nodes, so a
stage never re-derives a fact and nothing is stamped on ``fx.Node``.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from ckptfx import _torch_compat as compat
from ckptfx.analysis.costs import DEFAULT_MACHINE, Machine, node_cost
from ckptfx.analysis.sizes import SizeHints, tensor_bytes, value_bytes
from ckptfx.joint import JointGraph, Role

aten = torch.ops.aten

# Compute-bound ops: recomputing them costs real time, so the min-cut saves their outputs
# unless RematConfig.recompute_expensive is set (PyTorch's partitioner makes the same call).
COMPUTE_INTENSIVE = frozenset({
    aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm, aten.matmul, aten.linear,
    aten.convolution, aten.convolution_backward, aten._convolution, aten._int_mm,
    aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_flash_attention_for_cpu,
    aten._flash_attention_forward, aten._efficient_attention_forward,
    aten.scaled_dot_product_attention,
})


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """Facts about one joint-graph node.

    Attributes:
        name: node name.
        role: its Role in the joint graph.
        target: the op (an OpOverload, a Python callable) or None for placeholders.
        fw_computable: depends on no tangent.
        nbytes: bytes of its value, a sympy expression (tuples: sum of members).
        is_tensor: the value is one tensor (can be saved as is).
        is_sym: the value is a SymInt/SymFloat/SymBool.
        is_view: a view/alias op or getitem (no data of its own to recompute).
        is_random: draws random numbers (``nondeterministic_seeded``).
        has_side_effect: mutates, or is impure, or an unknown callable.
        is_collective: a distributed collective.
        compute_intensive: matmul/conv/attention (see COMPUTE_INTENSIVE).
        flops: FLOPs of one recompute (under the size hints).
        cost_s: roofline seconds of one recompute.
        module_path: the ``nn_module_stack`` path of the module that produced it ("" if none).
        module_types: the module classes along that path, outermost first.
        checkpoint_tag: ``meta["recompute"]`` (a torch.utils.checkpoint.CheckpointPolicy) or None.
        ban_reason: why it may not be recomputed ("" if it may; see :func:`recompute_ban`).
        widens: the name of the narrower floating-point value this node upcasts losslessly
            (a bf16 -> fp32 ``_to_copy``), "" if it is no such cast.
    """

    name: str
    role: Role
    target: Any
    fw_computable: bool
    nbytes: sympy.Expr
    is_tensor: bool
    is_sym: bool
    is_view: bool
    is_random: bool
    has_side_effect: bool
    is_collective: bool
    compute_intensive: bool
    flops: int
    cost_s: float
    module_path: str
    module_types: tuple[str, ...]
    checkpoint_tag: Any
    ban_reason: str
    widens: str = ""

    @property
    def op_name(self) -> str:
        if self.target is None:
            return self.role.value
        return str(getattr(self.target, "__name__", self.target))


@dataclasses.dataclass(frozen=True)
class NodeTable:
    """All rows, in graph order, plus the hints sizes were evaluated with."""

    rows: tuple[NodeFacts, ...]
    hints: SizeHints

    def __getitem__(self, name: str) -> NodeFacts:
        return self._index()[name]

    def _index(self) -> dict[str, NodeFacts]:
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {r.name: r for r in self.rows}
            object.__setattr__(self, "_idx", idx)
        return idx

    def bytes_of(self, name: str) -> int:
        """Bytes of a node's value under the hints (int)."""
        return self.hints.evaluate(self[name].nbytes)


def _is_view(node: fx.Node) -> bool:
    if node.target is operator.getitem:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return bool(getattr(node.target, "is_view", False))
    return False


def _side_effect(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target._schema.is_mutable:
            return f"{target} mutates its input"
        if node.is_impure(impure_random=False):  # randomness is is_random's call (dropout_p=0)
            return f"{target} is impure"
        return ""
    if target is operator.getitem or getattr(target, "__module__", "") in (
            "_operator", "operator", "math", "torch.sym_node", "torch.fx.experimental.sym_node"):
        return ""
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher-order op {target.name()} may have effects"
    if node.is_impure():
        return f"{target} is impure"
    if compat.is_sym_node(node):
        return ""
    return f"unknown callable {target!r}"


# Note [Random ops]
#     A random op draws from the generator's state, which the forward has advanced by the
#     time the backward runs: recomputing it draws a different mask. So every random op is
#     banned from recomputation (recompute_ban), in every solver, policy and budget; a policy
#     that demands it (MUST_RECOMPUTE) makes the plan infeasible and the safety net falls back,
#     to a partition that does not recompute it either. Inductor (fallback_random=False)
#     rewrites random ops into ``inductor_seeds`` (random: banned, so its few bytes are saved)
#     and ``inductor_random(seed)`` (deterministic in its seed): recomputing the latter replays
#     the forward's mask exactly. The invariants checker (passes/verify.py) applies the same
#     predicate to the emitted backward. Tests: tests/test_robustness.py.
_DROPOUT_ARGS = ("dropout_p", "p")


def is_random(node: fx.Node) -> bool:
    """Draws random numbers: tagged ``nondeterministic_seeded``, unless its dropout
    probability argument is a literal 0 (SDPA and dropout ops carry the tag either way).
    See Note [Random ops]."""
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded not in tags:
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return True
    for i, arg in enumerate(schema.arguments):
        if arg.name in _DROPOUT_ARGS:
            value = node.kwargs.get(arg.name, node.args[i] if i < len(node.args) else arg.default_value)
            return not (isinstance(value, (int, float)) and value == 0)
    return True


_CASTS = frozenset({aten._to_copy, aten.to, torch.ops.prims.convert_element_type})


def _widens(node: fx.Node) -> str:
    """The name of the narrower float value ``node`` casts up to a wider float, or "".

    Under autocast or with bf16 parameters, an fp32 copy of a bf16 value (RMSNorm's
    ``x.float()``) is often a candidate next to its source; saving the copy costs twice the
    bytes of the source for the price of one cheap cast. The planner turns this fact into a
    preference to recompute the cast (``ckptfx.planner.build_problem``).
    """
    if getattr(node.target, "overloadpacket", None) not in _CASTS or not node.args:
        return ""
    src = node.args[0]
    val = node.meta.get("val")
    src_val = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not (isinstance(val, torch.Tensor) and isinstance(src_val, torch.Tensor)):
        return ""
    widened = (val.is_floating_point() and src_val.is_floating_point()
               and val.element_size() > src_val.element_size() and val.device == src_val.device
               # sympy (structural) comparison: comparing SymInts would add guards
               and tensor_bytes(val) / val.element_size()
               == tensor_bytes(src_val) / src_val.element_size())
    return src.name if widened else ""


def _is_collective(node: fx.Node) -> bool:
    ns = getattr(node.target, "namespace", "")
    return ns in ("_c10d_functional", "c10d_functional", "c10d", "_dtensor")


def _module_info(node: fx.Node) -> tuple[str, tuple[str, ...]]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ()
    entries = list(stack.values())
    path = entries[-1][0] if isinstance(entries[-1], tuple) else str(entries[-1])
    types = tuple(getattr(e[1], "__name__", str(e[1])) if isinstance(e, tuple) else "" for e in entries)
    return path, types


def _flags(node: fx.Node) -> tuple[bool, str, bool]:
    """(is random, side effect or "", is collective) of a node."""
    if node.op != "call_function":
        return False, "", False
    return is_random(node), _side_effect(node), _is_collective(node)


def recompute_ban(node: fx.Node) -> str:
    """Why ``node`` may never be recomputed in the backward ("" if it may).

    The one predicate behind ``NodeFacts.ban_reason`` and the invariants checker
    (``ckptfx.passes.verify``), so the two never disagree on what is random or effectful.
    """
    return _ban_reason(node, *_flags(node))


def _ban_reason(node: fx.Node, random: bool, side: str, collective: bool) -> str:
    if node.op == "placeholder":
        return "graph input"
    if random:
        return "random op (recomputing it would draw a different mask)"
    if collective:
        return "collective (never recomputed: every rank must issue it once)"
    if side:
        return side
    defined = compat.unbacked_symbols_defined_by(node)
    if defined:
        return (f"defines the data-dependent size {', '.join(defined)} (the backward receives "
                f"it as a saved SymInt; recomputing would define it again and sync the host)")
    tag = node.meta.get("recompute")
    if tag is not None and "MUST_SAVE" in str(tag):
        return "tagged MUST_SAVE"
    return ""


def build_table(joint: JointGraph, hints: SizeHints, machine: Machine = DEFAULT_MACHINE,
                cost_model: str = "roofline") -> NodeTable:
    """Reads the facts of every node of the joint graph.

    Args:
        joint: the joint graph (every node should carry ``meta["val"]``).
        hints: evaluates symbolic sizes for FLOPs and costs.
        machine: roofline constants.
        cost_model: ``"roofline"``, or ``"profile"`` to time forward-computable ops on this
            machine (``ckptfx.analysis.profile``; roofline where an op cannot be timed).

    Returns:
        A NodeTable with one row per node except the output node.
    """
    rows = []
    for node in joint.graph.nodes:
        if node.op == "output":
            continue
        val = node.meta.get("val")
        is_view = node.op == "call_function" and _is_view(node)
        random, side, collective = _flags(node)
        cost = node_cost(node, hints, machine, is_view=is_view)
        if cost_model == "profile" and cost.seconds > 0 and node.name in joint.fw_computable:
            from ckptfx.analysis.profile import profile_node

            measured = profile_node(node, hints)
            if measured is not None:
                cost = dataclasses.replace(cost, seconds=measured)
        path, types = _module_info(node)
        packet = getattr(node.target, "overloadpacket", None)
        rows.append(NodeFacts(
            name=node.name,
            role=joint.roles[node.name],
            target=node.target if node.op == "call_function" else None,
            fw_computable=node.name in joint.fw_computable,
            nbytes=value_bytes(val),
            is_tensor=isinstance(val, torch.Tensor),
            is_sym=isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)),
            is_view=is_view,
            is_random=random,
            has_side_effect=bool(side),
            is_collective=collective,
            compute_intensive=packet in COMPUTE_INTENSIVE,
            flops=cost.flops,
            cost_s=cost.seconds,
            module_path=path,
            module_types=types,
            checkpoint_tag=node.meta.get("recompute"),
            ban_reason=_ban_reason(node, random, side, collective),
            widens=_widens(node),
        ))
    return NodeTable(tuple(rows), hints)
