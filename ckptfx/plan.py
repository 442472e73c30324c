"""RematPlan: what is saved, what is recomputed, and why — plain data, no torch.

A plan names joint-graph nodes. ``saved`` are the values the forward returns for the
backward (tensors and SymInts); ``recomputed`` are forward nodes the backward computes again;
``decisions`` gives every candidate's action with a reason. Plans are compared in tests
(exact saved sets) and rendered by :mod:`ckptfx.report`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ckptfx.errors import PlanValidationError
from ckptfx.solvers.base import SolveProblem, needed_closure

SAVE = "save"
RECOMPUTE = "recompute"
BACKWARD = "backward"  # backward-native: computed in the backward, never in the forward
FORWARD_ONLY = "forward_only"  # the backward does not need it


@dataclasses.dataclass(frozen=True)
class Decision:
    """One node's fate: ``action`` in {save, recompute, backward, forward_only}, and why.

    ``nbytes`` is what saving it counts against the budget (bytes; 0 for parameters, whose
    lifetime is the whole step anyway).
    """

    action: str
    reason: str
    nbytes: int = 0


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
        predicted_peak_bytes: the simulated peak the plan was chosen for (peak budgets), bytes.
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
