"""Shared helpers: run a function or module through ckptfx's partitioner and through eager."""

from __future__ import annotations

import copy

import pytest
import torch

import ckptfx


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


def grads_of(fn, inputs, params=()):
    """Runs fn(*inputs).sum().backward() on fresh leaf copies; returns (output, grads)."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*leaves)
    loss = out if out.dim() == 0 else out.sum()
    loss.backward()
    grads = [x.grad for x in leaves if x.requires_grad] + [p.grad for p in params]
    return out.detach(), grads


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
    """A deep copy of ``module`` compiled with ``backend``; returns (loss, param grads)."""
    m = copy.deepcopy(module)
    compiled = torch.compile(m, backend=backend)
    out = compiled(*inputs)
    loss = out if out.dim() == 0 else out.float().pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad for p in m.parameters()]


def assert_bitwise(a_list, b_list):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert torch.equal(a, b), (a - b).abs().max()
