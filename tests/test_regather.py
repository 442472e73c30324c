"""regather_params: an all-gather of a parameter shard (and its wait) may run again in the
backward instead of the unsharded parameter being kept (Note [Re-gathering parameters] in
ckptfx/analysis/nodes.py). One gloo rank in this process: the collectives run for real,
and reduce-scatters, all-reduces and all-gathers of activations stay banned."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ckptfx
from ckptfx.config import RematConfig
from ckptfx.planner import prepare
from ckptfx.testing import measure_step

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing"),
              # all_gather_tensor's deprecation notice (a context manager would graph-break)
              pytest.mark.filterwarnings("ignore:.*all_gather_tensor.*:FutureWarning")]

OTHER_COLLECTIVES = ("reduce_scatter", "all_reduce")


@pytest.fixture(scope="module")
def group():
    """The default process group: one gloo rank over an in-process store."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _gather(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    return funcol.all_gather_tensor(t, 0, dist.group.WORLD)


class ShardedLinear(torch.nn.Module):
    """SimpleFSDP-style: the module holds a shard of its weight and all-gathers it in the
    forward (its backward reduce-scatters the gradient). 256x128 fp32: 128 KiB unsharded.
    With ``collectives``, the activation is all-reduced and all-gathered as well."""

    def __init__(self, collectives: bool = False) -> None:
        super().__init__()
        self.shard = torch.nn.Parameter(torch.randn(256, 128, generator=torch.Generator()
                                                    .manual_seed(0)) / 16)
        self.collectives = collectives

    def forward(self, x):
        h = x @ _gather(self.shard).t()
        if self.collectives:
            import torch.distributed._functional_collectives as funcol

            h = _gather(funcol.all_reduce(h, "sum", dist.group.WORLD).sin())
        return torch.tanh(h).sum()


def _x() -> torch.Tensor:
    return torch.randn(8, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)


def _ops(plan, names) -> list[str]:
    return [plan.decisions[n].op for n in names]


@pytest.mark.parametrize("options", [{}, {"memory_budget": 0.0, "budget_kind": "saved"}],
                         ids=["mincut", "budget0"])
def test_regather_recomputes_the_gather_and_keeps_the_weight_bytes_fewer(group, options):
    model, x = ShardedLinear(), _x()
    joint = ckptfx.trace_joint(model, x)
    weight = model.shard.nbytes  # one rank: the unsharded weight has the shard's bytes
    runs = {}
    for regather in (False, True):
        plan = ckptfx.plan_remat(joint, {**options, "regather_params": regather})
        fw, bw, _ = ckptfx.apply_plan(joint, plan)
        measured = measure_step(fw, bw, [model.shard.detach(), x.detach()]).saved
        runs[regather] = plan, measured
    (off, off_measured), (on, on_measured) = runs[False], runs[True]
    assert "wait_tensor.default" in _ops(off, off.saved)
    assert not any("c10d" in op for op in _ops(off, off.recomputed))
    redone = _ops(on, on.recomputed)
    assert {"all_gather_into_tensor.default", "wait_tensor.default"} <= set(redone)
    assert not any(k in op for op in redone for k in OTHER_COLLECTIVES)
    assert off.saved_bytes - on.saved_bytes == weight
    assert off_measured - on_measured == weight


def test_only_parameter_gathers_are_unbanned(group):
    model, x = ShardedLinear(collectives=True), _x()
    joint = ckptfx.trace_joint(model, x)
    table = prepare(joint, RematConfig(regather_params=True)).table
    collectives = [r for r in table.rows if r.is_collective]
    free = {r.op_name for r in collectives if not r.ban_reason}
    assert free == {"all_gather_into_tensor.default", "wait_tensor.default"}
    assert sum(r.regathers for r in collectives) == 2  # the weight's gather and its wait
    banned = [r for r in collectives if r.ban_reason]
    assert {"all_reduce.default", "all_gather_into_tensor.default",
            "reduce_scatter_tensor.default"} <= {r.op_name for r in banned}
    plan = ckptfx.plan_remat(joint, {"regather_params": True, "memory_budget": 0.0,
                                     "budget_kind": "saved"})
    regathered = {r.name for r in collectives if r.regathers}
    assert regathered <= set(plan.recomputed)
    assert not [n for n in plan.recomputed if table[n].is_collective and n not in regathered]
    off = prepare(joint, RematConfig()).table
    assert all(r.ban_reason for r in off.rows if r.is_collective)


def test_recomputed_gather_is_priced_by_its_bytes(group):
    model, x = ShardedLinear(), _x()
    table = prepare(ckptfx.trace_joint(model, x), RematConfig(regather_params=True)).table
    gather = next(r for r in table.rows if r.regathers and r.op_name.startswith("all_gather"))
    wait = next(r for r in table.rows if r.regathers and r.op_name.startswith("wait"))
    from ckptfx.analysis.costs import DEFAULT_MACHINE as m

    assert gather.cost_s == pytest.approx(model.shard.nbytes / m.comm_bandwidth + m.launch_s)
    assert gather.flops == 0 and wait.cost_s == 0.0


def test_compiled_regather_trains_like_eager_and_notes_what_it_traded(group):
    model = ShardedLinear()
    x = _x()
    model(x).backward()
    ref = [model.shard.grad.clone(), x.grad.clone()]
    backend = ckptfx.CkptBackend(inner="eager", regather_params=True, memory_budget=0.0)
    model.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    torch.compile(model, backend=backend)(x2).backward()
    torch.testing.assert_close([model.shard.grad, x2.grad], ref)
    (report,) = backend.reports
    assert report.fallback == ""
    mib = model.shard.nbytes / 2**20
    assert (f"regather_params: 1 of 1 all-gathers re-run in the backward ({mib:.2f} MiB "
            f"communicated), {mib:.2f} MiB of unsharded parameters not kept") in report.notes


def test_note_only_with_the_option_and_says_when_there_is_nothing_to_regather(group):
    model, x = ShardedLinear(), _x()
    joint = ckptfx.trace_joint(model, x)
    assert not any("regather_params" in n for n in ckptfx.plan_remat(joint).notes)
    plain = ckptfx.trace_joint(torch.nn.Linear(4, 4), torch.randn(2, 4))
    notes = ckptfx.plan_remat(plain, {"regather_params": True}).notes
    assert any("all-gathers no parameter shard" in n for n in notes)
