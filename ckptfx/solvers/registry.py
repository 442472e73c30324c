"""Solver registry: a name -> factory map, so config names and user solvers resolve one way.

Built-in solvers register lazily (their modules import scipy/networkx only when used).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ckptfx.errors import ConfigError
from ckptfx.solvers.base import Solver

_LAZY = {
    "mincut": ("ckptfx.solvers.mincut", "MinCutSolver"),
    "budget": ("ckptfx.solvers.budget", "BudgetSolver"),
    "greedy": ("ckptfx.solvers.knapsack", "GreedySolver"),
    "uniform": ("ckptfx.solvers.uniform", "UniformSolver"),
}
_REGISTERED: dict[str, Callable[..., Solver]] = {}


def register(name: str, factory: Callable[..., Solver]) -> None:
    """Registers a solver factory under ``name`` (overrides a built-in of the same name)."""
    _REGISTERED[name] = factory


def available() -> list[str]:
    """Every solver name, built-in or registered, sorted."""
    return sorted(set(_LAZY) | set(_REGISTERED))


def is_builtin(name: str) -> bool:
    """Whether ``name`` resolves to a built-in solver (not a registered factory), so it takes
    the built-ins' options (``recompute_expensive`` for mincut, budget, greedy, uniform)."""
    return name in _LAZY and name not in _REGISTERED


def get(name: str, **kwargs) -> Solver:
    """Instantiates the solver ``name``.

    Raises:
        ConfigError: unknown name (lists the available solvers).
    """
    if name in _REGISTERED:
        return _REGISTERED[name](**kwargs)
    if name not in _LAZY:
        raise ConfigError(f"solver={name!r} is not known; allowed values: {', '.join(available())}")
    module, cls = _LAZY[name]
    return getattr(importlib.import_module(module), cls)(**kwargs)
