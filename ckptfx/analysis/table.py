"""NodeTable: one row of facts per joint-graph node, read once from ``node.meta``.

Every later stage (policies, problem, solvers, report) reads these rows instead of the fx
nodes, so a stage never re-derives a fact and nothing is stamped on ``fx.Node``. The rows
carry the graph's structure too (producers, users, storage identity; rows in topological
order), so :func:`ckptfx.problem.build_problem` never reads the fx graph. What a node *is*
(random, effectful, a view, ...) is decided by :mod:`ckptfx.analysis.nodes`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
import torch.fx as fx

from ckptfx import _torch_compat as compat
from ckptfx.analysis import nodes
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
        regathers: an all-gather of parameter shards (or its wait) that ``regather_params``
            lets the backward run again (:func:`ckptfx.analysis.nodes.is_param_gather`).
        compute_intensive: matmul/conv/attention (see COMPUTE_INTENSIVE).
        flops: FLOPs of one recompute (under the size hints).
        cost_s: roofline seconds of one recompute.
        module_path: the ``nn_module_stack`` path of the module that produced it ("" if none).
        module_types: the module classes along that path, outermost first.
        checkpoint_tag: ``meta["recompute"]`` (a torch.utils.checkpoint.CheckpointPolicy) or None.
        ban_reason: why it may not be recomputed ("" if it may; see :func:`recompute_ban`).
        widens: the name of the narrower floating-point value this node upcasts losslessly
            (a bf16 -> fp32 ``_to_copy``), "" if it is no such cast.
        can_save: the value may be handed to the backward as it is
            (:func:`ckptfx.analysis.nodes.may_be_saved`).
        inputs: names of its producers (``all_input_nodes``), in argument order.
        users: names of the nodes that read it (the output node excluded).
        storage: identity of the storage its tensor value lives in (aliases share it), or None.
        view_of: the node whose storage a view op's value aliases ("" for a value with a
            storage of its own; :func:`ckptfx.analysis.nodes.view_base`).
        source: ``file.py:line`` of the user code that produced it ("" if unknown).
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
    can_save: bool = False
    inputs: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    storage: int | None = None
    view_of: str = ""
    source: str = ""
    regathers: bool = False

    @property
    def op_name(self) -> str:
        if self.target is None:
            return self.role.value
        return str(getattr(self.target, "__name__", self.target))


@dataclasses.dataclass(frozen=True)
class NodeTable:
    """All rows, in graph (topological) order, plus the hints sizes were evaluated with.

    Attributes:
        rows: one NodeFacts per node, producers before users.
        hints: the SizeHints byte counts and costs were evaluated with.
        backward_outputs: names of the joint graph's backward outputs (the gradients).
    """

    rows: tuple[NodeFacts, ...]
    hints: SizeHints
    backward_outputs: frozenset[str] = frozenset()

    def __getitem__(self, name: str) -> NodeFacts:
        return self._index()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index()

    def _index(self) -> dict[str, NodeFacts]:
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {r.name: r for r in self.rows}
            object.__setattr__(self, "_idx", idx)
        return idx

    def bytes_of(self, name: str) -> int:
        """Bytes of a node's value under the hints (int)."""
        return self.hints.evaluate(self[name].nbytes)


_CASTS = frozenset({aten._to_copy, aten.to, torch.ops.prims.convert_element_type})


def _widens(node: fx.Node) -> str:
    """The name of the narrower float value ``node`` casts up to a wider float, or "".

    Under autocast or with bf16 parameters, an fp32 copy of a bf16 value (RMSNorm's
    ``x.float()``) is often a candidate next to its source; saving the copy costs twice the
    bytes of the source for the price of one cheap cast. The planner turns this fact into a
    preference to recompute the cast (``ckptfx.problem.build_problem``).
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


def _module_info(node: fx.Node) -> tuple[str, tuple[str, ...]]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ()
    entries = list(stack.values())
    path = entries[-1][0] if isinstance(entries[-1], tuple) else str(entries[-1])
    types = tuple(getattr(e[1], "__name__", str(e[1])) if isinstance(e, tuple) else "" for e in entries)
    return path, types


def regather_from(joint: JointGraph, regather_params: bool) -> frozenset[str]:
    """The parameters whose all-gathers may run again in the backward: the joint graph's
    static-lifetime primals with ``regather_params``, none without (see Note
    [Re-gathering parameters] in ``ckptfx/analysis/nodes.py``)."""
    return joint.static_input_names if regather_params else frozenset()


def build_table(joint: JointGraph, hints: SizeHints, machine: Machine = DEFAULT_MACHINE,
                cost_model: str = "roofline", regather_params: bool = False) -> NodeTable:
    """Reads the facts of every node of the joint graph.

    Args:
        joint: the joint graph (every node should carry ``meta["val"]``).
        hints: evaluates symbolic sizes for FLOPs and costs.
        machine: roofline constants.
        cost_model: ``"roofline"``, or ``"profile"`` to time forward-computable ops on this
            machine (``ckptfx.analysis.profile``; roofline where an op cannot be timed).
        regather_params: an all-gather of parameter shards and its wait may be recomputed
            (``RematConfig.regather_params``); every other collective stays banned.

    Returns:
        A NodeTable with one row per node except the output node.
    """
    rows = []
    regather = regather_from(joint, regather_params)
    for node in joint.graph.nodes:
        if node.op == "output":
            continue
        view = nodes.is_view(node)
        collective = nodes.is_collective(node)
        # a wait moves no data; the collective it waits for carries the communication
        cost = node_cost(node, hints, machine, is_view=view or nodes.is_wait(node),
                         communicates=collective)
        if (cost_model == "profile" and cost.seconds > 0 and node.name in joint.fw_computable
                and not collective):  # a collective is priced, never run
            from ckptfx.analysis.profile import profile_node

            measured = profile_node(node, hints)
            if measured is not None:
                cost = dataclasses.replace(cost, seconds=measured)
        rows.append(_row(joint, node, cost, view, regather))
    out = joint.graph.find_nodes(op="output")[0]
    leaves = compat.arg_tree_leaves(*out.args)[joint.num_fwd_outputs:]
    backward_outputs = frozenset(x.name for x in leaves if isinstance(x, fx.Node))
    return NodeTable(tuple(rows), hints, backward_outputs)


def _row(joint: JointGraph, node: fx.Node, cost, view: bool,
         regather: frozenset[str]) -> NodeFacts:
    val = node.meta.get("val")
    path, types = _module_info(node)
    regathers = nodes.is_param_gather(node, regather)
    tag = node.meta.get("recompute")
    if regathers and "MUST_SAVE" in str(tag):  # AOTAutograd's tag on every collective
        tag = None
    packet = getattr(node.target, "overloadpacket", None)
    random, collective, side = nodes.is_random(node), nodes.is_collective(node), \
        nodes.side_effect(node)
    return NodeFacts(
        name=node.name,
        role=joint.roles[node.name],
        target=node.target if node.op == "call_function" else None,
        fw_computable=node.name in joint.fw_computable,
        nbytes=value_bytes(val),
        is_tensor=isinstance(val, torch.Tensor),
        is_sym=isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)),
        is_view=view,
        is_random=random,
        has_side_effect=bool(side),
        is_collective=collective,
        compute_intensive=packet in COMPUTE_INTENSIVE,
        flops=cost.flops,
        cost_s=cost.seconds,
        module_path=path,
        module_types=types,
        checkpoint_tag=tag,
        ban_reason=nodes.ban_reason(node, random, collective, side, regather),
        widens=_widens(node),
        can_save=nodes.may_be_saved(val),
        inputs=tuple(p.name for p in node.all_input_nodes),
        users=tuple(u.name for u in node.users if u.op != "output"),
        storage=nodes.storage_id(val),
        view_of=getattr(nodes.view_base(node), "name", ""),
        source=source_line(node.meta),
        regathers=regathers,
    )


def source_line(meta: dict) -> str:
    """``file.py:line`` of the innermost user frame of a node's ``stack_trace`` ("" if none)."""
    import re

    frames = re.findall(r'File "([^"]+)", line (\d+)', meta.get("stack_trace") or "")
    if not frames:
        return ""
    path, line = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"
