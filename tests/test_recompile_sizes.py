"""Sizes under recompiles: a frame that Dynamo recompiles with a dynamic size is planned
with the sizes it was traced with (Note [Hints from every ShapeEnv]), and its report's saved
bytes are what autograd keeps."""

from __future__ import annotations

import logging

import sympy
import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch._dynamo.source import ConstantSource

import ckptfx
from ckptfx.analysis.sizes import SizeHints
from ckptfx.measure import saved_tensor_bytes


class Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


def test_recompiled_dynamic_graph_reports_the_bytes_autograd_keeps(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    backend = ckptfx.CkptBackend(inner="eager")
    compiled = torch.compile(model, backend=backend)
    params = list(model.parameters())
    measured = []
    with caplog.at_level(logging.WARNING, logger="ckptfx"):
        for batch in (8, 12, 20):  # 12 recompiles with a dynamic batch; 20 reuses it
            out, nbytes = saved_tensor_bytes(lambda: compiled(torch.randn(batch, 32)),
                                             exclude=params)
            out.sum().backward()
            measured.append(nbytes)
    assert len(backend.reports) == 2
    dynamic = backend.reports[1]
    assert dynamic.saved_bytes > 0
    # planned for the batch it was traced with (12), not an assumed size
    assert abs(dynamic.saved_bytes - measured[1]) <= 0.02 * measured[1]
    assert abs(backend.reports[0].saved_bytes - measured[0]) <= 0.02 * measured[0]
    assert not [r for r in caplog.records if "has no hint" in r.getMessage()]


def test_hints_come_from_every_shape_env_a_graph_mentions():
    envs = [ShapeEnv(), ShapeEnv()]
    syms = [env.create_symintnode(env.create_symbol(n, ConstantSource(f"n{i}")), hint=n)
            for i, (env, n) in enumerate(zip(envs, (8, 12)))]
    graph = torch.fx.Graph()
    for i, s in enumerate(syms):
        graph.placeholder(f"x{i}").meta["val"] = s
    graph.output(None)
    hints = SizeHints.from_graphs(graph)
    a, b = (sympy.sympify(s.node.expr) for s in syms)
    assert hints.evaluate(a * b) == 8 * 12
    assert hints.assumed == ()
