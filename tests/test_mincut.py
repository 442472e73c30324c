"""The min-cut solver on hand-built problems: exact saved sets, tie-breaking, preferences,
and an impossible cut that explains itself as a path of nodes."""

from __future__ import annotations

import pytest

from ckptfx import ConfigError, UnsupportedGraphError
from ckptfx.solvers.base import Force, ProblemNode as N, SolveProblem, needed_closure
from ckptfx.solvers.mincut import MinCutSolver


def _solve(*nodes, **kw):
    return MinCutSolver(**kw).solve(SolveProblem(tuple(nodes)))


CASES = {
    # chain x -> a -> b, the backward reads a and b: one 4 B tensor instead of two; of x and
    # a (a tie) the later is kept, so only b is recomputed
    "chain": ((N("x", 4, 0, is_input=True), N("a", 4, 1, ("x",), needed_by_backward=True),
               N("b", 4, 1, ("a",), needed_by_backward=True)), ("a",)),
    # equal bytes: the later node wins (Note [Min-cut tie-breaking]) -> fewer recomputes
    "tie": ((N("x", 8, 0, is_input=True), N("a", 8, 1, ("x",)),
             N("b", 8, 1, ("a",), needed_by_backward=True)), ("b",)),
    # a wide intermediate is recomputed from its narrow input
    "narrow": ((N("x", 16, 0, is_input=True), N("up", 64, 1, ("x",)),
                N("act", 64, 1, ("up",), needed_by_backward=True)), ("x",)),
    # a random op may not be recomputed: its output is saved
    "banned": ((N("x", 4, 0, is_input=True),
                N("drop", 4, 1, ("x",), can_recompute=False, reason="random op"),
                N("y", 4, 1, ("drop",), needed_by_backward=True)), ("y",)),
    # a matmul is kept unless recompute_expensive
    "expensive": ((N("x", 2, 0, is_input=True), N("mm", 4, 9, ("x",), expensive=True),
                   N("y", 4, 1, ("mm",), needed_by_backward=True),
                   N("z", 4, 1, ("mm",), needed_by_backward=True)), ("mm",)),
    # MUST_SAVE: never recomputed, so saved although recomputing it from x is cheaper
    "must_save": ((N("x", 4, 0, is_input=True),
                   N("a", 64, 1, ("x",), needed_by_backward=True, force=Force.SAVE,
                     reason="save_ops"),
                   N("b", 4, 1, ("a",), needed_by_backward=True)), ("a",)),
    # a tuple cannot be saved: its getitems are
    "tuple": ((N("x", 4, 0, is_input=True),
               N("t", 8, 1, ("x",), can_save=False, can_recompute=False, reason="random"),
               N("g0", 4, 0, ("t",), needed_by_backward=True),
               N("g1", 4, 0, ("t",), needed_by_backward=True)), ("g0", "g1")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_saved_sets(name):
    nodes, saved = CASES[name]
    solution = _solve(*nodes)
    assert solution.saved == saved
    assert needed_closure(SolveProblem(nodes), set(saved))[1] == []


def test_recompute_expensive_allows_matmul_recompute():
    nodes, _ = CASES["expensive"]
    assert _solve(*nodes, recompute_expensive=True).saved == ("x",)


def test_prefer_is_soft():
    # PREFER_SAVE halves a's weight: a tie becomes a win ...
    tie = (N("x", 8, 0, is_input=True), N("a", 8, 1, ("x",), prefer=1.0),
           N("b", 8, 1, ("a",), needed_by_backward=True))
    assert _solve(*tie).saved == ("a",)
    # ... but a large byte difference overrules it
    big = (N("x", 8, 0, is_input=True), N("a", 64, 1, ("x",), prefer=1.0),
           N("b", 8, 1, ("a",), needed_by_backward=True))
    assert _solve(*big).saved == ("b",)


def test_impossible_cut_explains_itself_as_a_path():
    nodes = (N("x", 4, 0, is_input=True),
             N("t", 8, 1, ("x",), can_save=False, can_recompute=False, reason="random op"),
             N("g", 4, 0, ("t",), needed_by_backward=True, force=Force.RECOMPUTE,
               reason="recompute_ops: getitem"))
    with pytest.raises(UnsupportedGraphError) as info:
        _solve(*nodes)
    msg = str(info.value)
    assert "no finite cut" in msg
    for step in ("t.in (random op)", "t.out -> g.in (data dependency)",
                 "g.in -> g.out (recompute_ops: getitem)", "g.out -> __sink__ (read by the backward)"):
        assert step in msg, msg


def test_force_is_an_enum_not_a_string():
    with pytest.raises(ConfigError, match="Force"):
        N("a", 4, 1.0, force="save")
