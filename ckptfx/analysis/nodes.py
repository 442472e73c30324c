"""What a joint-graph node is: the predicates every stage shares.

One module owns the facts about a node that decide what a plan may do with it, so the
table (:mod:`ckptfx.analysis.table`), CSE (:mod:`ckptfx.passes.cse`), the rewrite and its
verifier (:mod:`ckptfx.passes`) and the memory simulation (:mod:`ckptfx.memory`) never
disagree on what is a view, random, effectful, a collective or a data-dependent size:

* node kinds: :func:`is_view`, :func:`is_random`, :func:`side_effect`, :func:`is_mutation`,
  :func:`is_collective`, :func:`data_dependent_sizes`, :func:`storage_id`;
* the two availability rules: :func:`may_be_saved` (a value the forward may hand to the
  backward) and :func:`recompute_ban` (whether a node may run in the backward, "" if it
  may; :func:`is_param_gather` names the one collective an option lets it re-run);
  :func:`is_movable` is the rewrite's rule for a backward node it may re-place.

The solvers (torch-free) read the same facts as ``ProblemNode.can_save`` and
``ProblemNode.can_recompute``, which :mod:`ckptfx.problem` fills from these predicates.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ckptfx import _torch_compat as compat

_PURE_MODULES = ("_operator", "operator", "math", "torch.sym_node",
                 "torch.fx.experimental.sym_node")


def is_view(node: fx.Node) -> bool:
    """A view/alias op or a getitem: no data of its own to recompute."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    return compat.is_op_overload(node.target) and bool(getattr(node.target, "is_view", False))


def is_mutation(node: fx.Node) -> bool:
    """A call to an op whose schema writes one of its arguments (``copy_``, ``add_``)."""
    schema = compat.op_schema(node.target) if node.op == "call_function" else None
    return compat.is_op_overload(node.target) and schema is not None and schema.is_mutable


def side_effect(node: fx.Node) -> str:
    """Why running ``node`` has an effect beyond its value ("" if none). Randomness is
    :func:`is_random`'s call (an SDPA at ``dropout_p=0`` draws nothing)."""
    if node.op != "call_function":
        return ""
    target = node.target
    if compat.is_op_overload(target):
        if is_mutation(node):
            return f"{target} mutates its input"
        if node.is_impure(impure_random=False):
            return f"{target} is impure"
        return ""
    if target is operator.getitem or getattr(target, "__module__", "") in _PURE_MODULES:
        return ""
    if compat.is_higher_order_op(target):
        return f"higher-order op {target.name()} may have effects"
    if node.is_impure():
        return f"{target} is impure"
    if compat.is_sym_node(node):
        return ""
    return f"unknown callable {target!r}"


# Note [Random ops]
#     A random op draws from the generator's state, which the forward has advanced by the
#     time the backward runs: recomputing it draws a different mask. So every random op is
#     banned from recomputation (recompute_ban), in every solver, policy and budget; a policy
#     that demands it (MUST_RECOMPUTE) makes the plan infeasible and the safety net falls back,
#     to a partition that does not recompute it either. Inductor (fallback_random=False)
#     rewrites random ops into ``inductor_seeds`` (random: banned, so its few bytes are saved)
#     and ``inductor_random(seed)`` (deterministic in its seed): recomputing the latter replays
#     the forward's mask exactly. The invariants checker (passes/verify.py) applies the same
#     predicate to the emitted backward. Tests: tests/test_robustness.py.
_DROPOUT_ARGS = ("dropout_p", "p")


def has_random_tag(node: fx.Node) -> bool:
    """The op is tagged ``nondeterministic_seeded`` (it may draw random numbers)."""
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def is_random(node: fx.Node) -> bool:
    """Draws random numbers: tagged ``nondeterministic_seeded``, unless its dropout
    probability argument is a literal 0 (SDPA and dropout ops carry the tag either way).
    See Note [Random ops]."""
    if node.op != "call_function" or not has_random_tag(node):
        return False
    schema = compat.op_schema(node.target)
    if schema is None:
        return True
    for i, arg in enumerate(schema.arguments):
        if arg.name in _DROPOUT_ARGS:
            value = node.kwargs.get(arg.name, node.args[i] if i < len(node.args) else arg.default_value)
            return not (isinstance(value, (int, float)) and value == 0)
    return True


def is_collective(node: fx.Node) -> bool:
    """A distributed collective (functional or legacy c10d, DTensor redistribution)."""
    ns = getattr(node.target, "namespace", "") if node.op == "call_function" else ""
    return ns in ("_c10d_functional", "c10d_functional", "c10d", "_dtensor")


_GATHERS = frozenset({"all_gather_into_tensor"})
_WAITS = frozenset({"wait_tensor"})


def _collective_op(node: fx.Node) -> str:
    """The op name of a collective node (``all_gather_into_tensor``), "" for other nodes."""
    if not is_collective(node):
        return ""
    return node.target.name().split("::")[-1].split(".")[0]


# Note [Re-gathering parameters]
#     Sharded data parallelism traced into the graph (SimpleFSDP, traceable FSDP2, a function
#     calling ``_functional_collectives.all_gather_tensor`` on a parameter shard) all-gathers
#     each shard in the forward, and the backward reads the unsharded parameter: by default
#     it is saved, so every block's full weights stay alive from forward to backward.
#     ``RematConfig.regather_params`` trades that memory for communication, as Thunder's and
#     SimpleFSDP's users do: an all-gather whose only tensor inputs are parameters (static-
#     lifetime primals) and its ``wait_tensor`` may be recomputed, so the backward gathers
#     again and the solvers pay the gather's bytes over the link (``Machine.comm_bandwidth``).
#     Every rank recomputes the same gathers (plans depend only on graph and options), so
#     the extra collectives match across the group. AOTAutograd tags every collective
#     MUST_SAVE (``force_save_collectives``, the default this option lifts), so the table
#     drops that tag from these nodes and no policy reads it as the user's. Everything
#     else stays banned: a reduce-scatter or all-reduce, and an all-gather of an activation
#     (its input is not a parameter: re-running it would mean keeping what feeds it).
#     FSDP2 (``fully_shard``) on torch 2.13 puts no all-gather in any graph, whatever the
#     recipe: its hooks (``_pre_forward``, ``_pre_backward``, the post-backward) are wrapped
#     in ``torch._dynamo.disable`` unconditionally (``_fsdp_common._dynamo_disable``,
#     "skipping FSDP hooks"; the ``skip_fsdp_hooks`` config that let Dynamo trace them is
#     gone), so per-block and whole-model compiles alike hand the partitioner a block whose
#     unsharded parameters are graph inputs (primals, never saved: 0 bytes to trade), and
#     compiled autograd changes only the backward's capture. The trade is FSDP2's own there:
#     ``reshard_after_forward=True`` (its default) frees the unsharded parameters after the
#     forward and gathers them again in the backward's pre-hook. The option then notes that
#     the graph "all-gathers no parameter shard". Where the gather is in the graph
#     (SimpleFSDP-style functional collectives) the saved bytes fall by the unsharded
#     parameter bytes, measured on 2 gloo ranks (``tests/test_parallel.py``).
#     Tests: tests/test_regather.py.
def is_param_gather(node: fx.Node, params: frozenset[str]) -> bool:
    """An all-gather whose tensor inputs are all in ``params`` (parameter shards), or the
    ``wait_tensor`` of one. See Note [Re-gathering parameters].

    Args:
        node: a joint-graph node.
        params: names of the primals that are parameters (empty: nothing qualifies).
    """
    op = _collective_op(node) if params else ""
    if op in _WAITS:
        src = node.args[0] if node.args else None
        return isinstance(src, fx.Node) and is_param_gather(src, params)
    inputs = node.all_input_nodes
    return op in _GATHERS and bool(inputs) and all(p.name in params for p in inputs)


def is_wait(node: fx.Node) -> bool:
    """A ``wait_tensor``: it returns its collective's result and moves no data itself."""
    return _collective_op(node) in _WAITS


def data_dependent_sizes(node: fx.Node) -> tuple[str, ...]:
    """Names of the data-dependent (unbacked) size symbols ``node`` defines."""
    return compat.unbacked_symbols_defined_by(node)


def view_base(node: fx.Node) -> fx.Node | None:
    """The node whose storage a view op's value aliases (its first tensor argument), or None
    for a value with a storage of its own. ``getitem`` aliases only when its source does
    (``split``, ``unbind``); read from the op schema, not from fake storages, which a joint
    graph pass that re-propagates values does not keep shared."""
    if node.op != "call_function" or not node.args:
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return None
    if node.target is operator.getitem:
        return src if view_base(src) is not None else None
    if getattr(node.target, "is_view", False) is True:
        return src
    return None


def storage_id(val: Any) -> int | None:
    """Identity of the (fake) storage a tensor value lives in, or None (not a tensor, or a
    tensor without a storage)."""
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return id(val.untyped_storage())
    except (AttributeError, NotImplementedError, RuntimeError, TypeError):
        return None


def may_be_saved(val: Any) -> bool:
    """Availability rule 1: the forward may hand this value to the backward as it is (one
    tensor, or a SymInt/SymFloat/SymBool or Python scalar), not a tuple of them."""
    return isinstance(val, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool,
                            int, float, bool))


def recompute_ban(node: fx.Node, regather: frozenset[str] = frozenset()) -> str:
    """Availability rule 2: why ``node`` may never run (again) in the backward, "" if it may.

    The one predicate behind ``NodeFacts.ban_reason``, the invariants checker
    (``ckptfx.passes.verify``) and the safety net's check of PyTorch's partition.

    Args:
        node: a joint-graph node.
        regather: parameters whose all-gather (and its wait) may run again in the backward
            (``RematConfig.regather_params``; see Note [Re-gathering parameters]); empty by
            default: no collective is ever recomputed.
    """
    if node.op == "placeholder":
        return "graph input"
    return ban_reason(node, is_random(node), is_collective(node), side_effect(node), regather)


def ban_reason(node: fx.Node, random: bool, collective: bool, side: str,
               regather: frozenset[str] = frozenset()) -> str:
    """:func:`recompute_ban` of a call node whose :func:`is_random`, :func:`is_collective`
    and :func:`side_effect` are known (the table reads all four facts, each once);
    ``regather`` as in :func:`recompute_ban`."""
    if node.op == "placeholder":
        return "graph input"
    if random:
        return "random op (recomputing it would draw a different mask)"
    if collective and is_param_gather(node, regather):
        # fx calls wait_tensor impure and AOTAutograd tags every collective MUST_SAVE
        # (force_save_collectives): the option overrides both for these nodes only
        return ""
    if collective:
        return "collective (never recomputed: every rank must issue it once)"
    if side:
        return side
    defined = data_dependent_sizes(node)
    if defined:
        return (f"defines the data-dependent size {', '.join(defined)} (the backward receives "
                f"it as a saved SymInt; recomputing would define it again and sync the host)")
    tag = node.meta.get("recompute")
    if tag is not None and "MUST_SAVE" in str(tag):
        return "tagged MUST_SAVE"
    return ""


def is_movable(node: fx.Node, fw_computable: frozenset[str]) -> bool:
    """A backward node that depends on no tangent and may move to just before its first use:
    neither effectful nor random (moving a random op would reorder the RNG's draws; SDPA at
    dropout_p=0 draws nothing and moves, see :func:`is_random`)."""
    return (node.op == "call_function" and node.name in fw_computable
            and not node.is_impure(impure_random=False) and not is_random(node))
