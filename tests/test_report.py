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
ckptfx graph 0: policy=none, solver=mincut, budget=none
  saved for backward: 1.50 KiB (no recompute: 2.50 KiB; activations, inputs and sizes the backward reads; parameters not counted)
  predicted peak: 4.25 KiB (live bytes of the step; parameters and inputs not counted)
  recomputed: 5 ops, 256 FLOP, ~0.002 ms (cost model)
  solve 0.0 ms, plan+rewrite 0.0 ms
  note: min-cut optimal over saved bytes
  saved                 op                      module                          bytes  source                  reason
  addmm                 addmm.default           blocks.0.0                   1.00 KiB  toy_models.py:20        owns the storage of view_1 (min-cut: saving it is part of the least-bytes cut); addmm.default is compute-bound (kept rather than recomputed unless a budget needs it)
  primals_3             primal                  -                               256 B  -                       owns the storage of view (min-cut: saving it is part of the least-bytes cut); inputs of recomputed ops
  mul                   mul.Scalar              -                               256 B  toy_models.py:21        min-cut: saving it is part of the least-bytes cut; read by mul_1
  + 1 saved value of 0 bytes (parameters, their views, sizes: resident anyway): primals_4
  recomputed            op                      module                           work  source                  reason
  gelu                  gelu.default            blocks.0.1                   256 FLOP  toy_models.py:20        min-cut: cheaper to recompute from saved values than to save; from view_1
  view                  view.default            blocks.0.0                     0 FLOP  toy_models.py:20        a view of saved primals_3: recomputed for free; from primals_3
  view_1                view.default            blocks.0.0                     0 FLOP  toy_models.py:20        a view of saved addmm: recomputed for free; from addmm
  view_2                view.default            blocks.0.2                     0 FLOP  toy_models.py:20        min-cut: cheaper to recompute from saved values than to save; from gelu
  t_1                   t.default               blocks.0.2                     0 FLOP  toy_models.py:20        mincut: recomputed; from primals_4"""


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
    """Tensor bytes autograd saves, parameters excluded (the input counts, as in the plan)."""
    loss, saved = saved_tensor_bytes(lambda: compiled(x), exclude=[*model.parameters()])
    loss.backward()
    return saved


def _saved_size_bytes(model, x) -> int:
    """Bytes the plan counts for the sizes (SymInts) it saves: 8 each, no tensor for the
    hooks to see."""
    joint = capture_joints(model, (x,), dynamic=True)[0]
    plan = ckptfx.plan_remat(joint)
    nodes = {n.name: n for n in joint.graph.nodes}
    return sum(plan.decisions[n].nbytes for n in plan.saved
               if isinstance(nodes[n].meta.get("val"), torch.SymInt))


def test_formula_matches_saved_bytes_measured_at_three_sizes():
    model, (x,) = toy_models.mlp(width=16, layers=2, batch=4, seq=8)
    sizes = _saved_size_bytes(model, x)
    torch._dynamo.reset()
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
        assert backend.reports[-1].evaluate(batch=batch, seq=seq).saved_bytes == measured + sizes
    torch._dynamo.reset()


def test_formula_counts_what_the_headline_counts_at_the_traced_sizes():
    # the model input is saved for the weight gradient: the headline and the formula count it
    model, (x,) = toy_models.mlp(width=16, layers=1, batch=4, seq=8)
    joint = capture_joints(model, (x,), dynamic=True)[0]
    for options in ({}, {"memory_budget": 0.5}):
        _, _, report = ckptfx.apply_plan(joint, ckptfx.plan_remat(joint, options))
        assert any(s.op == "primal" and s.nbytes > 8 for s in report.saved)
        assert report.evaluate().saved_bytes == report.saved_bytes
        assert "counted as the saved line above" in str(report)


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


# --- what a reader sees: header, units, names, the timeline's budget and peak labels ---------

def _toy_report(options):
    model, inputs = toy_models.mlp(width=8, layers=1, batch=2, seq=4)
    joint = capture_joints(model, inputs)[0]
    plan = ckptfx.plan_remat(joint, options)
    fw, bw, report = ckptfx.apply_plan(joint, plan, options)
    return dataclasses.replace(report, timeline=memory_timeline(joint, plan, options, (fw, bw)))


@pytest.mark.parametrize("kind", ["saved", "peak"])
def test_header_names_policy_solver_budget_kind_and_puts_the_budget_on_its_line(kind):
    options = {"memory_budget": 0.5, "budget_kind": kind, "policy": "megatron_selective"}
    report = _toy_report(options)
    head, saved_line, peak_line = str(report).splitlines()[:3]
    assert head.startswith(f"ckptfx graph 0: policy=megatron_selective, solver={report.solver}")
    what = "peak" if kind == "peak" else "saved bytes"
    assert f"budget={what} <= " in head and report.budget_kind == kind
    assert saved_line.startswith("  saved for backward:") and peak_line.startswith("  predicted peak:")
    on, off = (saved_line, peak_line) if kind == "saved" else (peak_line, saved_line)
    assert ", budget " in on and "budget" not in off
    assert ckptfx.RematReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_sizes_are_in_the_unit_their_magnitude_calls_for():
    from ckptfx.report_text import size

    report = _toy_report({})
    text = str(report)
    assert " 0.0" not in text and "0.00 " not in text  # no small figure shown as zero MiB
    for row in report.saved:
        if row.nbytes > 0:
            assert size(row.nbytes) in text
    for c in report.timeline.curves:
        assert "MiB" not in c.peak_label  # a toy's tensors are bytes or KiB
    for n, unit in ((512, "B"), (3 << 10, "KiB"), (5 << 20, "MiB"), (7 << 30, "GiB")):
        assert size(n).endswith(" " + unit) and not size(n).startswith("0")


def _plotted(report, tmp_path):
    pytest.importorskip("matplotlib")
    from ckptfx.timeline import plot_timeline

    fig = plot_timeline(report.timeline, tmp_path / "t.png")
    fig.canvas.draw()
    return fig, fig.axes[0]


def test_a_saved_bytes_budget_is_not_drawn_on_the_live_bytes_axis(tmp_path):
    report = _toy_report({"memory_budget": 0.5, "budget_kind": "saved"})
    fig, ax = _plotted(report, tmp_path)
    scale = 2 ** 10 if "KiB" in ax.get_ylabel() else 1
    budget_y = report.budget_bytes / scale
    flat = [ln for ln in ax.get_lines() if len(set(ln.get_ydata())) == 1
            and abs(ln.get_ydata()[0] - budget_y) < 1e-9]
    assert not flat
    captions = [t.get_text() for t in fig.texts]
    assert any(t.startswith("saved-bytes budget") and "not drawn" in t for t in captions)


def test_a_peak_budget_is_a_labelled_horizontal_line(tmp_path):
    report = _toy_report({"memory_budget": 0.9, "budget_kind": "peak"})
    fig, ax = _plotted(report, tmp_path)
    from ckptfx.report_text import byte_unit

    _, scale = byte_unit(max(c.peak_bytes for c in report.timeline.curves))
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("peak budget")]
    assert len(lines) == 1
    assert set(lines[0].get_ydata()) == {report.budget_bytes / scale}
    assert any(t.get_text().startswith("peak budget") for t in ax.texts)


def test_peak_labels_do_not_overlap(tmp_path):
    report = _toy_report({})
    fig, ax = _plotted(report, tmp_path)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_bbox_patch().get_window_extent(renderer)  # the label, not its arrow
             for t in ax.texts if " peak " in t.get_text()]
    assert len(boxes) == len(report.timeline.curves)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)


def test_user_paths_and_sources_drop_dynamos_names():
    from ckptfx.report_text import readable_source, user_path

    assert user_path("L['self'].emb") == "emb"
    assert user_path("L['args'][0].model.layers.0.self_attn") == "model.layers.0.self_attn"
    assert user_path("L['self']._modules['transformer']._modules['h']._modules['3'].attn") == \
        "transformer.h.3.attn"
    assert readable_source("L['kwargs']['input_ids'].size()[1]") == "input_ids.shape[1]"
    assert readable_source("L['logits_to_keep']") == "logits_to_keep"


def test_json_text_and_formula_carry_no_dynamo_names():
    model, inputs = toy_models.keep_last()
    joint = capture_joints(model, inputs, dynamic=True)[0]
    _, _, report = ckptfx.apply_plan(joint, ckptfx.plan_remat(joint))
    names = dict(report.formula.symbols)
    assert names.get("batch") == "ids.shape[0]" and names.get("keep") == "keep", names
    assert report.evaluate(keep=2).saved_bytes < report.evaluate(keep=6).saved_bytes
    text = json.dumps(report.to_dict()) + str(report)
    assert "L[" not in text and "emb" in text
