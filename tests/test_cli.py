"""The ckptfx command: demo, report and frontier on built-in, factory and --hf targets, and
one clear line for every mistake."""

from __future__ import annotations

import torch

import ckptfx
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


# --- targets, files and mistakes -------------------------------------------------------------

import json
import subprocess
import sys

import pytest

TINY = ["--width", "16", "--layers", "1", "--batch", "2", "--seq", "4"]


def _run(argv, capsys):
    """(exit status, stdout, stderr) of ``ckptfx argv``; argparse's exits count too."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_report_on_a_module_factory_writes_json_and_timeline(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "r.json", tmp_path / "t.png"
    code, out, err = _run(["report", "toy_models:mlp", *TINY, "--json", str(js),
                           "--timeline", str(png)], capsys)
    assert code == 0, err
    assert "saved for backward" in out and "memory timeline" in out and "blocks.0" in out
    graphs = json.loads(js.read_text())["graphs"]
    names = [c["name"] for c in graphs[0]["timeline"]["curves"]]
    assert names == ["this plan", "no recompute", "PyTorch min-cut"]
    assert ckptfx.RematReport.from_dict(graphs[0]).timeline.curves[0].peak_bytes == \
        graphs[0]["predicted_peak_bytes"]
    assert png.stat().st_size > 0


def test_report_dynamic_prints_the_formula(capsys):
    code, out, err = _run(["report", "toy_models:mlp", *TINY, "--dynamic"], capsys)
    assert code == 0, err
    assert "saved = " in out and "batch" in out and "seq" in out


def test_frontier_on_a_factory_shows_progress_and_writes_json(tmp_path, capsys):
    js = tmp_path / "f.json"
    code, out, err = _run(["frontier", "toy_models:mlp", *TINY, "--budgets", "1.0,0.0",
                           "--json", str(js)], capsys)
    assert code == 0, err
    assert "feasible" in out and "(2 of 2)" in err
    data = json.loads(js.read_text())
    assert data["format"] == "ckptfx.frontier/1" and data["solver"] == "budget"
    graph = data["graphs"][0]
    rows = graph["points"]
    assert graph["graph_id"] == 0 and [r["id"] for r in rows] == ["g0/b0", "g0/b1"]
    assert [r["budget"] for r in rows] == ["1.0", "0.0"]
    assert rows[1]["saved_bytes"] <= rows[0]["saved_bytes"]


def test_frontier_takes_a_budget_kind(tmp_path, capsys):
    js = tmp_path / "f.json"
    code, out, err = _run(["frontier", "toy_models:mlp", *TINY, "--budgets", "1.0,0.5",
                           "--budget-kind", "peak", "--json", str(js)], capsys)
    assert code == 0, err
    data = json.loads(js.read_text())
    assert data["budget_kind"] == "peak" and "budget kind=peak" in out
    for point in data["graphs"][0]["points"]:
        if point["feasible"]:
            assert point["predicted_peak_bytes"] <= point["budget_bytes"]


def test_a_solver_that_takes_no_budget_is_refused_before_capture(capsys):
    for argv in (["report", "--solver", "mincut", "--budget", "0.5"],
                 ["frontier", "--solver", "mincut", "--budgets", "0.5"]):
        code, out, err = _run(argv, capsys)
        assert code == 2 and "capturing" not in err and not out
        assert "--solver mincut" in err and "takes no budget" in err


def test_a_policy_with_a_budget_says_how_they_combine(capsys):
    code, out, err = _run(["report", "toy_models:mlp", *TINY, "--policy", "megatron_selective",
                           "--budget", "0.2"], capsys)
    assert code == 0, err
    note = out.splitlines()[0]
    assert note.startswith("note: policy megatron_selective with --budget")
    assert "MUST votes are constraints" in note and "budget is not met" in note


def test_hf_models_are_built_without_a_kv_cache():
    pytest.importorskip("transformers")
    from ckptfx.hf import build_hf
    from ckptfx.target import Sizes

    sizes = Sizes(layers=1, width=64, seq=8, batch=2, vocab=128)
    for model_type in ("llama", "gpt2", "qwen2"):
        model, inputs = build_hf(model_type, sizes)
        assert model.config.use_cache is False
        assert getattr(model(**inputs), "past_key_values", None) is None, model_type


def test_report_and_frontier_on_hf_llama(tmp_path, capsys):
    pytest.importorskip("transformers")
    sizes = ["--layers", "1", "--width", "64", "--seq", "16", "--batch", "2", "--vocab", "128"]
    code, out, err = _run(["report", "--hf", "llama", *sizes, "--dynamic"], capsys)
    assert code == 0, err
    assert "model.layers.0" in out and "PyTorch min-cut" in out
    assert "L[" not in out and "input_ids.shape[1]" in out
    code, out, err = _run(["frontier", "--hf", "llama", *sizes, "--budgets", "0.5"], capsys)
    assert code == 0, err


BAD = [
    (["report", "nope"], "neither a built-in model"),
    (["report", "no_such_module_xyz:f"], "cannot import"),
    (["report", "models/toy_models.py:mlp"], "toy_models:mlp"),
    (["report", "toy_models:missing"], "has no 'missing'"),
    (["report", "toy_models:raises"], "RuntimeError: weights not found"),
    (["report", "toy_models:not_a_pair"], "must return (model, example_inputs)"),
    (["report", "toy_models:raises", "--layers", "2"], "does not take --layers"),
    (["report", "toy_models:lstm"], "allow_rnn"),
    (["report", "--bogus"], "unrecognized arguments: --bogus"),
    (["report", "--plot", "/nonexistent/x.png"], "does not exist"),
    (["report", "--json", "/nonexistent/x.json"], "does not exist"),
    (["report", "--timeline", "t.txt"], ".png"),
    (["demo", "--steps", "0"], "must be at least 1"),
    (["report", "--width", "0"], "must be at least 1"),
    (["report", "--layers", "-1"], "must be at least 1"),
    (["report", "--batch", "0"], "must be at least 1"),
    (["frontier", "--budget", "0.5"], "frontier sweeps --budgets"),
    (["frontier", "--budgets", "0.5,,0"], "empty item"),
    (["frontier", "--budgets", "0.5,lots"], "memory_budget"),
    (["report", "--budget", "lots"], "memory_budget"),
    (["report", "--budget", "64"], "e.g. 64MiB"),
    (["report", "--inner", "eager"], "ckptfx report: unrecognized arguments: --inner"),
    (["report", "--policy", "nope"], "policy"),
    (["report", "--hf", "nope"], "not a transformers model type"),
    (["report", "gpt", "--hf", "llama"], "not both"),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_mistake_is_one_line_and_exit_2(argv, words, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if not ln.startswith("ckptfx: capturing")]
    assert len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err


def test_budget_one_is_the_fraction_one():
    args = cli.build_parser().parse_args(["report", "--budget", "1"])
    assert cli.options_of(args) == {"memory_budget": 1.0}


def test_help_is_plain_and_imports_no_torch():
    code = ("import sys; from ckptfx import cli\n"
            "for argv in (['--help'], ['report', '--help'], ['--version']):\n"
            "    try: cli.main(argv)\n"
            "    except SystemExit: pass\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("False")
    assert "``" not in res.stdout and "--timeline" in res.stdout and "ckptfx " in res.stdout


def test_an_unwritable_output_fails_before_any_work(capsys):
    code, out, err = _run(["report", "toy_models:mlp", *TINY, "--json", "/proc/x.json"], capsys)
    assert code == 2 and not out
    assert err.strip() == "ckptfx report: --json /proc/x.json: not writable (No such file or directory)"


def test_a_models_own_error_is_named_in_the_one_line(capsys):
    code, _, err = _run(["report", "toy_models:shape_bug"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("ckptfx report: capturing toy_models:shape_bug failed")
    assert "caused by RuntimeError: a and b must have same reduction dim" in last


def test_debug_shows_the_users_own_frames():
    res = subprocess.run([sys.executable, "-m", "ckptfx.cli", "report", "toy_models:raises",
                          "--debug"], capture_output=True, text=True, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).parent))
    assert res.returncode != 0 and "toy_models.py" in res.stderr


def test_output_into_a_closed_pipe_is_not_an_error():
    code = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-m', 'ckptfx.cli', "
            f"'report', 'toy_models:mlp', {', '.join(map(repr, TINY))}], stdout=subprocess.PIPE, "
            f"stderr=subprocess.PIPE); p.stdout.close(); err = p.stderr.read().decode(); "
            f"p.wait(); print(p.returncode, 'Traceback' in err)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).parent))
    assert res.stdout.split() == ["0", "False"], res.stdout + res.stderr
