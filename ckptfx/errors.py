"""Exceptions raised by ckptfx.

Every error says what failed, on which nodes or option, why, and how to fix it::

    CkptfxError
    ├── ConfigError (also a ValueError)   an unknown option or a bad value
    ├── UnsupportedGraphError             a graph the pass cannot plan safely
    ├── InfeasibleBudgetError             no plan meets the memory budget (strict mode)
    ├── PlanValidationError               a plan or emitted graph broke an invariant
    └── RankMismatchError                 ranks of a process group planned a graph differently
"""

from __future__ import annotations


class CkptfxError(Exception):
    """Base class of every ckptfx error."""


class ConfigError(CkptfxError, ValueError):
    """An option is unknown or its value is not allowed.

    The message names the option, the value given and the allowed values.
    """


class UnsupportedGraphError(CkptfxError):
    """The joint graph holds something the pass cannot plan safely (names the nodes)."""


class InfeasibleBudgetError(CkptfxError):
    """No plan fits the memory budget.

    Attributes:
        budget_bytes: the budget asked for, in bytes.
        smallest_bytes: the smallest figure any valid plan reaches, in bytes.
    """

    def __init__(self, message: str, *, budget_bytes: int, smallest_bytes: int) -> None:
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.smallest_bytes = smallest_bytes


class PlanValidationError(CkptfxError):
    """A plan, or the graphs emitted for it, broke one of the invariants of the pass."""


class RankMismatchError(CkptfxError):
    """``verify_ranks=True``: the ranks of the default process group planned one graph
    differently (names the graph, the ranks and the first differing decision).

    Attributes:
        graph_id: the graph's number in the reports.
        differences: ``(node, decision on rank 0, decision on the other rank)`` for every
            differing decision, sorted by node name.
    """

    def __init__(self, message: str, *, graph_id: int,
                 differences: tuple[tuple[str, str, str], ...]) -> None:
        super().__init__(message)
        self.graph_id = graph_id
        self.differences = differences
