"""backend="ckpt": entry point, options, inner compilers, reports, the fallback safety net."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ckptfx
from ckptfx import ConfigError

from conftest import assert_bitwise, grads_of, run_module, run_partitioned


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.Tanh(),
                         nn.Linear(128, 8))


def _x():
    torch.manual_seed(1)
    return torch.randn(32, 64)


def test_entry_point_works_without_import():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        out = torch.compile(m, backend="ckpt", options={"inner": "eager"})(torch.randn(4, 8))
        out.sum().backward()
        assert all(p.grad is not None for p in m.parameters())
        print("ok", "ckpt" in torch._dynamo.list_backends())
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["ok", "True"]


def test_ckpt_backend_eager_is_bitwise_and_reports():
    model, x = _mlp(), _x()
    ref_loss, ref_grads = run_module(model, [x], backend="eager")
    backend = ckptfx.CkptBackend(inner="eager")
    loss, grads = run_module(model, [x], backend=backend)
    assert torch.equal(loss, ref_loss)
    assert_bitwise(grads, ref_grads)
    (report,) = backend.reports
    assert report.solver == "mincut" and not report.fallback
    assert 0 < report.saved_bytes < report.saved_bytes_no_remat
    assert report.recomputed and all(r.reason for r in report.recomputed)
    assert "saved for backward" in str(report)
    assert report.to_dict()["saved_bytes"] == report.saved_bytes


@pytest.mark.inductor
def test_inner_inductor_uses_ckptfx_partitioner():
    model, x = _mlp(), _x()
    ref_loss, ref_grads = run_module(model, [x], backend="eager")
    backend = ckptfx.CkptBackend(inner="inductor")
    loss, grads = run_module(model, [x], backend=backend)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert len(backend.reports) == 1 and backend.reports[0].solver == "mincut"


def test_partitioner_uuid_keys_cache_on_code_and_config():
    from ckptfx.backend import make_inductor_partitioner
    import pickle

    a = make_inductor_partitioner(ckptfx.RematConfig())
    b = make_inductor_partitioner(ckptfx.RematConfig())
    c = make_inductor_partitioner(ckptfx.RematConfig.from_options({"memory_budget": 0.5}))
    assert a.uuid() == b.uuid() != c.uuid()
    assert pickle.loads(pickle.dumps(a)).uuid() == a.uuid()  # Inductor pickles its config


def test_string_backend_rejects_unknown_option():
    model, x = _mlp(), _x()
    with pytest.raises(Exception) as info:
        torch.compile(model, backend="ckpt", options={"memory_budjet": 0.5})(x)
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or getattr(exc, "inner_exception", None)
    assert any(isinstance(e, ConfigError) for e in chain)
    assert "memory_budjet" in str(info.value) and "memory_budget" in str(info.value)


def test_ckpt_backend_rejects_bad_options_at_construction():
    with pytest.raises(ConfigError, match="inner"):
        ckptfx.CkptBackend(inner="tvm")


def test_graph_break_gives_one_report_per_graph():
    def f(x, w):
        y = torch.tanh(x @ w)
        torch._dynamo.graph_break()
        return (y.sin() @ w).sum()

    torch.manual_seed(0)
    x, w = torch.randn(16, 16, requires_grad=True), torch.randn(16, 16, requires_grad=True)
    _, ref = grads_of(f, [x, w])
    backend = ckptfx.CkptBackend(inner="eager")
    _, got = grads_of(torch.compile(f, backend=backend), [x, w])
    assert_bitwise(got, ref)
    assert len(backend.reports) == 2


def test_inference_graph_needs_no_partition():
    model, x = _mlp(), _x()
    backend = ckptfx.CkptBackend(inner="eager")
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, model(x))
    assert backend.reports == []


def _boom(joint):
    raise RuntimeError("forced failure")


def test_fallback_on_failure_is_safe_and_warns(caplog):
    from functorch.compile import aot_function, make_boxed_func

    torch.manual_seed(0)
    x, w = torch.randn(32, 32, requires_grad=True), torch.randn(32, 32, requires_grad=True)
    fn = lambda x, w: torch.tanh(x @ w).sin().sum()  # noqa: E731
    _, ref = grads_of(fn, [x, w])
    reports = []
    nop = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    compiled = aot_function(fn, fw_compiler=nop, bw_compiler=nop,
                            partition_fn=ckptfx.partition_fn(None, reports.append, fault=_boom))
    with caplog.at_level(logging.WARNING, logger="ckptfx"):
        _, got = grads_of(compiled, [x, w])
    assert_bitwise(got, ref)
    assert reports[0].solver == "torch-fallback" and "forced failure" in reports[0].fallback
    assert reports[0].saved_bytes > 0  # what the fallback partition really saves
    warnings = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warnings) == 1 and "forced failure" in warnings[0].getMessage()


def test_strict_raises_instead_of_falling_back():
    from functorch.compile import aot_function, make_boxed_func

    x = torch.randn(8, 8, requires_grad=True)
    nop = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    compiled = aot_function(lambda x: x.sin().sum(), fw_compiler=nop, bw_compiler=nop,
                            partition_fn=ckptfx.partition_fn(
                                ckptfx.RematConfig(strict=True), fault=_boom))
    with pytest.raises(RuntimeError, match="forced failure"):
        compiled(x)


def test_rematpass_in_pass_manager():
    from torch.fx.passes.infra.pass_manager import PassManager

    x = torch.randn(64, 64, requires_grad=True)
    joint = ckptfx.trace_joint(lambda x: x.exp().tanh().sum(), x)
    remat = ckptfx.passes.RematPass(num_fwd_outputs=joint.num_fwd_outputs)
    PassManager([remat])(joint.gm)
    # exp's output is what both backward formulas need: save it, recompute tanh from it
    plan = remat.last_plan
    assert ckptfx.testing.ops_of(plan, plan.saved) == ("exp",)
    decisions = {n.target: n.meta["ckptfx.decision"] for n in joint.gm.graph.nodes
                 if "ckptfx.decision" in n.meta and joint.roles[n.name] is ckptfx.Role.FORWARD}
    assert decisions[torch.ops.aten.tanh.default].action is ckptfx.Action.RECOMPUTE
    assert decisions[torch.ops.aten.exp.default].action is ckptfx.Action.SAVE
    assert remat.last_report.saved_bytes == 64 * 64 * 4


def test_lean_import():
    code = ("import sys, ckptfx; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('networkx', 'scipy', 'matplotlib') or m.startswith(('torch._dynamo', "
            "'torch._inductor'))]; print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
