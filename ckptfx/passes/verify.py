"""Invariants of emitted forward/backward graphs, checked after every rewrite.

1. Both graphs lint (well-formed, topologically ordered).
2. The forward reads no tangent and computes no tangent-dependent node.
3. The backward's saved-tensor inputs are exactly the plan's saved tensors.
4. The forward nodes the backward computes are exactly the plan's recomputed nodes, and none
   of them may not be recomputed: a random op, a side effect, a collective, a node that
   defines a data-dependent size (:func:`ckptfx.analysis.nodes.recompute_ban`, the predicate the
   planner uses too).
5. Every recomputed node sits just before its first use: between it and its first user
   there are only other tangent-independent nodes.
"""

from __future__ import annotations

import torch.fx as fx

from ckptfx import _torch_compat as compat
from ckptfx.analysis.nodes import is_movable, recompute_ban
from ckptfx.analysis.table import regather_from
from ckptfx.errors import PlanValidationError
from ckptfx.joint import JointGraph, Role
from ckptfx.plan import RematPlan


def _fail(what: str, nodes) -> None:
    names = sorted(nodes)[:12]
    raise PlanValidationError(f"{what}: {', '.join(names)}{' ...' if len(nodes) > 12 else ''}")


def verify(joint: JointGraph, plan: RematPlan, fw: fx.GraphModule, bw: fx.GraphModule) -> None:
    """Checks invariants 1-5 above.

    Raises:
        PlanValidationError: names the invariant and the offending nodes.
    """
    fw.graph.lint()
    bw.graph.lint()
    roles = joint.roles
    fw_tangents = [n.name for n in fw.graph.find_nodes(op="placeholder") if compat.is_tangent(n)]
    if fw_tangents:
        _fail("forward graph reads tangents", fw_tangents)
    bad_fw = [n.name for n in fw.graph.nodes
              if n.op == "call_function" and n.name in roles and n.name not in joint.fw_computable]
    if bad_fw:
        _fail("forward graph computes tangent-dependent nodes", bad_fw)

    by_name = {n.name: n for n in joint.graph.nodes}
    plan_tensors = {s for s in plan.saved if not compat.is_sym_node(by_name[s])}
    bw_inputs = {n.name for n in bw.graph.find_nodes(op="placeholder")}
    bw_saved_tensors = {n for n in bw_inputs
                        if n in by_name and roles[n] in (Role.FORWARD, Role.PRIMAL, Role.BACKWARD)
                        and not compat.is_sym_node(by_name[n])}
    if bw_saved_tensors != plan_tensors:
        _fail("backward's saved inputs differ from the plan (extra or missing)",
              bw_saved_tensors ^ plan_tensors)

    recomputed = {n.name for n in bw.graph.nodes
                  if n.op == "call_function" and roles.get(n.name) is Role.FORWARD}
    if recomputed != set(plan.recomputed):
        _fail("backward recomputes a different set than the plan",
              recomputed ^ set(plan.recomputed))
    regather = regather_from(joint, plan.config is not None and plan.config.regather_params)
    banned = {name: recompute_ban(by_name[name], regather) for name in recomputed}
    banned = {name: why for name, why in banned.items() if why}
    if banned:
        _fail("recomputed in the backward although it may not be (random op, side effect, "
              "collective, data-dependent size)",
              [f"{name} ({why})" for name, why in sorted(banned.items())])
    _check_just_in_time(bw, joint.fw_computable)


def _check_just_in_time(bw: fx.GraphModule, fw_computable: frozenset[str]) -> None:
    order = {n: i for i, n in enumerate(bw.graph.nodes)}
    nodes = list(bw.graph.nodes)
    late = []
    for n in nodes:
        if not is_movable(n, fw_computable) or not n.users:
            continue  # an effectful or random node keeps its place
        first = min(order[u] for u in n.users)
        between = nodes[order[n] + 1:first]
        if any(m.op != "call_function" or m.name not in fw_computable for m in between):
            late.append(n.name)
    if late:
        _fail("recomputed nodes not placed just before their first use", late)
