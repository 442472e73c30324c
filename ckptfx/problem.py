"""The problem stage: NodeTable + policies -> votes -> SolveProblem (plain data, no fx).

Call tree::

    collect_votes(table, config)         Vote per forward node from the policies
    build_problem(table, joint, votes, config)
    ├── alias_votes(table, votes)        recompute votes extended to views of voted nodes
    └── repeated_blocks(table)           blocks -> layers: module paths (analysis/layers.py),
                                         else structure (analysis/repeats.py)

Everything here reads the :class:`~ckptfx.analysis.table.NodeTable` (facts, producers, users,
storage identity, topological order) and the JointGraph's plain-data fields
(``fw_computable``, ``static_input_names``); nothing reads the fx graph.
"""

from __future__ import annotations

from ckptfx.analysis.layers import find_blocks
from ckptfx.analysis.repeats import find_repeats
from ckptfx.analysis.table import NodeFacts, NodeTable
from ckptfx.config import RematConfig
from ckptfx.joint import JointGraph, Role
from ckptfx.policies import (
    Vote,
    VoteKind,
    checked_vote,
    resolve,
    respect_checkpoint_tags,
    strongest,
)
from ckptfx.solvers.base import Force, ProblemNode, SolveProblem

_RECOMPUTE_VOTES = (VoteKind.MUST_RECOMPUTE, VoteKind.PREFER_RECOMPUTE)


def collect_votes(table: NodeTable, config: RematConfig) -> dict[str, Vote]:
    """Runs the policy chain on every forward call node (``Role.FORWARD``).

    Backward-native nodes get no vote: they are computed in the backward by nature, and a
    MUST_SAVE there (``save_ops(aten.sin)`` matching the ``sin`` of ``cos``'s derivative)
    would move backward work into the forward and save it.

    The model's own ``torch.utils.checkpoint`` tags and the configured policy are combined
    with :class:`ckptfx.policies.strongest`: a MUST vote beats a PREFER vote, and between
    votes of equal strength the model's tag wins. So a user's ``save_ops`` still saves inside
    a plain checkpoint region (tagged PREFER_RECOMPUTE), and never overrides a MUST tag.
    """
    user = resolve(config.policy)
    policy = strongest(respect_checkpoint_tags(), *([user] if user is not None else []))
    votes = {}
    for row in table.rows:
        if row.role is Role.FORWARD and row.target is not None:
            vote = checked_vote(policy, row)
            if vote is not None:
                votes[row.name] = vote
    return votes


def alias_votes(table: NodeTable, votes: dict[str, Vote]) -> dict[str, Vote]:
    """Extends recompute votes to the views of the voted nodes that have no vote of their own.

    A view (``view``, ``expand``, ``getitem``; or a backward-native ``detach``/``t`` of a
    forward value) aliases its base: saving it keeps the very same memory, so a MUST_ or
    PREFER_RECOMPUTE vote on the base covers it too (else a solver optimising recompute
    cost under a budget could keep the value by another name).

    Returns:
        A new dict: ``votes`` plus the inherited votes (reason ``"alias of <base>: ..."``).
    """
    out = dict(votes)
    for row in table.rows:  # topological: a view's base has its inherited vote already
        if row.name in out or not row.fw_computable or not row.is_view:
            continue
        base = next((p for p in dict.fromkeys(row.inputs) if p in out), None)
        if base is not None and out[base].kind in _RECOMPUTE_VOTES:
            out[row.name] = Vote(out[base].kind, f"alias of {base}: {out[base].reason}")
    return out


def _constraints(row: NodeFacts, vote: Vote | None) -> tuple[Force | None, float, str]:
    """(force, prefer, reason) of one candidate from its facts and its vote."""
    reason = row.ban_reason
    force, prefer = None, 0.0
    if vote is not None:
        reason = vote.reason if not reason or vote.kind.is_must else reason
        if vote.kind is VoteKind.MUST_SAVE:
            force = Force.SAVE
        elif vote.kind is VoteKind.MUST_RECOMPUTE:
            force = Force.RECOMPUTE
        else:
            bias = 10.0 * row.cost_s + 1e-6
            prefer = bias if vote.kind is VoteKind.PREFER_SAVE else -bias
    elif row.widens:  # save the low-precision value, not its upcast copy too
        prefer = -(10.0 * row.cost_s + 1e-6)
        reason = reason or f"upcast of {row.widens}: cheaper to save the narrower value"
    return force, prefer, reason


def build_problem(table: NodeTable, joint: JointGraph, votes: dict[str, Vote],
                  config: RematConfig) -> SolveProblem:
    """Describes the forward-computable part of the joint graph as a SolveProblem.

    Args:
        table: the NodeTable of ``joint``.
        joint: the JointGraph (its ``fw_computable`` and ``static_input_names`` only).
        votes: the policies' votes (:func:`collect_votes`).
        config: options (``budget_kind``, ``time_limit_s``).
    """
    votes = alias_votes(table, votes)
    static_storages = {table[n].storage for n in joint.static_input_names if n in table} - {None}
    owners: dict[str, str] = {}  # node -> the node that owns its storage
    candidates = [r for r in table.rows if r.fw_computable
                  and (r.role is Role.PRIMAL or r.target is not None)]
    names = {r.name for r in candidates}
    nodes = []
    for row in candidates:
        force, prefer, reason = _constraints(row, votes.get(row.name))
        is_input = row.role is Role.PRIMAL
        in_forward = row.role in (Role.FORWARD, Role.PRIMAL)
        static = row.name in joint.static_input_names or row.storage in static_storages
        base = row.view_of
        owner = owners[row.name] = owners.get(base, row.name) if base in names else row.name
        nodes.append(ProblemNode(
            name=row.name,
            nbytes=0 if static else table.bytes_of(row.name),
            recompute_cost=row.cost_s if in_forward else 0.0,
            inputs=tuple(dict.fromkeys(p for p in row.inputs if p in names)),
            is_input=is_input,
            in_forward=in_forward,
            needed_by_backward=row.name in table.backward_outputs or any(
                not table[u].fw_computable for u in row.users),
            can_save=row.can_save,
            can_recompute=not is_input and not row.ban_reason,
            expensive=row.compute_intensive,
            force=force,
            prefer=prefer,
            reason=reason,
            storage_owner="" if owner == row.name else owner,
        ))
    blocks, source = repeated_blocks(table)
    layers = tuple(tuple(n for n in block.nodes if n in names) for block in blocks)
    return SolveProblem(nodes=tuple(nodes), budget_kind=config.effective_budget_kind,
                        time_limit_s=float(config.time_limit_s), layers=layers,
                        layers_from=source if layers else "")


def repeated_blocks(table: NodeTable) -> tuple[tuple, str]:
    """The graph's repeated blocks and where they were read from: ``"module paths"``
    (``nn_module_stack``, when the graph has them) or ``"structure"`` (repeated ops, sizes
    and wiring; Note [Structural repeats] in ``ckptfx/analysis/repeats.py``)."""
    blocks = find_blocks(table)
    if len(blocks) >= 2:
        return blocks, "module paths"
    return find_repeats(table), "structure"

