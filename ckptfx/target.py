"""Targets of the ``ckptfx`` command: which model to plan, built from what the user named.

A target is one of:

* a built-in name (:data:`BUILTINS`: ``gpt``, the demo's small GPT);
* ``package.module:factory``: a callable returning ``(model, example_inputs)``, where the
  inputs are a tensor, a tuple of positional arguments or a dict of keyword arguments;
* a transformers model type (``--hf llama``): the model built from its config with random
  weights, nothing downloaded.

:class:`Sizes` carries the size options (layers, width, seq, batch, vocab); the ones the user
gave are passed to a factory as keyword arguments.

Example:
    >>> from ckptfx.target import Sizes, build
    >>> model, inputs = build("gpt", Sizes(layers=1, width=64, seq=16, batch=2, vocab=128))
    >>> tuple(inputs[0].shape)
    (2, 16)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from ckptfx.errors import ConfigError

BUILTINS = ("gpt",)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Model and input sizes; None means "not given" (the target's default).

    Attributes:
        layers: transformer blocks.
        width: hidden size.
        seq: sequence length (tokens).
        batch: batch size (sequences).
        vocab: vocabulary size (tokens).
    """

    layers: int | None = None
    width: int | None = None
    seq: int | None = None
    batch: int | None = None
    vocab: int | None = None

    def given(self) -> dict[str, int]:
        """The sizes the user gave, by name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def get(self, name: str, default: int) -> int:
        value = getattr(self, name)
        return default if value is None else value


class TargetError(ConfigError):
    """A target that cannot be resolved or built (names it and says how to fix it)."""


def check_target(target: str | None, hf: str | None) -> None:
    """Checks the target's form before any work.

    Raises:
        TargetError: both or neither of a target and ``--hf``; or a target that is neither
            a built-in name nor ``module:factory``.
    """
    if target and hf:
        raise TargetError(f"give a TARGET or --hf, not both (got {target!r} and --hf {hf!r})")
    if not target and not hf:
        raise TargetError(f"no model: give a TARGET ({', '.join(BUILTINS)}, or "
                          f"package.module:factory) or --hf MODEL_TYPE")
    if target and target not in BUILTINS:
        mod, sep, attr = target.partition(":")
        if not sep or not mod or not attr:
            raise TargetError(
                f"target {target!r} is neither a built-in model ({', '.join(BUILTINS)}) nor "
                f"package.module:factory (a callable returning (model, example_inputs))")


def build(target: str | None, sizes: Sizes = Sizes(), hf: str | None = None) -> tuple[Any, Any]:
    """Builds (model, example_inputs) for a target; a transformers type (``hf``) is
    :func:`ckptfx.hf.build_hf`'s, which the caller runs (hf builds on this module).

    Args:
        target: a built-in name or ``package.module:factory``; None with ``hf``.
        sizes: size options; a factory gets the ones given as keyword arguments.
        hf: a transformers model type (``llama``, ``qwen2``, ``gpt2``, ...): checked here.

    Returns:
        (an nn.Module, its example inputs).

    Raises:
        TargetError: the module cannot be imported, the factory is missing, does not take
            the size options given, raises, or does not return (nn.Module, inputs).
    """
    check_target(target, hf)
    if hf:
        raise TargetError(f"--hf {hf!r}: build it with ckptfx.hf.build_hf")
    if target == "gpt":
        return _builtin_gpt(sizes)
    return _call_factory(target, sizes)


def _builtin_gpt(sizes: Sizes) -> tuple[Any, Any]:
    import torch

    from ckptfx.demo import GPTConfig, TinyGPT

    width = sizes.get("width", 256)
    cfg = GPTConfig(vocab=sizes.get("vocab", 4096), seq=sizes.get("seq", 128),
                    layers=sizes.get("layers", 4), width=width,
                    heads=max(1, width // 64), batch=sizes.get("batch", 8))
    if width % cfg.heads:
        raise TargetError(f"--width {width} is not a multiple of the head count {cfg.heads} "
                          f"(one head per 64 channels); use a multiple of 64")
    torch.manual_seed(0)
    return TinyGPT(cfg), (torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq)),)


def load_factory(target: str):
    """The callable named by ``package.module:factory`` (the current folder is searched
    first, as ``python -m`` does).

    Raises:
        TargetError: the module cannot be imported or has no such callable.
    """
    import os
    import sys

    mod_name, _, attr = target.partition(":")
    if mod_name.endswith(".py") or os.sep in mod_name:
        name = os.path.splitext(os.path.basename(mod_name))[0]
        raise TargetError(f"target {target!r}: give the module's import name, not a file path "
                          f"({name}:{attr}, run from the folder that holds {name}.py)")
    if os.getcwd() not in sys.path:  # as ``python -m`` does: the current folder's modules
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # a user module may fail in any way while importing
        raise TargetError(f"cannot import {mod_name!r} for target {target!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise TargetError(f"module {mod_name!r} has no {attr!r} (target {target!r})")
    if not callable(obj):
        raise TargetError(f"{target!r} is not callable; it must return (model, example_inputs)")
    return obj


def _call_factory(target: str, sizes: Sizes) -> tuple[Any, Any]:
    import torch

    factory = load_factory(target)
    kwargs = sizes.given()
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError:
        opts = ", ".join(f"--{k}" for k in kwargs)
        raise TargetError(f"{target} does not take {opts}: the size options are passed to the "
                          f"factory as keyword arguments; drop them or add those parameters"
                          ) from None
    except ValueError:  # no signature (a builtin): call it anyway
        pass
    try:
        result = factory(**kwargs)
    except Exception as exc:  # the user's code: report it in one line
        raise TargetError(f"{target} raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(result, tuple) and len(result) == 2
            and isinstance(result[0], torch.nn.Module)):
        raise TargetError(f"{target} returned {type(result).__name__}; it must return "
                          f"(model, example_inputs) with model an nn.Module")
    return result
