"""The ckptfx command: demo and report."""

from __future__ import annotations

import torch

from ckptfx import cli
from ckptfx.demo import GPTConfig, Row, compare, format_table, run_demo


def test_demo_tiny_gpt_eager_inner_matches_and_saves_less():
    cfg = GPTConfig(vocab=512, seq=32, layers=2, heads=2, width=64, batch=4)
    rows = run_demo(cfg, steps=2, inner="eager")
    names = [r.name for r in rows]
    assert names == ["eager", "torch.compile (inductor)", "backend='ckpt'"]
    ckpt, default = rows[2], rows[1]
    assert ckpt.grads_match and ckpt.max_rel_err == 0.0  # eager inner: the same kernels
    assert ckpt.saved_bytes < rows[0].saved_bytes
    assert ckpt.saved_bytes <= default.saved_bytes
    table = format_table(rows)
    assert "backend='ckpt'" in table and "match" in table


def test_compare_flags_differing_gradients():
    row = Row("x")
    compare(row, [torch.ones(3) * 1.1], [torch.ones(3)], rtol=1e-4)
    assert not row.grads_match and abs(row.max_rel_err - 0.1) < 1e-6
    assert "DIFFER" in format_table([Row("eager"), row])


def test_report_command_prints_plan_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    code = cli.main(["report", "--layers", "1", "--width", "64", "--seq", "16", "--batch", "2",
                     "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and "saved for backward" in out and "recomputed" in out
    assert png.stat().st_size > 1000


def test_bad_option_exits_2(capsys):
    code = cli.main(["report", "--layers", "1", "--width", "64", "--seq", "16", "--batch", "2",
                     "--budget", "lots"])
    assert code == 2 and "memory_budget" in capsys.readouterr().err
