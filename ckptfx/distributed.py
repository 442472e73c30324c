"""ckptfx in torch.distributed programs: the wrap order DDP needs, and identical plans on
every rank.

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

import logging
from collections.abc import Callable
from typing import Any

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
