"""Shared helpers: run a function or module through ckptfx's partitioner and through eager
(:mod:`ckptfx.testing` holds the general ones; ``assert_bitwise`` is its tensor comparison)."""

from __future__ import annotations


import pytest

import ckptfx
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
