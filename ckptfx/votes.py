"""Votes: what a policy says about one node (plain data, no torch).

Split from :mod:`ckptfx.policies` so that built-in policies defined in other modules
(:mod:`ckptfx.selective`) can build votes without importing the policy registry; everything
here is re-exported by ``ckptfx.policies``, the public namespace.
"""

from __future__ import annotations

import dataclasses
import enum
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

    def __post_init__(self) -> None:
        if not isinstance(self.kind, VoteKind) or not isinstance(self.reason, str):
            raise ConfigError(
                f"Vote({self.kind!r}, {self.reason!r}): the kind must be a "
                f"ckptfx.policies.VoteKind (MUST_SAVE, PREFER_SAVE, MUST_RECOMPUTE, "
                f"PREFER_RECOMPUTE) and the reason a str, e.g. Vote(MUST_SAVE, 'why')")


MUST_SAVE, PREFER_SAVE = VoteKind.MUST_SAVE, VoteKind.PREFER_SAVE
MUST_RECOMPUTE, PREFER_RECOMPUTE = VoteKind.MUST_RECOMPUTE, VoteKind.PREFER_RECOMPUTE

Policy = Callable[[Any], "Vote | None"]
