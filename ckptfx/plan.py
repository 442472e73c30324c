"""RematPlan: what is saved, what is recomputed, and why — plain data.

A plan names joint-graph nodes. ``saved`` are the values the forward returns for the
backward (tensors and SymInts); ``recomputed`` are forward nodes the backward computes again;
``decisions`` gives every candidate's action with a reason and the facts a report shows.
A plan is self-contained: it carries the size hints and the options it was made with, so
applying, simulating and reporting it never re-analyse the graph. Plans are compared in tests
(exact saved sets) and rendered by :mod:`ckptfx.report`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ckptfx.errors import PlanValidationError
from ckptfx.solvers.base import SolveProblem, needed_closure

if TYPE_CHECKING:
    from ckptfx.analysis.sizes import SizeHints
    from ckptfx.config import RematConfig


class Action(enum.Enum):
    """What a plan does with one candidate node."""

    SAVE = "save"  # the forward keeps it for the backward
    RECOMPUTE = "recompute"  # the backward computes it again
    BACKWARD = "backward"  # backward-native: computed in the backward, never in the forward
    FORWARD_ONLY = "forward_only"  # the backward does not need it


@dataclasses.dataclass(frozen=True)
class Decision:
    """One node's fate, why, and what the report shows of it.

    Attributes:
        action: an :class:`Action`.
        reason: why (a policy's or the solver's words).
        nbytes: what saving it counts against the budget (bytes; 0 for parameters, whose
            lifetime is the whole step anyway).
        op: the op's name ("" for a hand-built decision).
        module: the module path that produced it ("" if unknown).
        flops: FLOPs of one recompute (under the plan's hints).
        cost_s: cost-model seconds of one recompute.
        source: ``file.py:line`` of the code that produced it ("" if unknown).
        detail: what sets it apart: which backward ops read a saved value, or why it may
            not be recomputed; what a recomputed node is recomputed from.
    """

    action: Action
    reason: str
    nbytes: int = 0
    op: str = ""
    module: str = ""
    flops: int = 0
    cost_s: float = 0.0
    source: str = ""
    detail: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            raise PlanValidationError(
                f"Decision(action={self.action!r}): the action must be a ckptfx.plan.Action "
                f"({', '.join(a.name for a in Action)})")


@dataclasses.dataclass(frozen=True)
class RematPlan:
    """A rematerialization plan.

    Attributes:
        saved: names of saved values, in graph order.
        recomputed: names of forward nodes recomputed in the backward, in graph order.
        decisions: node name -> Decision for every candidate node.
        solver: the solver that produced it.
        saved_bytes: bytes of the saved set under the size hints.
        no_remat_bytes: bytes the plan that recomputes nothing would save.
        budget_bytes: the budget it was solved for (bytes), or None.
        feasible: False when the budget could not be met (closest plan).
        objective: the solver's objective (see Solution.objective).
        lower_bound: proven lower bound on the objective, or None.
        solve_time_s: seconds spent in the solver.
        notes: free-form facts for the report.
        fallback: why the pass fell back ("" if it did not).
        predicted_peak_bytes: the simulated peak the plan was chosen for (peak budgets), bytes.
        hints: the SizeHints its byte counts assumed (None for a hand-built plan: the graphs'
            own hints are used).
        config: the RematConfig it was made with (None for a hand-built plan).
    """

    saved: tuple[str, ...]
    recomputed: tuple[str, ...]
    decisions: Mapping[str, Decision]
    solver: str
    saved_bytes: int
    no_remat_bytes: int = 0
    budget_bytes: int | None = None
    feasible: bool = True
    objective: float = 0.0
    lower_bound: float | None = None
    solve_time_s: float = 0.0
    notes: tuple[str, ...] = ()
    fallback: str = ""
    predicted_peak_bytes: int | None = None
    hints: SizeHints | None = None
    config: RematConfig | None = None

    def validate(self, problem: SolveProblem) -> None:
        """Checks the plan against its problem (see Note [Validity of a saved set]).

        Raises:
            PlanValidationError: the saved set leaves a backward read uncomputable, recomputes
                a banned node, or disagrees with ``recomputed``.
        """
        recomputed, violations = needed_closure(problem, set(self.saved))
        nodes = problem.by_name()
        expected = tuple(n.name for n in problem.nodes
                         if n.name in recomputed and nodes[n.name].in_forward)
        if violations:
            raise PlanValidationError(
                f"plan from solver {self.solver!r} is invalid: " + "; ".join(violations[:10]))
        if set(expected) != set(self.recomputed):
            raise PlanValidationError(
                f"plan from solver {self.solver!r}: recomputed set {sorted(self.recomputed)} "
                f"differs from what the saved set implies {sorted(expected)}")
