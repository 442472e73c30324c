"""Options: parsing, validation and the errors users see."""

from __future__ import annotations

import dataclasses
import math

import pytest

from ckptfx import ConfigError, RematConfig
from ckptfx.config import MemoryBudget, parse_budget


@pytest.mark.parametrize("value, expected", [
    (0.5, MemoryBudget(fraction=0.5)),
    (0.0, MemoryBudget(fraction=0.0)),
    (1.0, MemoryBudget(fraction=1.0)),
    (4096, MemoryBudget(nbytes=4096)),
    ("512MiB", MemoryBudget(nbytes=512 * 2**20)),
    ("2GB", MemoryBudget(nbytes=2 * 10**9)),
    ("1.5 KiB", MemoryBudget(nbytes=1536)),
    ("1e6B", MemoryBudget(nbytes=10**6)),
    (None, None),
])
def test_budget_parsing(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("value, words", [
    (math.nan, "not finite"),
    (math.inf, "not finite"),
    (-0.1, "[0, 1]"),
    (1.5, "[0, 1]"),
    (-5, "negative"),
    (0, "ambiguous"),
    (1, "ambiguous"),
    (True, "bool"),
    ("lots", "not a size"),
    ("5 parsecs", "not a size"),
    ("0.5", "no unit"),
    ("1", "no unit"),
    ("1024", "no unit"),
    ([1], "type list"),
])
def test_bad_budgets_name_the_option(value, words):
    with pytest.raises(ConfigError, match="memory_budget") as info:
        parse_budget(value)
    assert words in str(info.value)


def test_budget_resolves_fraction_on_least_to_default_scale():
    # Note [Budget fractions]: 0 = least achievable, 1 = the no-budget plan, linear between
    assert MemoryBudget(fraction=0.25).resolve(200, 1000) == 400
    assert MemoryBudget(fraction=0.0).resolve(200, 1000) == 200
    assert MemoryBudget(fraction=1.0).resolve(200, 1000) == 1000
    assert MemoryBudget(nbytes=77).resolve(200, 1000) == 77


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        RematConfig.from_options({"memory_budjet": 0.5})
    msg = str(info.value)
    assert "'memory_budjet'" in msg and "memory_budget" in msg and "inner" in msg


@pytest.mark.parametrize("options, name", [
    ({"inner": "tvm"}, "inner"),
    ({"solver": "magic"}, "solver"),
    ({"budget_kind": "total"}, "budget_kind"),
    ({"cost_model": "vibes"}, "cost_model"),
    ({"strict": "yes"}, "strict"),
    ({"regather_params": 1}, "regather_params"),
    ({"layers_per_checkpoint": 0}, "layers_per_checkpoint"),
    ({"time_limit_s": -1}, "time_limit_s"),
    ({"time_limit_s": math.nan}, "time_limit_s"),
    ({"unbacked_size_hint": 0}, "unbacked_size_hint"),
    ({"policy": "no_such_policy"}, "policy"),
    ({"policy": 3}, "policy"),
])
def test_bad_values_name_option_and_allowed_values(options, name):
    with pytest.raises(ConfigError, match=name) as info:
        RematConfig.from_options(options)
    assert "allowed" in str(info.value)


def test_config_is_frozen_hashable_and_keyed():
    a = RematConfig.from_options({"memory_budget": 0.5, "inner": "eager"})
    b = RematConfig.from_options({"memory_budget": 0.5, "inner": "eager"})
    assert a == b and hash(a) == hash(b) and a.cache_key() == b.cache_key()
    assert a.cache_key() != RematConfig.from_options({"memory_budget": 0.4}).cache_key()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.inner = "inductor"


def test_auto_solver_choice():
    assert RematConfig().effective_solver == "mincut"
    assert RematConfig.from_options({"memory_budget": 0.5}).effective_solver == "budget"
    with pytest.raises(ConfigError, match="solver='mincut'"):  # takes no budget: said up front
        RematConfig.from_options({"solver": "mincut", "memory_budget": 0.5})


def test_coerce_accepts_dicts_and_rejects_others():
    assert RematConfig.coerce(None) == RematConfig()
    assert RematConfig.coerce({"inner": "eager"}) == RematConfig(inner="eager")
    with pytest.raises(ConfigError, match="allowed values"):
        RematConfig.coerce("eager")
    with pytest.raises(ConfigError, match="memory_budjet"):
        RematConfig.coerce({"memory_budjet": 0.5})


def test_a_registered_solver_is_selectable_by_name(monkeypatch):
    import torch

    import ckptfx
    from ckptfx.solvers import registry
    from ckptfx.solvers.mincut import MinCutSolver

    seen = []

    class Recording(MinCutSolver):
        def solve(self, problem):
            seen.append(len(problem.nodes))
            return super().solve(problem)

    monkeypatch.setattr(registry, "_REGISTERED", {})
    with pytest.raises(ConfigError, match="recording"):
        RematConfig(solver="recording")
    registry.register("recording", Recording)
    assert "recording" in ckptfx.config.solver_names()
    joint = ckptfx.trace_joint(lambda x: x.sin().cos().sum(), torch.randn(8, 8, requires_grad=True))
    plan = ckptfx.plan_remat(joint, {"solver": "recording"})
    assert plan.solver == "recording" and seen
