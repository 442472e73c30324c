"""Policies: small predicates that vote on whether a node is saved or recomputed.

A policy is called once per candidate node with its :class:`ckptfx.analysis.table.NodeFacts`
and returns a :class:`Vote` or None (no opinion). ``MUST_*`` votes become hard constraints of
every solver; ``PREFER_*`` votes become a soft bias (a weight in the min-cut, a cost term in
the budget solver) that a solver may overrule. Built-ins are frozen dataclasses, so they hash
and compile caches can compare them (the JAX ``jax.checkpoint_policies`` idea).

Example:
    >>> import torch
    >>> from ckptfx import policies
    >>> p = policies.first_of(policies.save_ops(torch.ops.aten.mm), policies.respect_checkpoint_tags())
    >>> hash(p) == hash(policies.first_of(policies.save_ops(torch.ops.aten.mm),
    ...                                   policies.respect_checkpoint_tags()))
    True
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
from collections.abc import Callable
from typing import Any

from ckptfx.errors import ConfigError


class VoteKind(enum.Enum):
    MUST_SAVE = "must_save"
    PREFER_SAVE = "prefer_save"
    MUST_RECOMPUTE = "must_recompute"
    PREFER_RECOMPUTE = "prefer_recompute"

    @property
    def is_must(self) -> bool:
        return self in (VoteKind.MUST_SAVE, VoteKind.MUST_RECOMPUTE)

    @property
    def is_save(self) -> bool:
        return self in (VoteKind.MUST_SAVE, VoteKind.PREFER_SAVE)


@dataclasses.dataclass(frozen=True)
class Vote:
    """A policy's vote on one node: what, and why (the reason lands in the report)."""

    kind: VoteKind
    reason: str


MUST_SAVE, PREFER_SAVE = VoteKind.MUST_SAVE, VoteKind.PREFER_SAVE
MUST_RECOMPUTE, PREFER_RECOMPUTE = VoteKind.MUST_RECOMPUTE, VoteKind.PREFER_RECOMPUTE

Policy = Callable[[Any], "Vote | None"]


def _packets(ops: tuple[Any, ...]) -> frozenset[Any]:
    return frozenset(getattr(op, "overloadpacket", op) for op in ops)


@dataclasses.dataclass(frozen=True)
class respect_checkpoint_tags:
    """Honours ``torch.utils.checkpoint`` regions and selective-checkpoint policies in the model.

    Nodes inside a checkpoint region carry ``meta["recompute"]`` (a ``CheckpointPolicy``):
    ``MUST_SAVE``/``PREFER_SAVE``/``MUST_RECOMPUTE``/``PREFER_RECOMPUTE``; this maps them to
    votes of the same name.
    """

    def __call__(self, facts) -> Vote | None:
        tag = facts.checkpoint_tag
        if tag is None:
            return None
        name = getattr(tag, "name", str(tag)).upper()
        for kind in VoteKind:
            if kind.name == name or name.endswith(kind.name):
                return Vote(kind, f"torch.utils.checkpoint tag {kind.name}")
        return None


@dataclasses.dataclass(frozen=True)
class save_ops:
    """MUST_SAVE (or PREFER_SAVE with ``prefer=True``) the outputs of these aten ops.

    Args:
        *ops: OpOverloads or OpOverloadPackets (``torch.ops.aten.mm``).
    """

    ops: tuple[Any, ...] = ()
    prefer: bool = False

    def __init__(self, *ops: Any, prefer: bool = False) -> None:
        object.__setattr__(self, "ops", tuple(ops))
        object.__setattr__(self, "prefer", prefer)

    def __call__(self, facts) -> Vote | None:
        target = facts.target
        if target in self.ops or getattr(target, "overloadpacket", None) in _packets(self.ops):
            return Vote(PREFER_SAVE if self.prefer else MUST_SAVE, f"save_ops: {facts.op_name}")
        return None


@dataclasses.dataclass(frozen=True)
class recompute_ops:
    """MUST_RECOMPUTE (or PREFER_RECOMPUTE with ``prefer=True``) the outputs of these ops."""

    ops: tuple[Any, ...] = ()
    prefer: bool = False

    def __init__(self, *ops: Any, prefer: bool = False) -> None:
        object.__setattr__(self, "ops", tuple(ops))
        object.__setattr__(self, "prefer", prefer)

    def __call__(self, facts) -> Vote | None:
        target = facts.target
        if target in self.ops or getattr(target, "overloadpacket", None) in _packets(self.ops):
            kind = PREFER_RECOMPUTE if self.prefer else MUST_RECOMPUTE
            return Vote(kind, f"recompute_ops: {facts.op_name}")
        return None


@dataclasses.dataclass(frozen=True)
class save_modules:
    """Saves the outputs of ops that ran inside modules whose path matches a glob.

    Args:
        *patterns: ``fnmatch`` globs over the module path, e.g. ``"*.mlp.*"``, ``"h.0.*"``.
    """

    patterns: tuple[str, ...] = ()
    prefer: bool = False

    def __init__(self, *patterns: str, prefer: bool = False) -> None:
        object.__setattr__(self, "patterns", tuple(patterns))
        object.__setattr__(self, "prefer", prefer)

    def __call__(self, facts) -> Vote | None:
        path = facts.module_path
        if path and any(fnmatch.fnmatchcase(path, p) for p in self.patterns):
            return Vote(PREFER_SAVE if self.prefer else MUST_SAVE, f"save_modules: {path}")
        return None


@dataclasses.dataclass(frozen=True)
class first_of:
    """Combinator: the first policy that votes decides."""

    policies: tuple[Any, ...] = ()

    def __init__(self, *policies: Any) -> None:
        object.__setattr__(self, "policies", tuple(resolve(p) for p in policies))

    def __call__(self, facts) -> Vote | None:
        for p in self.policies:
            vote = checked_vote(p, facts)
            if vote is not None:
                return vote
        return None


BUILTIN: dict[str, Callable[[], Any]] = {
    "respect_checkpoint_tags": respect_checkpoint_tags,
}


def register_builtin(name: str, factory: Callable[[], Any]) -> None:
    """Adds a named policy usable as ``options={"policy": name}``."""
    BUILTIN[name] = factory


def resolve(policy: Any) -> Any:
    """Turns a policy option into a policy callable.

    Args:
        policy: None, a built-in name (a key of :data:`BUILTIN`), or a callable taking
            NodeFacts and returning a Vote or None.

    Raises:
        ConfigError: an unknown name (lists the allowed names) or a non-callable.
    """
    if policy is None or callable(policy):
        return policy
    if isinstance(policy, str):
        if policy not in BUILTIN:
            raise ConfigError(f"policy={policy!r} is not a built-in policy; allowed values: "
                              f"{', '.join(sorted(BUILTIN))}, or a callable(NodeFacts) -> Vote | None")
        return BUILTIN[policy]()
    raise ConfigError(f"policy={policy!r} of type {type(policy).__name__} is not a policy; "
                      f"allowed values: {', '.join(sorted(BUILTIN))}, or a "
                      f"callable(NodeFacts) -> Vote | None")


def checked_vote(policy: Any, facts) -> Vote | None:
    """Calls ``policy(facts)`` and validates the result: the one chokepoint for user policies.

    Raises:
        ConfigError: the policy returned something other than a Vote or None; the message
            says how to build a Vote.
    """
    result = policy(facts)
    if result is None or isinstance(result, Vote):
        return result
    raise ConfigError(
        f"policy {policy!r} returned {result!r} for node {facts.name}; a policy must return "
        f"None or ckptfx.policies.Vote(kind, reason), e.g. "
        f"Vote(ckptfx.policies.MUST_SAVE, 'why')")
