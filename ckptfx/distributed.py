"""ckptfx in torch.distributed programs: the wrap order DDP needs (Note [DDP wrap order]),
and identical plans on every rank (Note [Identical decisions on every rank]).

Note [DDP wrap order]
    ``DDP(torch.compile(model, backend="ckpt"))`` compiles the model's graphs inside DDP's
    forward; Dynamo's DDP optimizer splits them at gradient-bucket boundaries and ckptfx
    plans each bucket's graph (one byte budget for all of them, Note [One byte budget per
    model]). ``torch.compile(DDP(model), backend="ckpt")`` depends on the wrapped module
    (torch 2.13): Dynamo graph-breaks on DDP's forward (``_inside_ddp_forward`` is skipped),
    then compiles the wrapped module's ``forward`` as a frame of its own, through the DDP
    optimizer, when that forward is user code (a GPT class: planned, bucketed, correct);
    when it is a torch.nn container (``nn.Sequential``), Dynamo skips torch's own frames and
    no graph is made: the model runs eagerly, unplanned, and nothing of ckptfx runs. So the
    backend watches Dynamo's compiles (:func:`watch_compiled_ddp`): when a frame compiled
    under a ``torch.compile(DDP(...))`` with a ckptfx backend ends with no graph made, a
    forward hook on the DDP module checks again when its forward returns, and if still no
    graph was made, one warning names the recipe that always works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from ckptfx.errors import RankMismatchError

log = logging.getLogger("ckptfx")

_WATCHING: list[Any] = []  # [graphs_made] once installed
_WARNED: set[int] = set()

DDP_RECIPE = ('DDP(torch.compile(model, backend="ckpt")) -- compile the model, then wrap it '
              'in DistributedDataParallel')


def watch_compiled_ddp(graphs_made: Callable[[Any, dict], int | None]) -> None:
    """Installs (once per process) the check of Note [DDP wrap order].

    Args:
        graphs_made: ``(backend, kwargs) -> `` the graphs a ckptfx backend has been handed so
            far, or None for another library's backend (``kwargs``: what torch.compile calls
            a string backend with, ``options=``).
    """
    if _WATCHING:
        return
    from ckptfx import _torch_compat as compat

    _WATCHING.append(graphs_made)
    compat.on_dynamo_compile_end(_check_compiled_ddp)


def _ckpt_graphs_made(backend: Any, kwargs: dict) -> int | None:
    return _WATCHING[0](backend, kwargs)


def _check_compiled_ddp() -> None:
    """After a frame compiled under ``torch.compile(DDP(...))`` with a ckptfx backend that
    has made no graph: check again once DDP's forward returns (inner frames compile while it
    runs), and warn then if still none."""
    from ckptfx import _torch_compat as compat

    try:
        found = compat.compiled_ddp_on_stack()
    except Exception:  # a check must never break a compile
        return
    for module, backend, kwargs in found:
        if id(module) in _WARNED or _ckpt_graphs_made(backend, kwargs) != 0:
            continue
        _WARNED.add(id(module))
        handle = []
        check = compat.dynamo_disable(lambda *_: _after_forward(handle, backend, kwargs))
        handle.append(module._orig_mod.register_forward_hook(check, always_call=True))


def _after_forward(handle: list, backend: Any, kwargs: dict) -> None:
    handle.pop().remove()
    if _ckpt_graphs_made(backend, kwargs) == 0:
        log.warning(
            "ckptfx: torch.compile(DistributedDataParallel(model), backend='ckpt') compiled no "
            "graph: Dynamo did not trace into DDP's forward (a torch.nn container such as "
            "nn.Sequential as the wrapped module is never compiled as a frame of its own), so "
            "the model runs eagerly and nothing is checkpointed. Use %s (Note [DDP wrap "
            "order] in ckptfx/distributed.py)", DDP_RECIPE)


# Note [Identical decisions on every rank]
#     A plan is a function of the graph and the options only: the cost model is the roofline
#     (``cost_model="profile"`` times ops on rank 0's numbers only, see
#     ``planner.rank_safe_cost_model``), solvers break ties by node order, and the peak
#     search is deterministic. ``verify_ranks=True`` checks it where it matters: after the
#     backend plans a graph, every rank all-gathers a fingerprint of its decisions (the
#     saved and recomputed nodes, the fallback, the options); on a mismatch the decision
#     lists are gathered too and a RankMismatchError names the first differing node. The
#     check runs per graph the backend is handed, so every rank must compile the same graphs
#     in the same order (which DDP and FSDP already require); a graph served from Inductor's
#     cache is checked on its restored report.

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_NEITHER = "neither saved nor recomputed"


def plan_decisions(reports: list, options_key: str) -> dict[str, str]:
    """A graph's decisions as ``node -> "saved" | "recomputed"``, plus ``"<fallback>"``
    (why the graph fell back, "" if it did not) and ``"<options>"`` (the options, with
    object addresses removed so that equal options compare equal across processes)."""
    decisions = {"<options>": _ADDRESS.sub("", options_key),
                 "<fallback>": " | ".join(r.fallback for r in reports)}
    for r in reports:
        decisions.update((s.name, "saved") for s in r.saved)
        decisions.update((c.name, "recomputed") for c in r.recomputed)
    return decisions


def plan_fingerprint(decisions: dict[str, str]) -> str:
    """A sha256 of :func:`plan_decisions` (hex, 16 characters)."""
    blob = json.dumps(sorted(decisions.items())).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def verify_same_plan(graph_id: int, decisions: dict[str, str]) -> str:
    """Compares one graph's plan across the default process group (Note [Identical
    decisions on every rank]).

    Args:
        graph_id: the graph's number on this rank (named in the error).
        decisions: this rank's :func:`plan_decisions`.

    Returns:
        The plan's fingerprint (equal on every rank); "" without an initialized group.

    Raises:
        RankMismatchError: a rank's plan differs from rank 0's: the error names the rank, the
            graph and the first differing node, and carries every difference.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        log.warning("ckptfx: verify_ranks=True but torch.distributed has no initialized "
                    "process group; graph %d is not compared across ranks", graph_id)
        return ""
    mine = plan_fingerprint(decisions)
    prints: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(prints, mine)
    if all(p == prints[0] for p in prints):
        return mine
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, decisions)
    other = next(r for r, p in enumerate(prints) if p != prints[0])
    diffs = _differences(everyone[0], everyone[other])
    node, on0, onr = diffs[0]
    options = "; ".join(f"{k[len('option '):]}={a} on rank 0, {b} on rank {other}"
                        for k, a, b in diffs if k.startswith("option "))
    raise RankMismatchError(
        f"verify_ranks: graph {graph_id} is planned differently on rank 0 and rank {other}: "
        f"{node!r} is {on0} on rank 0 and {onr} on rank {other} (first of {len(diffs)} "
        f"differing decisions, by node name)"
        f"{'; the options differ: ' + options if options else ''}. "
        f"Plans depend only on the graph and the options: "
        f"pass the same options on every rank, and make the compiled code and input shapes "
        f"the same on every rank (no rank-dependent branches or sizes)",
        graph_id=graph_id, differences=diffs)


def _differences(a: dict[str, str], b: dict[str, str]) -> tuple[tuple[str, str, str], ...]:
    """Differing decisions: nodes by name first, then the fallback, then each differing
    option (``"option memory_budget"``)."""
    special = ("<fallback>", "<options>")
    nodes = sorted((set(a) | set(b)) - set(special))
    out = [(k, a.get(k, _NEITHER), b.get(k, _NEITHER)) for k in nodes]
    out.append(("<fallback>", a.get("<fallback>", ""), b.get("<fallback>", "")))
    opts = [dict(p.split("=", 1) for p in d.get("<options>", "").split(";") if "=" in p)
            for d in (a, b)]
    out += [(f"option {k}", opts[0].get(k, "unset"), opts[1].get(k, "unset"))
            for k in sorted(set(opts[0]) | set(opts[1]))]
    return tuple(d for d in out if d[1] != d[2])
