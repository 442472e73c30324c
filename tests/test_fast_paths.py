"""The analysis's fast paths give what the general code gives: the pytree walks of
``ckptfx._torch_compat`` (Note [Fast pytree walks]) and static sizes in ``analysis/sizes.py``."""

from __future__ import annotations

import collections

import pytest
import sympy
import torch
import torch.utils._pytree as pytree
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ckptfx import _torch_compat as compat
from ckptfx.analysis.sizes import SizeHints, tensor_bytes

Pair = collections.namedtuple("Pair", "a b")
TREES = [
    None, 1, 2.5, "s", torch.float32, torch.device("cpu"), slice(1, 2), Ellipsis, [], (), {},
    (1, None, [2, 3.0, {"a": torch.ones(2), "b": (None,)}]),
    immutable_list([1, immutable_dict({"k": [1, 2]})]),
    Pair(1, [2, None]), collections.OrderedDict(a=1, b=(2, 3)), {"z": 1, "a": 2},
    collections.defaultdict(list, {"q": [1]}), collections.deque([1, (2,)]), torch.Size([1, 2]),
]


def _tag(v):
    return ("leaf", "tensor" if isinstance(v, torch.Tensor) else v)


@pytest.mark.parametrize("tree", TREES, ids=lambda t: type(t).__name__)
def test_walks_match_pytree(tree):
    want, got = pytree.tree_map(_tag, tree), compat.tree_map(_tag, tree)
    assert type(got) is type(want) and repr(got) == repr(want)
    want_leaves = [repr(v) for v in pytree.tree_leaves(tree)]
    assert [repr(v) for v in compat.tree_leaves(tree)] == want_leaves


def test_walks_of_fx_arguments_match_pytree():
    gm = torch.fx.symbolic_trace(lambda x: torch.cat([x, x.view(2, 2).sum(dim=[0])], dim=0))
    for node in gm.graph.nodes:
        args = (node.args, node.kwargs)
        assert repr(compat.tree_map(_tag, args)) == repr(pytree.tree_map(_tag, args))
        assert compat.tree_leaves(args) == pytree.tree_leaves(args)


def test_static_sizes_are_the_integers_of_the_general_path():
    t = torch.empty(3, 5, dtype=torch.float16)
    assert tensor_bytes(t) == sympy.Integer(30) and isinstance(tensor_bytes(t), sympy.Integer)
    hints = SizeHints()
    assert hints.concrete_shape(t) == (3, 5)
    assert hints.evaluate(sympy.Integer(7)) == 7 and type(hints.evaluate(sympy.Integer(7))) is int
    s = sympy.Symbol("s0")
    assert SizeHints({s: 4}).evaluate(2 * s) == 8


def test_partition_collects_only_new_objects_and_restores_the_collector():
    import gc

    from ckptfx.passes.partition import new_objects_collected

    class Cycle:
        pass

    assert gc.get_freeze_count() == 0 and gc.isenabled()
    with new_objects_collected():
        assert gc.get_freeze_count() > 0  # what existed before is out of reach
        garbage = Cycle()
        garbage.me = garbage
        probe = id(garbage)
        del garbage
        gc.collect()
        assert all(id(o) != probe for o in gc.get_objects() if isinstance(o, Cycle))
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    gc.disable()
    try:
        with new_objects_collected():  # the caller's choice stands
            assert gc.get_freeze_count() == 0 and not gc.isenabled()
    finally:
        gc.enable()
