"""A chain of repeated blocks: one option per block, least recompute under a peak, exactly.

Nothing here imports torch. The search above it (:mod:`ckptfx.peak_budget`) measures a
:class:`ChainModel` from simulated plans and turns an assignment back into a plan.

Call tree::

    solve_chain(model, target)       least cost assignment whose model peak <= target
    ├── _stage(front, i, ...)        one block: extend every state by every option, prune
    least_chain_peak(model)          the least model peak any assignment reaches
    chain_peak(model, assignment)    the model's peak of one assignment

Note [Chain model]
    This is the chain of Rotor (Beaumont, Eyraud-Dubois, Herrmann, Joly, Shilova,
    "Optimal checkpointing for heterogeneous chains", 2019) and of Rockmate (Zhao et al.,
    ICML 2023, which solves each block's graph exactly and then the chain), restricted to
    what one compiled step runs: the forward once, then the backward once, each block
    choosing what it keeps. Blocks run forward in order 0..n-1 and backward in reverse. A
    block under option ``o`` keeps ``saved[o]`` bytes from its forward to its backward and
    recomputes ``cost[o]`` (cost-model seconds). While block ``i`` runs, forward or backward,
    the values blocks ``0..i-1`` keep are alive and everything else depends on block ``i``'s
    own option only, so the peak of the step is::

        peak = max(base, max_i (excess[o_i][i] + sum_{j<i} saved[o_j]))

    ``excess[o][i]`` is the most bytes live while block ``i`` runs under option ``o``
    beyond what earlier blocks keep (the block's working set, what later blocks hand back
    such as parameter gradients, and for the last block the head and loss); ``base`` what
    the step holds outside every block's run (the embeddings' forward). The model is
    measured, not assumed: :mod:`ckptfx.peak_budget` simulates the plan giving every block
    the same option and reads ``excess`` off its timeline.

    The dynamic program walks the blocks in order with states (bytes kept so far, cost so
    far); a state whose next block would exceed the target is dropped, and of the states
    left only the Pareto-optimal ones (no other state keeps fewer bytes at no more cost)
    carry on: fewer bytes kept can only lower every later block's peak. The result is the
    least-cost assignment within the model, exact; the number of states is bounded by the
    distinct byte totals (for identical blocks with K options, ``C(i + K - 1, K - 1)``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockOption:
    """One option of one block of the chain (Note [Chain model]).

    Attributes:
        name: e.g. ``"keep"``, ``"checkpoint"``, ``"selective 2"``.
        saved: bytes the block keeps from its forward to its backward.
        cost: recompute cost of the block, cost-model seconds.
        excess: bytes live while the block runs beyond what earlier blocks keep.
    """

    name: str
    saved: float
    cost: float
    excess: float


@dataclasses.dataclass(frozen=True)
class ChainModel:
    """Per block, its options (Note [Chain model]); ``base``: bytes live outside every
    block's run. Option 0 of every block is ``keep`` and option 1 ``checkpoint``."""

    blocks: tuple[tuple[BlockOption, ...], ...]
    base: float = 0.0

    @classmethod
    def uniform(cls, names, saved, cost, excess, base: float = 0.0) -> "ChainModel":
        """A chain whose blocks share their options' names, bytes and costs; ``excess[o][i]``
        is option ``o``'s excess at block ``i``."""
        n = len(excess[0])
        return cls(tuple(tuple(BlockOption(names[o], saved[o], cost[o], excess[o][i])
                               for o in range(len(names))) for i in range(n)), base)


def chain_peak(model: ChainModel, assignment: tuple[int, ...]) -> float:
    """The model's peak (bytes) of ``assignment`` (an option index per block)."""
    peak, kept = model.base, 0.0
    for options, o in zip(model.blocks, assignment):
        peak = max(peak, options[o].excess + kept)
        kept += options[o].saved
    return peak


def chain_cost(model: ChainModel, assignment: tuple[int, ...]) -> float:
    """Total recompute cost (cost-model seconds) of ``assignment``."""
    return sum(options[o].cost for options, o in zip(model.blocks, assignment))


def _stage(front: list[tuple[float, float, tuple[int, ...]]], options: tuple[BlockOption, ...],
           target: float) -> list[tuple[float, float, tuple[int, ...]]]:
    """Extends every state by every option of one block that fits, keeps the Pareto set."""
    grown = []
    for kept, cost, chosen in front:
        for o, option in enumerate(options):
            if option.excess + kept <= target:
                grown.append((kept + option.saved, cost + option.cost, chosen + (o,)))
    grown.sort(key=lambda s: (s[0], s[1], s[2]))
    out: list[tuple[float, float, tuple[int, ...]]] = []
    for state in grown:  # by bytes kept: keep a state only if it is cheaper than all before
        if not out or state[1] < out[-1][1]:
            out.append(state)
    return out


def solve_chain(model: ChainModel, target: float) -> tuple[int, ...] | None:
    """The least-cost assignment whose model peak is at most ``target`` (Note [Chain model]).

    Args:
        model: the ChainModel.
        target: the peak bound, bytes.

    Returns:
        An option index per block, or None when no assignment fits. Ties go to the
        assignment that keeps fewer bytes, then to the lexicographically first.

    Example:
        >>> m = ChainModel.uniform(("keep", "checkpoint"), saved=(10, 1), cost=(0, 5),
        ...                        excess=((12, 12, 12), (20, 20, 20)))
        >>> [solve_chain(m, t) for t in (40, 31, 23, 21, 19)]
        [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), None]
    """
    if model.base > target:
        return None
    front: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for options in model.blocks:
        front = _stage(front, options, target)
        if not front:
            return None
    return min(front, key=lambda s: (s[1], s[0], s[2]))[2]


def least_chain_peak(model: ChainModel, rel_tol: float = 1e-4) -> float:
    """The least model peak any assignment reaches (bytes), to ``rel_tol``: a bisection on
    the target of :func:`solve_chain` between the base and the best uniform assignment."""
    n = len(model.blocks)
    uniform = [chain_peak(model, (o,) * n) for o in range(min(len(b) for b in model.blocks))]
    lo, hi = model.base, min(uniform)
    while hi - lo > rel_tol * max(hi, 1.0):
        mid = (lo + hi) / 2
        if solve_chain(model, mid) is None:
            lo = mid
        else:
            hi = mid
    return hi
