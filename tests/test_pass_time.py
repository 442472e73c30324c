"""bench/pass_time.py's core on a 2-layer GPT: one row per partitioner, every figure where the
table says it is, the ratios computed against PyTorch's min-cut of the same run."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import pass_time  # noqa: E402

TINY = {"hidden": 32, "heads": 2, "seq": 16, "batch": 2, "vocab": 64}


@pytest.fixture(scope="module")
def rows():
    return pass_time.run([2], repeats=1, **TINY)


def test_one_row_per_partitioner_in_order(rows):
    keys = [c.key for c in pass_time.contenders([])]
    assert [r["contender"] for r in rows] == keys
    assert {r["layers"] for r in rows} == {2}
    assert len({r["joint_nodes"] for r in rows}) == 1 and rows[0]["joint_nodes"] > 0
    assert not any(r.get("fallback") for r in rows)  # every ckptfx plan was its own


def test_ratios_are_against_pytorch_min_cut(rows):
    reference = rows[0]
    assert reference["contender"] == "torch" and reference["ratio"] == 1.0
    for r in rows:
        assert len(r["runs"]) == 1 and r["seconds"] == r["runs"][0] > 0
        assert r["ratio"] == pytest.approx(r["seconds"] / reference["seconds"])
        assert r["cpu_ratio"] == pytest.approx(r["cpu_seconds"] / reference["cpu_seconds"])


def test_bytes_are_the_simulation_of_the_emitted_graphs(rows):
    joint = pass_time.gpt_joint(2, **TINY)
    fw, bw = pass_time.contenders([])[2].partition(
        pass_time.fresh_copy(joint.gm), joint.joint_inputs, **pass_time.partition_kwargs(joint))
    from ckptfx.memory import simulate

    timeline = simulate(fw, bw)
    ckpt = rows[2]
    assert ckpt["contender"] == "ckpt"
    assert (ckpt["saved_bytes"], ckpt["peak_bytes"]) == (timeline.saved_bytes, timeline.peak_bytes)
    for r in rows:  # what is kept for the backward is live at the peak of the backward
        assert 0 < r["saved_bytes"] <= r["peak_bytes"]


def test_markdown_table_has_a_line_per_row(rows):
    lines = pass_time.markdown(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    width = lines[0].count("|")
    assert all(line.count("|") == width for line in lines)
    for line, r in zip(lines[2:], rows):
        assert line.startswith(f"| 2 ({r['joint_nodes']:,}) | {r['label']} | {r['seconds']:.2f} |")
        assert f"{r['saved_bytes'] / pass_time.MIB:.1f}" in line


def test_fresh_copy_leaves_the_original_alone():
    joint = pass_time.gpt_joint(2, **TINY)
    before = [(n.name, n.op, str(n.target)) for n in joint.graph.nodes]
    copy = pass_time.fresh_copy(joint.gm)
    assert [(n.name, n.op, str(n.target)) for n in copy.graph.nodes] == before
    pass_time.contenders([])[0].partition(copy, joint.joint_inputs,
                                          **pass_time.partition_kwargs(joint))
    assert [(n.name, n.op, str(n.target)) for n in joint.graph.nodes] == before
    json.dumps(pass_time.partition_kwargs(joint))  # plain data
