"""Uniform solver: checkpoint every k-th repeated block, recompute the rest (Chen et al. 2016).

Chen, Xu, Zhang and Guestrin, "Training deep nets with sublinear memory cost" (2016): cut a
stack of ``n`` blocks into segments of ``k`` blocks, keep only each segment's input from the
forward, and recompute a segment's interior in the backward; ``k = sqrt(n)`` gives
``O(sqrt(n))`` memory for one extra forward.

Call tree::

    UniformSolver.solve(problem)
    ├── uniform_constraints(problem, k)   SolveProblem with forces added (pure data)
    │   ├── block_boundaries(problem, blocks)  per block, what it hands to the rest of the
    │   │                                      graph and what a checkpoint of it keeps
    │   └── _available(...)                     never force what could not be recomputed
    └── inner solver (min-cut, or the budget solver with a budget) plans the rest

Note [Uniform boundaries]
    ``problem.layers`` lists the repeated blocks in forward order (from
    :func:`ckptfx.analysis.layers.find_blocks`). The *boundary outputs* of a block are its
    forward nodes read by some forward node outside the block: for a residual stack, the
    residual stream it passes on (e.g. GPT-2's ``h.i`` output, ``batch x seq x hidden``).
    Blocks ``k-1, 2k-1, ...`` (0-based; ``floor(n/k)`` of them) are *checkpoints*: their
    boundary outputs are forced saved (``Force.SAVE``: never recomputed; saved when the
    backward needs them). Only those computed through one of the block's compute-intensive
    ops count (:func:`checkpoint_values`): a value a block derives from shared inputs alone,
    like the attention mask GPT-2's SDPA path builds in block 0 and every block reads, is
    recomputed like the interior instead of kept (a block without compute-intensive ops keeps
    all its boundary outputs). Every other forward node of every block is forced recomputed, and
    so is every backward-native node computed from one (e.g. a ``detach`` of an activation
    that only the backward reads), so no solver can save the interior by another name:
    segment ``j`` (blocks ``jk .. jk+k-1``) is rebuilt in the backward from checkpoint
    ``j-1``, or for ``j = 0`` from whatever the inner solver keeps of the first block's
    input. Nodes a block holds that may not be recomputed (random ops, side effects) and
    nodes that already carry a policy's MUST vote are left as they are. Nodes outside the
    blocks (embeddings, the head, the loss) are planned by the inner solver.

Note [Uniform saved bytes]
    For ``n`` blocks whose boundary output is one tensor of ``b`` bytes, every checkpoint is
    read by the backward (by the next segment's recompute, or by the head for the last
    block), so the plan saves ``floor(n / k) * b + c`` bytes, where ``c`` is what the inner
    solver keeps outside the blocks (the first block's input, the head's activations) and
    does not depend on ``k``. If nothing in the graph's backward reads the last block's
    output (the graph returns it), the last checkpoint is not saved when ``k`` divides ``n``.
    Cases: an MLP stack ``x -> n x (x + tanh(W x)) -> linear head`` with a non-parameter
    input ``x`` of ``b`` bytes saves ``(floor(n / k) + 1) * b`` (tests/test_uniform.py);
    GPT-2 (6 layers, hidden 384, batch 8, seq 256: ``b`` = 3 MiB) saves ``floor(6 / k) * 3
    MiB + 64 MiB``, the 64 MiB being the loss graph's ``batch x seq x vocab`` log-softmax
    (bench/policies_gpt2.py). Extra compute: each block's interior is recomputed once (what
    the backward reads and what that needs), about one forward pass of the blocks (Chen et
    al. 2016, section 4).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

from ckptfx.errors import ConfigError
from ckptfx.solvers.base import Force, ProblemNode, SolveProblem, Solution


MIN_INNER_S = 0.05  # seconds the inner solver gets even when the constraints used the limit


def default_k(n: int) -> int:
    """Chen et al.'s choice, ``round(sqrt(n))`` blocks per segment (at least 1)."""
    return max(1, int(round(math.sqrt(n))))


def boundary_outputs(problem: SolveProblem, block: tuple[str, ...]) -> tuple[str, ...]:
    """Names of the block's forward nodes read by a forward node outside the block.

    Args:
        problem: the problem (its nodes give the data edges).
        block: node names of one block.

    Returns:
        The boundary outputs, in problem order (see Note [Uniform boundaries]).
    """
    return block_boundaries(problem, (block,))[0][0]


def checkpoint_values(problem: SolveProblem, block: tuple[str, ...]) -> tuple[str, ...]:
    """The boundary outputs a checkpoint keeps: those computed through one of the block's
    compute-intensive (``expensive``) nodes, i.e. the activation stream; all boundary outputs
    if none is (a block of cheap ops). See Note [Uniform boundaries].
    """
    return block_boundaries(problem, (block,))[0][1]


def block_boundaries(problem: SolveProblem, blocks: tuple[tuple[str, ...], ...]
                     ) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per block, (:func:`boundary_outputs`, :func:`checkpoint_values`), found in one pass
    over the problem for all the blocks (disjoint blocks; overlapping ones are taken one at
    a time)."""
    owner: dict[str, int] = {}
    for b, block in enumerate(blocks):
        for name in block:
            if owner.setdefault(name, b) != b:
                return [block_boundaries(problem, (one,))[0] for one in blocks]
    read_outside: set[str] = set()
    heavy: set[str] = set()
    for node in problem.nodes:
        mine = owner.get(node.name)
        if node.in_forward:
            read_outside.update(i for i in node.inputs
                                if i in owner and owner[i] != mine)
        if mine is not None and (node.expensive or any(
                i in heavy and owner[i] == mine for i in node.inputs)):
            heavy.add(node.name)
    outputs: list[list[str]] = [[] for _ in blocks]
    for node in problem.nodes:
        if node.name in read_outside:
            outputs[owner[node.name]].append(node.name)
    return [(tuple(outs), tuple(o for o in outs if o in heavy) or tuple(outs))
            for outs in outputs]


@dataclasses.dataclass(frozen=True)
class UniformLayout:
    """What :func:`uniform_constraints` decided.

    Attributes:
        k: blocks per segment.
        checkpoints: per checkpoint block, its index and the boundary outputs it keeps.
        forced_save: names forced saved; forced_recompute: names forced recomputed.
    """

    k: int
    checkpoints: tuple[tuple[int, tuple[str, ...]], ...]
    forced_save: frozenset[str]
    forced_recompute: frozenset[str]


def _available(node: ProblemNode, forced_recompute: set[str], avail: dict[str, bool]) -> bool:
    """Whether the backward can obtain ``node``: saved, or recomputed from obtainable inputs."""
    if node.is_input:
        return True
    if node.can_save and node.force != Force.RECOMPUTE and node.name not in forced_recompute:
        return True
    recomputable = node.can_recompute or not node.in_forward
    return recomputable and node.force != Force.SAVE and all(avail.get(i, True) for i in node.inputs)


def uniform_constraints(problem: SolveProblem, k: int, keep_expensive: bool = False
                        ) -> tuple[SolveProblem, UniformLayout]:
    """Adds the uniform checkpointing constraints to a problem (pure data).

    Args:
        problem: a problem with ``layers`` (blocks in forward order).
        k: blocks per segment (>= 1).
        keep_expensive: never force a compute-bound node recomputed (``recompute_expensive=
            False`` binds every solver): the inner solver keeps it instead.

    Returns:
        (the constrained problem, the layout): see Note [Uniform boundaries]. A node is only
        forced recomputed when everything it reads stays obtainable in the backward, so the
        constraints never make a feasible problem infeasible.
    """
    layers = problem.layers
    bounds = block_boundaries(problem, layers)
    checkpoints = tuple((i, bounds[i][1]) for i in range(len(layers)) if (i + 1) % k == 0)
    save = {name for _, outs in checkpoints for name in outs}
    expensive: set[str] = set()
    if keep_expensive:  # and the members of one that returns a tuple (it cannot be saved)
        unsavable = {n.name for n in problem.nodes if n.expensive and not n.can_save}
        expensive = {n.name for n in problem.nodes
                     if n.expensive or any(i in unsavable for i in n.inputs)}
    in_blocks = {name for block in layers for name in block} - expensive
    block_of = {name: i for i, outs in checkpoints for name in outs}
    reasons = {name: f"uniform: checkpoint, output of block {block_of[name]} (one every {k} "
                     f"blocks)" for name in save}
    constrained, forced_save, forced_recompute = constrain_blocks(
        problem, save, in_blocks, reasons,
        f"uniform: inside a segment of {k} blocks, recomputed from its checkpoint")
    layout = UniformLayout(k, checkpoints, forced_save, forced_recompute)
    return constrained, layout


def constrain_blocks(problem: SolveProblem, save: set[str], interior: set[str],
                     save_reasons: dict[str, str], recompute_reason: str
                     ) -> tuple[SolveProblem, frozenset[str], frozenset[str]]:
    """Forces ``save`` saved and the rest of ``interior`` recomputed (pure data).

    A node keeps a constraint it already has (a policy's MUST vote, a primal); a node is
    forced saved only if it can be saved, and forced recomputed only when everything it
    reads stays obtainable in the backward, so the constraints never make a feasible problem
    infeasible. A backward-native node computed from a forced-recomputed node is forced
    recomputed too, so no solver can keep the interior by another name.

    Args:
        problem: the problem.
        save: names to force saved (forward nodes).
        interior: names to force recomputed unless in ``save``.
        save_reasons: per name of ``save``, the reason reports give.
        recompute_reason: the reason of every forced recompute.

    Returns:
        (the constrained problem, names forced saved, names forced recomputed).
    """
    forced_save: set[str] = set()
    forced_recompute: set[str] = set()
    avail: dict[str, bool] = {}
    for node in problem.nodes:
        free = node.force is None and not node.is_input
        inside = node.name in interior or (  # or backward-native, derived from the interior
            not node.in_forward and any(i in forced_recompute for i in node.inputs))
        if free and node.in_forward and node.name in save and node.can_save:
            forced_save.add(node.name)
        elif (free and inside and node.name not in save and node.can_recompute
              and all(avail.get(i, True) for i in node.inputs)):
            forced_recompute.add(node.name)
        avail[node.name] = _available(node, forced_recompute, avail)
    nodes = []
    for node in problem.nodes:
        if node.name in forced_save:
            node = node.forced(Force.SAVE, save_reasons[node.name])
        elif node.name in forced_recompute:
            node = node.forced(Force.RECOMPUTE, recompute_reason)
        nodes.append(node)
    return (dataclasses.replace(problem, nodes=tuple(nodes)), frozenset(forced_save),
            frozenset(forced_recompute))


class UniformSolver:
    """Checkpoints every k-th block's boundary outputs; an inner solver plans the rest.

    Args:
        layers_per_checkpoint: ``k``, blocks per segment; None means ``round(sqrt(n))``.
        inner: the solver for what the uniform constraints leave open: a registry name, or
            None for ``"mincut"``, or ``"budget"`` when the problem's budget is below the
            min-cut plan's saved bytes.
        recompute_expensive: passed to a built-in inner solver (it binds outside the blocks
            only: inside, the constraints recompute every op by a forced vote).

    Without blocks (``problem.layers`` empty: the graph has no module metadata or no
    repeated container) the inner solver plans the whole graph and the notes say so.

    Example:
        >>> from ckptfx.solvers.base import ProblemNode, SolveProblem
        >>> nodes = (ProblemNode("x", 4, 0.0, is_input=True),
        ...          ProblemNode("a", 4, 1.0, ("x",), needed_by_backward=True),
        ...          ProblemNode("b", 4, 1.0, ("a",)),
        ...          ProblemNode("c", 4, 1.0, ("b",), needed_by_backward=True))
        >>> p = SolveProblem(nodes, layers=(("a",), ("b",), ("c",)))
        >>> UniformSolver(layers_per_checkpoint=2).solve(p).saved
        ('x', 'b')
    """

    name = "uniform"

    def __init__(self, layers_per_checkpoint: int | None = None, inner: str | None = None,
                 recompute_expensive: bool = False, bind_expensive: bool = False) -> None:
        self.layers_per_checkpoint = layers_per_checkpoint
        self.inner = inner
        self.recompute_expensive = recompute_expensive
        self.bind_expensive = bind_expensive

    def _inner(self, problem: SolveProblem) -> tuple[str, Any, Solution | None]:
        """(name, solver, its solution if already known) for what the uniform constraints
        leave open. Without a configured inner solver: the min-cut, unless a budget is below
        the min-cut plan's bytes (then the budget solver): a budget the no-budget plan meets
        gives the no-budget plan (Note [A budget the no-budget plan meets] in planner.py)."""
        from ckptfx.solvers import registry
        from ckptfx.solvers.base import saved_bytes
        from ckptfx.solvers.mincut import MinCutSolver

        name, known = self.inner, None
        if name is None:
            name = "mincut"
            if problem.budget_bytes is not None:
                known = MinCutSolver(self.recompute_expensive).solve(problem)
                if saved_bytes(problem, known.saved) > problem.budget_bytes:
                    name, known = "budget", None
        options = ({"recompute_expensive": self.recompute_expensive}
                   if registry.is_builtin(name) and name != "uniform" else {})
        return name, registry.get(name, **options), known

    def solve(self, problem: SolveProblem) -> Solution:
        """Plans ``problem`` within ``problem.time_limit_s`` (the inner solver gets what the
        constraints leave of it)."""
        start = time.monotonic()
        if not problem.layers:
            inner_name, inner, known = self._inner(problem)
            solution = known or inner.solve(problem)
            note = (f"uniform: no repeated blocks found (the graph has no module paths of an "
                    f"indexed container such as layers.0, layers.1); {inner_name} planned the "
                    f"whole graph")
            logging.getLogger("ckptfx").warning("ckptfx: %s", note)
            return dataclasses.replace(solution, notes=(note,) + solution.notes)
        n = len(problem.layers)
        k = self.layers_per_checkpoint or default_k(n)
        if k > n:
            raise ConfigError(
                f"layers_per_checkpoint={k} exceeds the {n} repeated blocks of this graph; "
                f"allowed values: 1..{n} (or None for round(sqrt(n)))")
        constrained, layout = uniform_constraints(problem, k, keep_expensive=self.bind_expensive)
        inner_name, inner, known = self._inner(constrained)
        left = problem.time_limit_s - (time.monotonic() - start)
        solution = known or inner.solve(
            dataclasses.replace(constrained, time_limit_s=max(left, MIN_INNER_S)))
        reasons = dict(solution.reasons)
        for node in constrained.nodes:
            if node.name in layout.forced_save or node.name in layout.forced_recompute:
                reasons[node.name] = node.reason
        note = (f"uniform: k={k} blocks per segment over n={n} blocks, "
                f"{len(layout.checkpoints)} checkpoints; {inner_name} planned the rest")
        return dataclasses.replace(solution, reasons=tuple(reasons.items()),
                                   notes=(note,) + solution.notes)
