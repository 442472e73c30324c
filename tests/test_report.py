"""RematReport: golden text, JSON round trip, memory timeline, size formulas, logging."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

import ckptfx
import toy_models
from ckptfx.capture import capture_joints
from ckptfx.testing import saved_tensor_bytes
from ckptfx.memory import simulate
from ckptfx.timeline import NO_RECOMPUTE, THIS_PLAN, TORCH, memory_timeline, no_recompute_graphs

GOLDEN = """\
ckptfx graph 0: solver=mincut
  saved for backward: 1.50 KiB (no recompute: 2.50 KiB)
  recomputed: 5 ops, 0.00 MFLOP, ~0.002 ms (cost model)
  solve 0.0 ms, plan+rewrite 0.0 ms, predicted peak 4.25 KiB
  note: min-cut optimal over saved bytes
  saved                 op                      module                          KiB  source                  reason
  addmm                 addmm.default           blocks.0.0                      1.0  toy_models.py:20        owns the storage of view_1 (min-cut: saving it is part of the least-bytes cut); addmm.default is compute-bound (recompute_expensive=False)
  primals_3             primal                  -                               0.2  -                       owns the storage of view (min-cut: saving it is part of the least-bytes cut); inputs of recomputed ops
  mul                   mul.Scalar              -                               0.2  toy_models.py:21        min-cut: saving it is part of the least-bytes cut; read by mul_1
  + 1 saved value of 0 bytes (parameters, their views, sizes: resident anyway): primals_4
  recomputed            op                      module                        MFLOP  source                  reason
  gelu                  gelu.default            blocks.0.1                     0.00  toy_models.py:20        min-cut: cheaper to recompute from saved values than to save; from view_1
  view                  view.default            blocks.0.0                     0.00  toy_models.py:20        a view of saved primals_3: recomputed for free; from primals_3
  view_1                view.default            blocks.0.0                     0.00  toy_models.py:20        a view of saved addmm: recomputed for free; from addmm
  view_2                view.default            blocks.0.2                     0.00  toy_models.py:20        min-cut: cheaper to recompute from saved values than to save; from gelu
  t_1                   t.default               blocks.0.2                     0.00  toy_models.py:20        mincut: recomputed; from primals_4"""


@pytest.fixture(scope="module")
def toy():
    """(joint, plan, fw, bw, report) of the one-block MLP of width 8, captured by Dynamo."""
    model, inputs = toy_models.mlp(width=8, layers=1, batch=2, seq=4)
    joint = capture_joints(model, inputs)[0]
    plan = ckptfx.plan_remat(joint)
    fw, bw, report = ckptfx.apply_plan(joint, plan)
    return joint, plan, fw, bw, report


def test_report_text_is_golden(toy):
    report = dataclasses.replace(toy[4], solve_time_s=0.0, plan_time_s=0.0)
    assert str(report) == GOLDEN


def test_traced_graph_without_module_paths_says_so():
    x = torch.randn(16, 16, requires_grad=True)
    joint = ckptfx.trace_joint(lambda x: x.sin().exp().sum(), x)
    _, _, report = ckptfx.apply_plan(joint, ckptfx.plan_remat(joint, {"policy": "uniform"}))
    assert any("no module paths" in n for n in report.notes)
    assert "note: the graph carries no module paths" in str(report)


def test_to_dict_is_json_and_round_trips(toy):
    joint, plan, fw, bw, report = toy
    report = dataclasses.replace(report, timeline=memory_timeline(joint, plan, graphs=(fw, bw)))
    text = json.dumps(report.to_dict())
    back = ckptfx.RematReport.from_dict(json.loads(text))
    assert back == report
    assert back.to_dict() == report.to_dict()


def test_timeline_has_three_curves_whose_peaks_are_the_simulated_peaks(toy):
    joint, plan, fw, bw, report = toy
    tl = memory_timeline(joint, plan, graphs=(fw, bw))
    assert [c.name for c in tl.curves] == [THIS_PLAN, NO_RECOMPUTE, TORCH]
    mine = tl.curve(THIS_PLAN)
    assert mine.peak_bytes == report.predicted_peak_bytes == max(mine.live_bytes)
    assert tl.curve(NO_RECOMPUTE).peak_bytes == simulate(*no_recompute_graphs(joint)).peak_bytes
    assert tl.curve(NO_RECOMPUTE).saved_bytes >= mine.saved_bytes
    for c in tl.curves:
        assert c.live_bytes[c.peak_index] == c.peak_bytes
        assert 0 < c.forward_ops < len(c.live_bytes)
        assert c.peak_label.startswith(("forward at", "backward at"))


def test_timeline_png_is_written(toy, tmp_path):
    pytest.importorskip("matplotlib")
    from ckptfx.timeline import plot_timeline

    joint, plan, fw, bw, _ = toy
    fig = plot_timeline(memory_timeline(joint, plan, graphs=(fw, bw)), tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
    assert len(fig.axes[0].get_legend().get_texts()) == 3


def _measured_saved(model, compiled, x) -> int:
    """Bytes autograd saves, parameters and the input excluded (resident anyway, as in the
    simulation's memory model)."""
    loss, saved = saved_tensor_bytes(lambda: compiled(x), exclude=[*model.parameters(), x])
    loss.backward()
    return saved


def test_formula_matches_saved_bytes_measured_at_three_sizes():
    torch._dynamo.reset()
    model, (x,) = toy_models.mlp(width=16, layers=2, batch=4, seq=8)
    backend = ckptfx.CkptBackend(inner="eager")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    _measured_saved(model, compiled, x)
    report = backend.reports[-1]
    formula = report.formula
    assert formula is not None and {"batch", "seq"} <= {n for n, _ in formula.symbols}
    assert ckptfx.RematReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    for batch, seq in ((3, 5), (8, 16), (16, 40)):
        measured = _measured_saved(model, compiled, torch.randn(batch, seq, 16))
        assert len(backend.reports) == 1  # one graph serves every size
        assert backend.reports[-1].evaluate(batch=batch, seq=seq).saved_bytes == measured
    torch._dynamo.reset()


def test_evaluate_without_symbols_says_how_to_get_them(toy):
    with pytest.raises(ckptfx.ConfigError, match="dynamic=True"):
        toy[4].evaluate(batch=2)


def test_one_info_line_per_graph_and_a_trace_artifact(caplog, capsys, monkeypatch):
    artifacts = []

    def trace_structured(kind, metadata_fn=dict, *, payload_fn=str, **_):
        name = metadata_fn().get("name", "") if kind == "artifact" else ""
        if name.startswith("ckptfx"):
            artifacts.append((name, json.loads(payload_fn())))

    monkeypatch.setattr(torch._logging, "trace_structured", trace_structured)
    torch._dynamo.reset()
    model, (x,) = toy_models.mlp(width=8, layers=1)
    with caplog.at_level(logging.INFO, logger="ckptfx"):
        torch.compile(model, backend=ckptfx.CkptBackend(inner="eager"))(x).backward()
    torch._dynamo.reset()
    infos = [r for r in caplog.records if r.name == "ckptfx" and r.levelno == logging.INFO]
    assert len(infos) == 1 and "\n" not in infos[0].getMessage()
    assert [name for name, _ in artifacts] == ["ckptfx_report"]
    assert artifacts[0][1]["solver"] == "mincut"
    assert capsys.readouterr() == ("", "")
