"""The README's distributed recipes run: each script in examples/ under torchrun, 2 ranks."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")]


@pytest.mark.parametrize("script, args, expect", [
    ("ddp.py", [], "DDP: losses"),
    ("fsdp2.py", ["--per-block"], "FSDP2: losses"),
    ("pipeline.py", [], "microbatches in flight: 2"),
])
def test_example_runs_on_two_ranks(script, args, expect):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "examples" / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect in done.stdout
