"""Policies: small predicates that vote on whether a node is saved or recomputed.

A policy is called once per candidate node with its :class:`ckptfx.analysis.table.NodeFacts`
and returns a :class:`Vote` or None (no opinion). ``MUST_*`` votes become hard constraints of
every solver; ``PREFER_*`` votes become a soft bias (a weight in the min-cut, a cost term in
the budget solver) that a solver may overrule. Built-ins are frozen dataclasses, so they hash
and compile caches can compare them (the JAX ``jax.checkpoint_policies`` idea).

Built-ins (``options={"policy": name}`` or the object):

==========================  ===============================================================
``save_ops(*ops)``          save the outputs of these aten ops (overloads or packets)
``recompute_ops(*ops)``     recompute them
``save_modules(*globs)``    save what ran inside modules whose path matches a glob
``megatron_selective()``    save linear-layer outputs, recompute the attention core and
                            cheap ops (Korthikanti et al. 2022); name ``"megatron_selective"``
``uniform(k)``              checkpoint every k-th repeated block (Chen et al. 2016); a
                            structural policy that selects the uniform solver; ``"uniform"``
``respect_checkpoint_tags`` ``torch.utils.checkpoint`` / selective-checkpoint tags in the
                            model (always applied first by the planner)
``first_of(*ps)``           combinator: the first policy that votes decides
``strongest(*ps)``          combinator: any MUST beats any PREFER; first among equals
==========================  ===============================================================

A user policy is any callable ``NodeFacts -> Vote | None``; :func:`checked_vote` validates
what it returns, in one place.

Note [Structural policies]
    Some policies cannot be decided one node at a time: which nodes are the boundaries of
    every k-th transformer block depends on the whole graph. Such a policy votes on no
    node and instead names the solver that enforces it (``solver`` and
    ``solver_options()``); :func:`solver_request` finds it, also inside combinators, and
    the planner runs that solver, which plans what the policy leaves open with the
    configured solver (``"auto"``: min-cut, or the budget solver under ``memory_budget``).
    Such a solver takes the keyword ``inner`` (a registry name, or None for that default)
    besides the policy's ``solver_options()``; see :class:`ckptfx.solvers.uniform.UniformSolver`.

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
import fnmatch
import re
from collections.abc import Callable
from typing import Any, ClassVar

from ckptfx.errors import ConfigError
from ckptfx.selective import megatron_selective
from ckptfx.votes import (  # noqa: F401  (re-exported: the public namespace)
    MUST_RECOMPUTE,
    MUST_SAVE,
    PREFER_RECOMPUTE,
    PREFER_SAVE,
    Policy,
    Vote,
    VoteKind,
)


def _matches(target: Any, ops: tuple[Any, ...]) -> bool:
    """``target`` is one of ``ops``, or an overload of a packet among them."""
    if target is None:
        return False
    return target in ops or getattr(target, "overloadpacket", None) in ops


def _checked_ops(factory: str, ops: tuple[Any, ...]) -> tuple[Any, ...]:
    bad = [op for op in ops if isinstance(op, str) or not callable(op)]
    if bad:
        raise ConfigError(f"{factory}: {bad!r} are not ops; pass aten op overloads or packets, "
                          f"e.g. {factory}(torch.ops.aten.mm, torch.ops.aten.addmm.default)")
    return tuple(ops)


_TORCH_TAGS = {  # CheckpointPolicy name -> (vote, note); offloading is not modelled: saved
    "MUST_SAVE": (VoteKind.MUST_SAVE, ""),
    "PREFER_SAVE": (VoteKind.PREFER_SAVE, ""),
    "MUST_RECOMPUTE": (VoteKind.MUST_RECOMPUTE, ""),
    "PREFER_RECOMPUTE": (VoteKind.PREFER_RECOMPUTE, ""),
    "MUST_CPU_OFFLOAD": (VoteKind.MUST_SAVE, " (CPU offload is not modelled: saved instead)"),
    "PREFER_CPU_OFFLOAD": (VoteKind.PREFER_SAVE, " (CPU offload is not modelled: saved instead)"),
}


@dataclasses.dataclass(frozen=True)
class respect_checkpoint_tags:
    """Honours ``torch.utils.checkpoint`` regions and selective-checkpoint policies in the model.

    Under ``torch.compile``, every op inside a ``torch.utils.checkpoint.checkpoint`` region
    carries ``meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE``, and a
    ``create_selective_checkpoint_contexts`` policy's answers replace that per op (a bool
    answer means ``True -> MUST_SAVE``, ``False -> PREFER_RECOMPUTE``, torch's convention).
    AOTAutograd's ``cleanup_recompute_tags`` (run by ckptfx before planning) marks the
    output shared by two consecutive regions MUST_SAVE. This policy maps each tag to the
    vote of the same name: MUST_* become constraints, PREFER_* preferences, which the solver
    may overrule (PyTorch's own partitioner treats PREFER_RECOMPUTE as a must). A preference
    to recompute also lifts the min-cut's rule that keeps compute-intensive ops, so the
    matmuls of a checkpointed block are recomputed as in eager checkpointing. Offload tags
    become saves: ckptfx does not offload.
    """

    def __call__(self, facts) -> Vote | None:
        tag = facts.checkpoint_tag
        if tag is None:
            return None
        if isinstance(tag, bool):
            name = "MUST_SAVE" if tag else "PREFER_RECOMPUTE"
        else:
            name = getattr(tag, "name", str(tag)).upper().rsplit(".", 1)[-1]
        if name not in _TORCH_TAGS:
            return None
        kind, note = _TORCH_TAGS[name]
        return Vote(kind, f"torch.utils.checkpoint tag {name}{note}")


class _OpsPolicy:
    """Shared constructor of :class:`save_ops` and :class:`recompute_ops`."""

    def __init__(self, *ops: Any, prefer: bool = False) -> None:
        object.__setattr__(self, "ops", _checked_ops(type(self).__name__, ops))
        object.__setattr__(self, "prefer", prefer)


@dataclasses.dataclass(frozen=True, init=False)
class save_ops(_OpsPolicy):
    """MUST_SAVE (or PREFER_SAVE with ``prefer=True``) the outputs of these aten ops.

    Args:
        *ops: OpOverloads (``torch.ops.aten.mm.default``: that overload only) or
            OpOverloadPackets (``torch.ops.aten.mm``: every overload).
        prefer: vote PREFER_SAVE instead of MUST_SAVE.

    Raises:
        ConfigError: an argument is not an op (e.g. the string ``"mm"``).
    """

    ops: tuple[Any, ...] = ()
    prefer: bool = False

    def __call__(self, facts) -> Vote | None:
        if _matches(facts.target, self.ops):
            return Vote(PREFER_SAVE if self.prefer else MUST_SAVE, f"save_ops: {facts.op_name}")
        return None


@dataclasses.dataclass(frozen=True, init=False)
class recompute_ops(_OpsPolicy):
    """MUST_RECOMPUTE (or PREFER_RECOMPUTE with ``prefer=True``) the outputs of these ops.

    Args and Raises: as :class:`save_ops`. A MUST_RECOMPUTE on an op that may not be
    recomputed (a random op) makes planning fail with the offending path of nodes.
    """

    ops: tuple[Any, ...] = ()
    prefer: bool = False

    def __call__(self, facts) -> Vote | None:
        if _matches(facts.target, self.ops):
            kind = PREFER_RECOMPUTE if self.prefer else MUST_RECOMPUTE
            return Vote(kind, f"recompute_ops: {facts.op_name}")
        return None


_DYNAMO_ROOT = re.compile(r"^L\[[^\]]*\]\.?")  # Dynamo's "L['self']." path prefix


def _module_prefixes(path: str) -> list[str]:
    """The module path, its ancestors, and both again without Dynamo's ``L['self']`` root."""
    out = []
    for p in dict.fromkeys((path, _DYNAMO_ROOT.sub("", path))):
        parts = p.split(".")
        out.extend(".".join(parts[:i]) for i in range(len(parts), 0, -1))
    return [p for p in out if p]


@dataclasses.dataclass(frozen=True)
class save_modules:
    """MUST_SAVE (or PREFER_SAVE) the outputs of ops run inside modules matching a glob.

    A node is inside module ``m`` when its ``nn_module_stack`` path is ``m`` or below it; the
    globs are matched against that path and each ancestor, with and without Dynamo's
    ``L['self'].`` root, so ``"*.mlp"``, ``"*.mlp.*"`` and ``"transformer.h.0.*"`` all work.
    Views get no vote (they cost nothing to recompute and alias their base). Graphs traced
    without module metadata (``aot_function``) match nothing.

    Args:
        *patterns: ``fnmatch`` globs (case-sensitive) over module paths.
        prefer: vote PREFER_SAVE instead of MUST_SAVE.
    """

    patterns: tuple[str, ...] = ()
    prefer: bool = False

    def __init__(self, *patterns: str, prefer: bool = False) -> None:
        bad = [p for p in patterns if not isinstance(p, str)]
        if bad:
            raise ConfigError(f"save_modules{tuple(patterns)!r}: patterns must be str globs "
                              f"over module paths, e.g. save_modules('*.mlp.*'); got {bad!r}")
        object.__setattr__(self, "patterns", tuple(patterns))
        object.__setattr__(self, "prefer", prefer)

    def __call__(self, facts) -> Vote | None:
        path = facts.module_path
        if not path or not facts.is_tensor or facts.is_view:
            return None  # views cost nothing to recompute: they follow their base
        for candidate in _module_prefixes(path):
            if any(fnmatch.fnmatchcase(candidate, p) for p in self.patterns):
                kind = PREFER_SAVE if self.prefer else MUST_SAVE
                return Vote(kind, f"save_modules: inside {candidate}")
        return None


@dataclasses.dataclass(frozen=True)
class uniform:
    """Checkpoints every k-th repeated block and recomputes the rest (Chen et al. 2016).

    A structural policy (Note [Structural policies]): it votes on no node and selects the
    uniform solver (:class:`ckptfx.solvers.uniform.UniformSolver`), which finds the blocks
    from the graph's ``nn_module_stack`` paths, keeps the boundary outputs of blocks
    ``k-1, 2k-1, ...`` and recomputes everything else inside the blocks.

    Args:
        layers_per_checkpoint: ``k``; None uses ``RematConfig.layers_per_checkpoint``, and if
            that is None too, ``round(sqrt(n))`` for ``n`` blocks.

    Raises:
        ConfigError: ``layers_per_checkpoint`` is not None or an int >= 1.
    """

    layers_per_checkpoint: int | None = None
    solver: ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        k = self.layers_per_checkpoint
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"uniform(layers_per_checkpoint={k!r}): allowed values: None "
                              f"(round(sqrt(n))) or an int >= 1")

    def solver_options(self) -> dict[str, Any]:
        """Options for the uniform solver (only those set here)."""
        k = self.layers_per_checkpoint
        return {} if k is None else {"layers_per_checkpoint": k}

    def __call__(self, facts) -> Vote | None:
        return None  # structural: decided by the uniform solver over the whole graph


@dataclasses.dataclass(frozen=True)
class strongest:
    """Combinator: a MUST vote of any policy beats every PREFER vote; among votes of the same
    strength the first policy's wins. Use it to let a user's MUST_SAVE override a model's
    PREFER_RECOMPUTE checkpoint tag while keeping the tag where the user has no opinion."""

    policies: tuple[Any, ...] = ()

    def __init__(self, *policies: Any) -> None:
        object.__setattr__(self, "policies", tuple(resolve(p) for p in policies))

    def __call__(self, facts) -> Vote | None:
        preferred = None
        for p in self.policies:
            vote = checked_vote(p, facts)
            if vote is not None and vote.kind.is_must:
                return vote
            preferred = preferred or vote
        return preferred


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
    "megatron_selective": megatron_selective,
    "respect_checkpoint_tags": respect_checkpoint_tags,
    "uniform": uniform,
}

_ALLOWED = "or a callable(NodeFacts) -> Vote | None (see ckptfx.policies)"


def register_builtin(name: str, factory: Callable[[], Any]) -> None:
    """Adds a named policy usable as ``options={"policy": name}``.

    Args:
        name: the option value.
        factory: called with no arguments to build the policy (e.g. its class).
    """
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
                              f"{', '.join(sorted(BUILTIN))}, {_ALLOWED}")
        return BUILTIN[policy]()
    raise ConfigError(f"policy={policy!r} of type {type(policy).__name__} is not a policy; "
                      f"allowed values: {', '.join(sorted(BUILTIN))}, {_ALLOWED}")


def solver_request(policy: Any) -> tuple[str, dict[str, Any]] | None:
    """The solver a structural policy asks for (Note [Structural policies]), or None.

    Searches combinators' members in order; the first structural policy found decides.

    Returns:
        (solver name, solver options), e.g. ``("uniform", {"layers_per_checkpoint": 2})``.
    """
    policy = resolve(policy)
    if policy is None:
        return None
    name = getattr(policy, "solver", None)
    if isinstance(name, str):
        options = getattr(policy, "solver_options", dict)
        return name, dict(options())
    for member in getattr(policy, "policies", ()):
        found = solver_request(member)
        if found is not None:
            return found
    return None


def checked_vote(policy: Any, facts) -> Vote | None:
    """Calls ``policy(facts)`` and validates the result: the one chokepoint for user policies.

    Raises:
        ConfigError: the policy raised, or returned something other than a Vote or None;
            the message names the policy and the node and says how to build a Vote.
    """
    try:
        result = policy(facts)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"policy {policy!r} raised {type(exc).__name__}: {exc} on node {facts.name} "
            f"({facts.op_name}); a policy must accept any NodeFacts (placeholders have "
            f"target None, graphs without Dynamo have module_path '') and return None or a "
            f"Vote") from exc
    if result is None or isinstance(result, Vote):
        return result
    hint = ""
    if isinstance(result, bool):
        hint = " (a bool is ambiguous: return Vote(MUST_SAVE, ...) to save, None for no opinion)"
    elif isinstance(result, VoteKind):
        hint = f" (add a reason: Vote({result}, 'why'))"
    elif type(result).__name__ == "CheckpointPolicy":
        hint = (f" (a torch CheckpointPolicy: return the ckptfx vote of the same name, "
                f"Vote(VoteKind.{result.name}, 'why'))")
    raise ConfigError(
        f"policy {policy!r} returned {result!r} for node {facts.name} ({facts.op_name}){hint}; "
        f"a policy must return None or ckptfx.policies.Vote(kind, reason), e.g. "
        f"Vote(ckptfx.policies.MUST_SAVE, 'why')")
