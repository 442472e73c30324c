"""Shared helpers: run a function or module through ckptfx's partitioner and through eager
(:mod:`ckptfx.testing` holds the general ones; ``assert_bitwise`` is its tensor comparison)."""

from __future__ import annotations

import os

# Bit-for-bit comparisons with eager need the same kernel to round the same way each call.
# MKL's matmul may round differently with the alignment of its buffers, which differs
# between an eager run and a compiled one (seen: a loss one ulp apart, once in several full
# runs); its reproducible mode, set before MKL starts, removes that. Nothing in ckptfx
# depends on it: it only keeps the bitwise tests about the plan and not about allocation.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402

import ckptfx  # noqa: E402
from ckptfx.testing import assert_same_tensors as assert_bitwise  # noqa: F401
from ckptfx.testing import grads_of, train


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with Dynamo's caches empty and plan-replaying on-disk caches off."""
    import torch._dynamo
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _emitted_graphs_match_the_rewrite(monkeypatch):
    """Every candidate a peak search simulates from predicted node orders (Note [Emitted
    graphs without building them]) is simulated from the rewritten graphs too: the two
    timelines must be equal. Mismatches are collected (a partitioner's error would be
    caught by its safety net) and fail the test at its end."""
    from ckptfx.candidates import Simulator

    timeline = Simulator.timeline
    mismatches = []

    def checked(self, plan):
        got = timeline(self, plan)
        if self.layout is not None:
            ref = timeline(Simulator(self.joint, emitted=False), plan)
            if got != ref:
                mismatches.append((plan.saved, None if got is None else got.peak_bytes,
                                   None if ref is None else ref.peak_bytes))
        return got

    monkeypatch.setattr(Simulator, "timeline", checked)
    yield
    assert not mismatches, f"emitted-graph timelines differ from the rewrite's: {mismatches[:3]}"


def run_partitioned(fn, inputs, config=None):
    """fn through aot_function with ckptfx's partition_fn and eager (boxed nop) compilers.

    Returns:
        (output, grads, reports)
    """
    from functorch.compile import aot_function, make_boxed_func

    reports = []

    def nop(gm, _):
        return make_boxed_func(gm.forward)

    compiled = aot_function(fn, fw_compiler=nop, bw_compiler=nop,
                            partition_fn=ckptfx.partition_fn(config, reports.append))
    out, grads = grads_of(compiled, inputs)
    return out, grads, reports


def run_module(module, inputs, backend):
    """One step of a deep copy of ``module`` compiled with ``backend`` (None: eager);
    returns (loss, param grads)."""
    (step,) = train(module, backend, tuple(inputs))
    return step.loss, step.grads
