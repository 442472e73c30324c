"""bench/compare.py's machinery: the batch search, and one tiny run end to end (eager vs
per-block checkpointing, no compile) checked through its JSON."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from _measure import largest_fitting  # noqa: E402


@pytest.mark.parametrize("start", [1, 3, 40, 500])
def test_largest_fitting_finds_the_boundary(start):
    peaks = []

    def peak_of(batch):
        peaks.append(batch)
        return 100 + 7 * batch

    fit, probes = largest_fitting(peak_of, limit_bytes=100 + 7 * 37, start=start, max_batch=1024)
    assert fit == 37
    assert 38 in probes and len(peaks) == len(set(peaks))


def test_largest_fitting_counts_a_failed_step_as_not_fitting():
    fit, _ = largest_fitting(lambda b: None if b > 5 else b, limit_bytes=10**9, start=2)
    assert fit == 5
    assert largest_fitting(lambda b: 10 * b, limit_bytes=5, start=4)[0] == 0


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "compare.py"), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # two processes with the profiler: ~20 s idle, a minute on a busy 2-core machine
def test_tiny_run_writes_every_column(tmp_path):
    out = tmp_path / "rows.json"
    res = _run("--models", "gpt", "--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16",
               "--vocab", "64", "--batch", "2", "--contenders", "eager,block_ckpt", "--repeats", "1",
               "--steps", "1", "--limit-mib", "0.5", "--fit", "block_ckpt", "--json", str(out), "--md", str(tmp_path / "t.md"))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["contender"]: r for r in json.loads(out.read_text())["rows"]}
    eager, block = rows["eager"], rows["block_ckpt"]
    assert "error" not in eager and "error" not in block
    # checkpointing every block keeps less for the backward and recomputes the blocks' matmuls
    assert 0 < block["saved_bytes"] < eager["saved_bytes"]
    assert block["extra_flops"] > 0 and eager["extra_flops"] == 0
    assert block["max_rel_err"] == 0.0  # same kernels, same order: bit for bit
    assert eager["peak_bytes"] >= eager["saved_bytes"] and block["peak_bytes"] >= block["saved_bytes"]
    probes = block["fit_probes_mib"]  # the batch that fits 0.5 MiB, and one more does not
    assert probes[str(block["fit_batch"])] <= 0.5 < probes[str(block["fit_batch"] + 1)]
    assert block["fit_tokens_s"] > 0 and "fit_batch" not in eager
    assert "| gpt-2 | eager + per-block checkpointing |" in (tmp_path / "t.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu_fails_with_one_line():
    res = _run("--device", "cuda")
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]


def test_peak_cell_shows_the_predicted_peak_in_parentheses():
    from _output import COLUMNS, MIB, _cells

    row = {"model": "gpt2", "layers": 6, "label": "ckpt", "contender": "ckpt_peak_0.0",
           "saved_bytes": 3 * MIB, "peak_bytes": 10 * MIB, "predicted_peak_bytes": 9.5 * MIB,
           "compile_s": 1.0, "max_rel_err": 0.0}
    peak = _cells(row)[COLUMNS.index("peak MiB")]
    assert peak == "10.0 (9.5)"
    assert _cells(dict(row, predicted_peak_bytes=None))[COLUMNS.index("peak MiB")] == "10.0"
