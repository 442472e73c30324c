"""Helpers of the robustness and zoo tiers: train a copy of a module for a few steps under a
backend, record and replay dropout masks, compare runs bit for bit."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Any, Callable
from unittest import mock

import torch

import ckptfx


@dataclasses.dataclass
class Step:
    """What one training step produced: loss, outputs, parameter grads, module state after."""

    loss: torch.Tensor
    out: Any
    grads: list
    state: dict


def default_loss(out: Any) -> torch.Tensor:
    """Sum of the mean squares of every floating tensor leaf of ``out`` (nested ok)."""
    if hasattr(out, "loss") and getattr(out, "loss") is not None:
        return out.loss
    leaves = [t for t in torch.utils._pytree.tree_leaves(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    return sum(t.float().pow(2).mean() for t in leaves)


def train(model: torch.nn.Module, backend: Any, inputs: Any, *, steps: int = 1, seed: int = 0,
          loss_fn: Callable[[Any], torch.Tensor] = default_loss, lr: float = 1e-2,
          autocast: torch.dtype | None = None, compile_kwargs: dict | None = None) -> list[Step]:
    """Trains a deep copy of ``model`` for ``steps`` SGD steps.

    Args:
        backend: a torch.compile backend, or None for eager.
        inputs: a tuple of positional inputs, or a dict of keyword inputs; tensors are cloned
            every step (so in-place mutation of an input does not leak between steps).
        seed: ``torch.manual_seed`` before the first step (dropout draws).
        autocast: run the forward under ``torch.autocast("cpu", dtype=autocast)``.
    """
    model = copy.deepcopy(model)
    fn = torch.compile(model, backend=backend, **(compile_kwargs or {})) if backend else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if params else None
    torch.manual_seed(seed)
    steps_out = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        args = _clone(inputs)
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            out = fn(**args) if isinstance(args, dict) else fn(*args)
        loss = loss_fn(out)
        loss.backward()
        steps_out.append(Step(loss.detach(), _detach(out), [p.grad for p in params],
                              {k: v.detach().clone() for k, v in model.state_dict().items()}))
        if opt is not None:
            opt.step()
    return steps_out


def _clone(x):
    return torch.utils._pytree.tree_map(
        lambda t: t.detach().clone().requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor) else t, x)


def _detach(x):
    return torch.utils._pytree.tree_map(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)


def assert_runs_bitwise(got: list[Step], ref: list[Step]) -> None:
    """Losses, grads and module state (buffers included) equal bit for bit, every step."""
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert torch.equal(g.loss, r.loss), f"step {i}: loss {g.loss} != {r.loss}"
        assert len(g.grads) == len(r.grads)
        for j, (a, b) in enumerate(zip(g.grads, r.grads)):
            if a is None or b is None:
                assert a is None and b is None, f"step {i}: grad {j} is None in one run only"
                continue
            assert torch.equal(a, b), f"step {i}: grad {j} differs by {(a - b).abs().max()}"
        for k in r.state:
            assert torch.equal(g.state[k], r.state[k]), f"step {i}: state {k} differs"


def assert_runs_close(got: list[Step], ref: list[Step], rtol=1e-4, atol=1e-6) -> None:
    """As :func:`assert_runs_bitwise`, to a tolerance (Inductor's kernels round differently)."""
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.loss, r.loss, rtol=rtol, atol=atol)
        for a, b in zip(g.grads, r.grads):
            if a is None or b is None:
                assert a is None and b is None
                continue
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        for k in r.state:
            torch.testing.assert_close(g.state[k], r.state[k], rtol=rtol, atol=atol)


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
    import ckptfx.planner as planner

    seen: list[tuple[Any, Any]] = []
    original = planner.plan

    def spy(joint, config=None):
        planned = original(joint, config)
        seen.append((joint, planned))
        return planned

    with mock.patch.object(planner, "plan", spy):
        yield seen
