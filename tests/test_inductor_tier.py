"""The Inductor tier: what runs under Inductor is what ckptfx planned.

Every kind of model the other tiers train with ``inner="eager"`` also trains here under the
default inner compiler (Inductor), checking two things against the plan:

* gradients within 1e-5 of eager's (relative, normwise: ``|a - b| / |b|``; element-wise
  maxima pick up Inductor's own reduction order, the same with torch.compile's default);
* the bytes autograd really keeps for the backward (saved-tensor hooks over unique
  storages, parameters and buffers excluded: they are alive anyway) within 2% of the plan's ``saved_bytes``, and within the
  budget when there is one.

Conv nets are where Inductor changes layouts (channels-last, padding): GroupNorm -> Conv (the
block of every diffusion U-Net and VAE, whose GroupNorm decomposition recomputes an
``as_strided``), a small U-Net with upsampling and skip concatenation, ConvNeXt blocks
(depthwise conv, channels-last LayerNorm), a ResNet with BatchNorm and pooling, and
channels-last inputs. See Note [Layouts the plan assumed] in ``ckptfx/_torch_compat.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ckptfx
from ckptfx.testing import saved_tensor_bytes, train


pytestmark = pytest.mark.inductor


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius norms; the absolute error when ``b`` is 0)."""
    a, b = a.double(), b.double()
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale else (a - b).norm().item()


def grad_errors(got, ref) -> list[float]:
    """Relative error of the loss and of every gradient, all steps, in order."""
    errs = []
    for g, r in zip(got, ref):
        errs.append(rel_err(g.loss, r.loss))
        for a, b in zip(g.grads, r.grads):
            assert (a is None) == (b is None)
            if a is not None:
                errs.append(rel_err(a, b))
    return errs


def assert_grads_close(model, inputs, got, ref, steps: int, tol: float = 1e-5) -> None:
    """Every gradient within ``tol`` of eager's; where one is not, it must be no further from
    eager than torch.compile's default (Inductor's own reduction order), to 1%."""
    errs = grad_errors(got, ref)
    if max(errs) <= tol:
        return
    stock = grad_errors(train(model, "inductor", inputs, steps=steps, seed=3), ref)
    for i, (e, s) in enumerate(zip(errs, stock)):
        assert e <= max(tol, 1.01 * s), f"value {i}: relative error {e:.2e}, torch.compile {s:.2e}"


def measured_saved_bytes(model: nn.Module, backend, inputs) -> int:
    """Bytes autograd keeps for one forward of ``model`` compiled with ``backend``."""
    import copy

    m = copy.deepcopy(model)
    fn = torch.compile(m, backend=backend)
    args = inputs if isinstance(inputs, dict) else None
    out, nbytes = saved_tensor_bytes(
        lambda: fn(**args) if args is not None else fn(*inputs),
        exclude=[*m.parameters(), *m.buffers()])  # alive anyway; the plan counts them as 0
    del out
    return nbytes


def check_plan_is_what_runs(model: nn.Module, inputs, *, steps: int = 1, tol: float = 1e-5,
                            **options) -> list:
    """Trains under Inductor and eager, compares grads, and checks measured saved bytes
    against the plan (and the budget). Returns the reports."""
    ref = train(model, None, inputs, steps=steps, seed=3)
    backend = ckptfx.CkptBackend(**options)
    got = train(model, backend, inputs, steps=steps, seed=3)
    assert_grads_close(model, inputs, got, ref, steps, tol)
    reports = backend.reports
    assert reports and not [r.fallback for r in reports if r.fallback]
    torch._dynamo.reset()
    measure = ckptfx.CkptBackend(**options)
    measured = measured_saved_bytes(model, measure, inputs)
    planned = sum(r.saved_bytes for r in measure.reports)
    assert abs(measured - planned) <= 0.02 * max(planned, 1), (measured, planned)
    for r in measure.reports:
        if r.budget_bytes is not None and options.get("budget_kind", "saved") == "saved":
            assert r.saved_bytes <= r.budget_bytes or not r.feasible
    return reports


# --- conv nets -------------------------------------------------------------------------------

def gn_conv(act: str) -> nn.Module:
    acts = {"none": [], "silu": [nn.SiLU()], "relu": [nn.ReLU()]}
    return nn.Sequential(nn.GroupNorm(8, 32), *acts[act], nn.Conv2d(32, 32, 3, padding=1))


@pytest.mark.parametrize("budget", [None, 1.0, 0.0])
@pytest.mark.parametrize("act", ["none", "silu", "relu"])
def test_groupnorm_conv_gradients_under_inductor(act, budget):
    torch.manual_seed(0)
    options = {} if budget is None else {"memory_budget": budget}
    check_plan_is_what_runs(gn_conv(act), (torch.randn(2, 32, 16, 16),), **options)


class ResBlock(nn.Module):
    """A diffusion U-Net's residual block: GN -> SiLU -> Conv twice, and a skip."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(4, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  nn.GroupNorm(4, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


class TinyUNet(nn.Module):
    """Down (strided conv, average pooling), middle, up (nearest upsampling, skip concat)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, 16, 3, padding=1)
        self.down = ResBlock(16, 32)
        self.pool = nn.AvgPool2d(2)
        self.mid = ResBlock(32, 32)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = ResBlock(64, 16)
        self.out = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, x):
        h0 = self.down(self.inp(x))
        h = self.up(self.mid(self.pool(h0)))
        return self.out(self.dec(torch.cat([h, h0], dim=1)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(h)).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.layers = nn.Sequential(BasicBlock(16), BasicBlock(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


CONV_NETS = {"unet": (TinyUNet, (2, 3, 16, 16)), "convnext": (TinyConvNeXt, (2, 3, 32, 32)),
             "resnet": (TinyResNet, (2, 3, 16, 16))}


@pytest.mark.parametrize("budget", [None, 0.5])
@pytest.mark.parametrize("name", sorted(CONV_NETS))
def test_conv_nets_plan_is_what_runs(name, budget):
    torch.manual_seed(0)
    cls, shape = CONV_NETS[name]
    options = {} if budget is None else {"memory_budget": budget}
    check_plan_is_what_runs(cls(), (torch.randn(*shape),), steps=2, **options)


def test_batchnorm_in_eval_mode_saves_running_stats_for_free():
    # eval-mode BatchNorm reads its running statistics in the backward: buffers, alive anyway
    torch.manual_seed(0)
    check_plan_is_what_runs(TinyResNet().eval(), (torch.randn(2, 3, 16, 16),), memory_budget=0.5)


@pytest.mark.parametrize("name", ["unet", "resnet"])
def test_channels_last_inputs_and_weights(name):
    torch.manual_seed(0)
    cls, shape = CONV_NETS[name]
    model = cls().to(memory_format=torch.channels_last)
    x = torch.randn(*shape).to(memory_format=torch.channels_last)
    check_plan_is_what_runs(model, (x,), memory_budget=0.5)


# --- the model zoo (transformers configs, random weights) -------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "mixtral", "t5", "vit", "cnn"])
def test_zoo_under_inductor(name):
    from test_zoo import MODELS, _batch

    torch.manual_seed(0)
    check_plan_is_what_runs(MODELS[name](0.0), _batch(name), memory_budget=0.5)
