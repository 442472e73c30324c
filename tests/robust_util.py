"""Helpers of the robustness tiers: record and replay dropout masks, capture plans and
warnings. Training and comparing runs is :mod:`ckptfx.testing`'s."""

from __future__ import annotations

import contextlib
import logging
from typing import Any
from unittest import mock

import torch

import ckptfx


def fallbacks(backend: ckptfx.CkptBackend) -> list[str]:
    return [r.fallback for r in backend.reports if r.fallback]


@contextlib.contextmanager
def recorded_dropout():
    """Every ``F.dropout`` (``nn.Dropout`` and transformers' eager attention call it) draws
    its mask with ``aten.native_dropout`` and appends it to the yielded list. Under
    torch.compile the masks become outputs of the compiled forward: the masks it drew."""
    masks: list[torch.Tensor] = []

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return input
        out, mask = torch.ops.aten.native_dropout(input, p, True)
        masks.append(mask)
        return out

    with mock.patch.object(torch.nn.functional, "dropout", dropout):
        yield masks


@contextlib.contextmanager
def replayed_dropout(masks: list[torch.Tensor]):
    """``F.dropout`` multiplies by the given masks, in order: the reference a forward's own
    masks imply."""
    it = iter(masks)

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return input
        return input * next(it) * (1.0 / (1.0 - p))

    with mock.patch.object(torch.nn.functional, "dropout", dropout):
        yield


@contextlib.contextmanager
def warnings_of(caplog, logger: str = "ckptfx"):
    """Collects the WARNING records of ``logger`` during the block (a list, filled on exit)."""
    records: list[logging.LogRecord] = []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=logger):
        yield records
    records.extend(r for r in caplog.records if r.levelno >= logging.WARNING
                   and r.name.startswith(logger))


@contextlib.contextmanager
def captured_plans():
    """Yields a list that receives ``(joint, planned)`` for every graph ckptfx plans in the
    block (``planned`` is :class:`ckptfx.planner.Planned`: plan, problem, table, votes)."""
    import ckptfx.pipeline as pipeline

    seen: list[tuple[Any, Any]] = []
    original = pipeline.plan

    def spy(joint, config=None):
        planned = original(joint, config)
        seen.append((joint, planned))
        return planned

    with mock.patch.object(pipeline, "plan", spy):
        yield seen
