"""A budget binds on every solver and on the whole model, and nothing runs silently.

* a solver that cannot take a budget is a ConfigError, and every plan is checked against
  its budget (an unmet one warns, or raises with ``strict=True``);
* a byte budget is the model's: graphs split by a graph break share it
  (Note [One byte budget per model] in ``ckptfx/ledger.py``), measured;
* options that would do nothing, a user policy's failure and a compile served from
  Inductor's cache are reported, not swallowed.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import ckptfx
from ckptfx.backend import ckpt_backend
from ckptfx.errors import ConfigError, InfeasibleBudgetError
from ckptfx.testing import saved_tensor_bytes

from robust_util import warnings_of

MIB = 2 ** 20


def mlp(layers: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(256, 256), nn.GELU())],
                         nn.Linear(256, 1))


X = torch.randn(512, 256)


class TwoGraphs(nn.Module):
    """Two MLPs with a graph break between them: Dynamo makes two graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = mlp(3), mlp(3)

    def forward(self, x):
        h = self.a[:-1](x)
        torch._dynamo.graph_break()
        return self.b(h)


def run(model: nn.Module, backend, x=X) -> int:
    """One training step; returns the bytes autograd kept for the backward (measured)."""
    m = copy.deepcopy(model)
    fn = torch.compile(m, backend=backend)
    out, nbytes = saved_tensor_bytes(lambda: fn(x), exclude=list(m.parameters()))
    out.sum().backward()
    return nbytes


def _config_error(exc_info) -> ConfigError:
    exc = exc_info.value
    inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    assert isinstance(inner, ConfigError), repr(exc)
    return inner


# ---- every solver ---------------------------------------------------------------------------

def test_mincut_with_a_budget_is_a_config_error():
    with pytest.raises(ConfigError) as info:  # when the backend is made, before any compile
        ckptfx.CkptBackend(inner="eager", solver="mincut", memory_budget="1MiB")
    msg = str(info.value)
    assert "solver='mincut'" in msg and "'budget'" in msg


@pytest.mark.parametrize("solver", ["auto", "budget", "greedy", "uniform"])
def test_budget_solvers_keep_the_budget_or_say_so(solver, caplog):
    # 1 MiB needs the matmuls recomputed: recompute_expensive=False would forbid it
    backend = ckptfx.CkptBackend(inner="eager", solver=solver, memory_budget="1MiB",
                                 budget_kind="saved", recompute_expensive=True,
                                 **({"policy": "uniform"} if solver == "uniform" else {}))
    with warnings_of(caplog) as warns:
        measured = run(mlp(), backend)
    (report,) = backend.reports
    assert report.saved_bytes == measured
    if report.feasible:
        assert measured <= MIB
    else:  # the uniform layout cannot go below its checkpoints: it says so
        assert solver == "uniform" and measured > MIB
        assert any("cannot be met" in w.getMessage() for w in warns)


def test_an_unmet_budget_raises_when_strict():
    backend = ckptfx.CkptBackend(inner="eager", policy="uniform", memory_budget="1MiB",
                                 strict=True)
    with pytest.raises(Exception) as info:
        run(mlp(), backend)
    exc = getattr(info.value, "inner_exception", None) or info.value
    assert isinstance(exc, InfeasibleBudgetError)


# ---- the whole model ------------------------------------------------------------------------

def test_a_byte_budget_is_shared_by_the_graphs_of_a_model():
    # graph 1 keeps all it needs (3 MiB, nothing recomputed); graph 2 gets what is left
    backend = ckptfx.CkptBackend(inner="eager", memory_budget="3.5MiB", budget_kind="saved",
                                 recompute_expensive=True)
    measured = run(TwoGraphs(), backend)
    assert len(backend.reports) == 2
    assert all(r.feasible for r in backend.reports)
    assert measured == sum(r.saved_bytes for r in backend.reports) <= 3.5 * MIB
    assert backend.reports[1].budget_bytes == int(3.5 * MIB) - backend.reports[0].saved_bytes
    assert backend.reports[1].saved_bytes < backend.reports[1].saved_bytes_no_remat
    assert any("is the model's" in n for n in backend.reports[1].notes)


def test_a_model_budget_too_small_for_its_second_graph_warns(caplog):
    # graphs are planned in the order they first run: graph 1 takes the budget, graph 2
    # cannot fit in what is left, and the warning says so with the model's figure
    backend = ckptfx.CkptBackend(inner="eager", memory_budget="1MiB")
    with warnings_of(caplog) as warns:
        measured = run(TwoGraphs(), backend)
    assert measured > MIB and not backend.reports[1].feasible
    assert any("is the model's" in w.getMessage() and str(measured) in w.getMessage()
               for w in warns)


def test_a_recompiled_graph_replaces_its_entry():
    backend = ckptfx.CkptBackend(inner="eager", memory_budget="1MiB")
    model = mlp()
    run(model, backend)
    torch._dynamo.reset()
    run(model, backend)  # the same graph again: not a second graph of the model
    assert len(backend.ledger) == 1
    assert [r.budget_bytes for r in backend.reports] == [MIB, MIB]


def test_string_backend_shares_the_budget_across_graphs_of_one_compile():
    options = {"inner": "eager", "memory_budget": "3.5MiB", "recompute_expensive": True}
    measured = run(TwoGraphs(), lambda gm, inputs: ckpt_backend(gm, inputs, options))
    assert measured <= 3.5 * MIB
    # another torch.compile call (another options dict) has a budget of its own
    other = dict(options)
    alone = run(mlp(3), lambda gm, inputs: ckpt_backend(gm, inputs, other))
    assert alone == run(mlp(3), ckptfx.CkptBackend(other))


# ---- nothing silent -------------------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    ({"budget_kind": "peak"}, "budget_kind='peak' applies only with a memory_budget"),
    ({"layers_per_checkpoint": 2}, "applies only to the uniform policy"),
])
def test_options_that_cannot_apply_are_rejected(options, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        ckptfx.RematConfig.from_options(options)


def test_layers_per_checkpoint_beyond_the_blocks_is_the_users_error():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU())
                                        for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    backend = ckptfx.CkptBackend(inner="eager", policy="uniform", layers_per_checkpoint=5)
    with pytest.raises(Exception) as info:
        run(Stack(), backend, torch.randn(8, 64))
    assert "exceeds the 3 repeated blocks" in str(_config_error(info))


def test_a_failing_user_policy_is_the_users_error_not_a_fallback(caplog):
    def policy(facts):
        raise KeyError("my bug")

    backend = ckptfx.CkptBackend(inner="eager", policy=policy)
    with warnings_of(caplog) as warns, pytest.raises(Exception) as info:
        run(mlp(2), backend)
    assert "my bug" in str(_config_error(info))
    assert not backend.reports
    assert not [w for w in warns if "falling back" in w.getMessage()]


def test_one_info_line_per_graph_with_model_totals(caplog):
    caplog.set_level(logging.INFO, logger="ckptfx")
    backend = ckptfx.CkptBackend(inner="eager")
    run(TwoGraphs(), backend)
    lines = [r.getMessage() for r in caplog.records
             if r.name == "ckptfx" and r.levelno == logging.INFO]
    assert len(lines) == 2
    assert "2 graph(s) so far (2 planned, 0 from cache, 0 fell back)" in lines[-1]
    assert f"keeps {backend.ledger.total} B" in lines[-1]


@pytest.mark.inductor
def test_a_compile_from_inductors_cache_restores_its_report(tmp_path, monkeypatch):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = mlp(2)
    with inductor_config.patch(fx_graph_cache=True), \
            functorch_config.patch(enable_autograd_cache=True):
        first = ckptfx.CkptBackend(memory_budget=0.5)
        run(model, first)
        torch._dynamo.reset()
        again = ckptfx.CkptBackend(memory_budget=0.5)
        run(model, again)
    (made,), (restored,) = first.reports, again.reports
    assert any("from Inductor's cache" in n for n in restored.notes)
    assert (restored.saved, restored.recomputed, restored.saved_bytes) == (
        made.saved, made.recomputed, made.saved_bytes)
