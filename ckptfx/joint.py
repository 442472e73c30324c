"""JointGraph: AOTAutograd's joint forward+backward graph with the role of every node.

Roles (see :class:`Role`):

* ``primal``: a forward input (parameter, buffer or user input), placeholder ``primals_*``.
* ``tangent``: a backward input (gradient of a forward output), placeholder ``tangents_*``.
* ``forward``: computed by the forward graph (an ancestor of a forward output, or of an
  input mutation the forward must run: a ``copy_`` epilogue).
* ``backward``: everything else the backward graph computes (reads a tangent, or depends
  only on primals but only the backward needs it).
* ``output``: the joint graph's output node.
* ``other``: RNG seed/offset placeholders and backward state.

A node is *forward-computable* when it does not depend on any tangent: only those can be
saved for the backward, and only those are candidates for recomputation.

Example:
    >>> import torch, ckptfx
    >>> x = torch.randn(4, 4, requires_grad=True)
    >>> joint = ckptfx.trace_joint(lambda x: x.sin().cos().sum(), x)
    >>> sorted({r.value for r in joint.roles.values()}) # doctest: +NORMALIZE_WHITESPACE
    ['backward', 'forward', 'output', 'primal', 'tangent']
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from ckptfx import _torch_compat as compat


class Role(enum.Enum):
    PRIMAL = "primal"
    TANGENT = "tangent"
    FORWARD = "forward"
    BACKWARD = "backward"
    OUTPUT = "output"
    OTHER = "other"


@dataclasses.dataclass
class JointGraph:
    """A joint forward+backward graph and what each node is for.

    Attributes:
        gm: the joint GraphModule (AOTAutograd's: placeholders ``primals_*``/``tangents_*``,
            outputs = forward outputs then gradients of the primals).
        num_fwd_outputs: how many leading outputs belong to the forward.
        roles: node name -> Role.
        fw_computable: names of nodes that depend on no tangent (candidates to save).
        static_input_names: primals with static lifetime (parameters, buffers): saving them
            keeps nothing alive that would not be alive anyway.
        joint_inputs: the example inputs AOTAutograd traced with (may be fake), or None.
    """

    gm: fx.GraphModule
    num_fwd_outputs: int
    roles: dict[str, Role]
    fw_computable: frozenset[str]
    static_input_names: frozenset[str]
    joint_inputs: Any = None

    @classmethod
    def from_partition_args(
        cls,
        gm: fx.GraphModule,
        joint_inputs: Any,
        *,
        num_fwd_outputs: int,
        static_lifetime_input_indices: Sequence[int] | None = None,
    ) -> "JointGraph":
        """Builds a JointGraph from the arguments AOTAutograd passes to a partition_fn."""
        placeholders = gm.graph.find_nodes(op="placeholder")
        primals = [p for p in placeholders if compat.is_primal(p)]
        static = frozenset(
            primals[i].name for i in (static_lifetime_input_indices or []) if i < len(primals))
        roles, fw_computable = classify(gm.graph, num_fwd_outputs)
        return cls(gm, num_fwd_outputs, roles, fw_computable, static, joint_inputs)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def nodes_with(self, role: Role) -> list[fx.Node]:
        """The graph's nodes with this role, in graph order."""
        return [n for n in self.graph.nodes if self.roles[n.name] is role]

    def forward_outputs(self) -> list[fx.Node]:
        return forward_outputs(self.graph, self.num_fwd_outputs)


def forward_outputs(graph: fx.Graph, num_fwd_outputs: int) -> list[Any]:
    out = graph.find_nodes(op="output")[0]
    return compat.arg_tree_leaves(*out.args)[:num_fwd_outputs]


def _descendants(seeds: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(seeds)
    while stack:
        n = stack.pop()
        if n in seen or n.op == "output":
            continue
        seen.add(n)
        stack.extend(n.users)
    return seen


def _ancestors(seeds: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [s for s in seeds if isinstance(s, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def classify(graph: fx.Graph, num_fwd_outputs: int) -> tuple[dict[str, Role], frozenset[str]]:
    """Assigns a Role to every node and finds the forward-computable ones.

    Returns:
        (roles, fw_computable) keyed by node name.
    """
    placeholders = graph.find_nodes(op="placeholder")
    bw_seeds = [p for p in placeholders
                if compat.is_tangent(p) or compat.is_bwd_seed_offset(p)
                or compat.is_backward_state(p)]
    bw_seeds += [n for n in graph.nodes if n.op != "placeholder" and compat.must_be_in_backward(n)]
    tangent_dependent = _descendants(bw_seeds)
    # Input and buffer mutations (copy_ epilogues: BatchNorm's running statistics) have no
    # users, but the forward runs them, once: they and what they copy are forward nodes.
    epilogues = [n for n in graph.nodes if n.op == "call_function"
                 and n not in tangent_dependent and compat.must_be_in_forward(n)]
    forward = _ancestors(forward_outputs(graph, num_fwd_outputs) + epilogues) - tangent_dependent
    roles: dict[str, Role] = {}
    for n in graph.nodes:
        if n.op == "output":
            roles[n.name] = Role.OUTPUT
        elif n.op == "placeholder":
            if compat.is_primal(n):
                roles[n.name] = Role.PRIMAL
            elif compat.is_tangent(n):
                roles[n.name] = Role.TANGENT
            else:
                roles[n.name] = Role.OTHER
        elif n in forward:
            roles[n.name] = Role.FORWARD
        else:
            roles[n.name] = Role.BACKWARD
    fw_computable = frozenset(
        n.name for n in graph.nodes
        if n.op != "output" and n not in tangent_dependent
        and roles[n.name] in (Role.PRIMAL, Role.FORWARD, Role.BACKWARD))
    return roles, fw_computable


def trace_joint(fn_or_module: Callable[..., Any], *example_inputs: Any) -> JointGraph:
    """Traces ``fn_or_module(*example_inputs)`` to AOTAutograd's joint forward+backward graph.

    For an ``nn.Module`` its parameters and buffers become the leading primals (and count as
    static-lifetime inputs); for a function, the example inputs that require grad get
    gradients.

    Args:
        fn_or_module: a function of tensors, or an ``nn.Module``.
        *example_inputs: real tensors; at least one input or parameter must require grad.

    Returns:
        The JointGraph (its ``gm`` carries fake-tensor ``meta["val"]`` on every node).

    Raises:
        UnsupportedGraphError: nothing requires grad, so there is no backward to plan.
    """
    from functorch.compile import aot_function, aot_module, make_boxed_func

    from ckptfx.errors import UnsupportedGraphError

    captured: list[JointGraph] = []

    def capture(gm, joint_inputs, *, num_fwd_outputs, **kwargs):
        captured.append(JointGraph.from_partition_args(
            gm, joint_inputs, num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=kwargs.get("static_lifetime_input_indices")))
        from functorch.compile import default_partition

        return default_partition(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs)

    def nop(gm, _inputs):
        return make_boxed_func(gm)

    if isinstance(fn_or_module, torch.nn.Module):
        n_params = len(list(fn_or_module.parameters())) + len(list(fn_or_module.buffers()))
        compiled = aot_module(fn_or_module, fw_compiler=nop, bw_compiler=nop,
                              partition_fn=capture)
    else:
        n_params = 0
        compiled = aot_function(fn_or_module, fw_compiler=nop, bw_compiler=nop,
                                partition_fn=capture)
    compiled(*example_inputs)
    if not captured:
        raise UnsupportedGraphError(
            "trace_joint: no joint graph was traced because no input or parameter requires "
            "grad; pass inputs with requires_grad=True or a module with trainable parameters")
    joint = captured[-1]
    if n_params and not joint.static_input_names:
        primals = joint.nodes_with(Role.PRIMAL)
        joint.static_input_names = frozenset(p.name for p in primals[:n_params])
    return joint

