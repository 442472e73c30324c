"""Testing helpers for ckptfx and for users' own tests: train under a backend and compare
with eager, meter the bytes autograd saves, track live storages op by op, toy graphs.

* :func:`train` trains a deep copy of a module for a few SGD steps under a backend (None:
  eager) and returns every step's loss, outputs, gradients and state; :func:`assert_same_run`
  compares two runs bit for bit, or within a tolerance.
* :func:`grads_of` runs a function forward and backward on fresh leaf copies of its inputs.
* :func:`saved_tensor_bytes` (from :mod:`ckptfx.measure`): the bytes autograd keeps for the
  backward, over unique storages, parameters excluded.
* :class:`LiveStorages` and :func:`measure_step`: an allocator-level tracker (a dispatch
  mode) of the storages ops create, to hold :mod:`ckptfx.memory`'s simulation against;
  :class:`CompiledLiveStorages` around code compiled with ``inner="eager"``.
* :func:`ops_of`: the ops a plan saves or recomputes, to assert on (node names change across
  torch versions; ops, roles and bytes do not).
* :data:`TOY_GRAPHS`: small functions and modules with round sizes (a 128x128 fp32 tensor is
  64 KiB) and their inputs.

Example:
    >>> import torch, ckptfx
    >>> from ckptfx import testing
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    >>> x = torch.randn(4, 8)
    >>> backend = ckptfx.CkptBackend(inner="eager", memory_budget=0.0)
    >>> got, ref = testing.train(model, backend, (x,), steps=2), testing.train(model, None, (x,), steps=2)
    >>> testing.assert_same_run(got, ref)  # bit for bit: eager kernels, exact RNG replay
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ckptfx import _torch_compat as compat
from ckptfx.analysis.sizes import SizeHints
from ckptfx.capture import call
from ckptfx.measure import saved_tensor_bytes
from ckptfx.memory import BACKWARD, FORWARD, saved_inputs

__all__ = ["CompiledLiveStorages", "LiveStorages", "Step", "TOY_GRAPHS", "assert_same_run",
           "assert_same_tensors", "default_loss", "grads_of", "measure_step", "ops_of",
           "saved_tensor_bytes", "train"]


@dataclasses.dataclass
class Step:
    """What one training step produced.

    Attributes:
        loss: the loss (detached).
        out: the model's outputs (detached).
        grads: the parameters' gradients (None for a parameter without one).
        state: the module's state dict after the step's backward (detached copies).
        saved_bytes: bytes autograd saved during the forward (``meter_saved=True``), or None.
    """

    loss: torch.Tensor
    out: Any
    grads: list
    state: dict
    saved_bytes: int | None = None


def default_loss(out: Any) -> torch.Tensor:
    """``out.loss`` when the output has one (transformers); else the sum of the mean squares
    of every floating tensor leaf of ``out`` that requires grad."""
    if getattr(out, "loss", None) is not None:
        return out.loss
    leaves = [t for t in compat.tree_leaves(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    return sum(t.float().pow(2).mean() for t in leaves)


def _fresh(x: Any) -> Any:
    return compat.tree_map(lambda t: t.detach().clone().requires_grad_(t.requires_grad)
                           if isinstance(t, torch.Tensor) else t, x)


def _detach(x: Any) -> Any:
    return compat.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)


def train(model: nn.Module, backend: Any, inputs: Any, *, steps: int = 1, seed: int = 0,
          loss_fn: Callable[[Any], torch.Tensor] = default_loss, lr: float = 1e-2,
          autocast: torch.dtype | None = None, compile_kwargs: dict | None = None,
          meter_saved: bool = False, prepare: Callable[[nn.Module], None] | None = None
          ) -> list[Step]:
    """Trains a deep copy of ``model`` for ``steps`` SGD steps.

    Args:
        model: the module (not modified).
        backend: a torch.compile backend, or None for eager.
        inputs: a tensor (the one positional input), a tuple or list of positional inputs,
            or a dict of keyword inputs; tensors are cloned every step (so in-place mutation
            of an input does not leak between steps).
        steps: SGD steps.
        seed: ``torch.manual_seed`` before the first step (dropout draws).
        loss_fn: output -> scalar loss (default :func:`default_loss`).
        lr: SGD learning rate.
        autocast: run the forward under ``torch.autocast("cpu", dtype=autocast)``.
        compile_kwargs: more ``torch.compile`` arguments (``dynamic=True``).
        meter_saved: record each step's :func:`saved_tensor_bytes` (parameters excluded).
        prepare: called on the copy before compiling (e.g. enabling checkpointing).

    Returns:
        One :class:`Step` per step.
    """
    model = copy.deepcopy(model)
    if prepare is not None:
        prepare(model)
    fn = torch.compile(model, backend=backend, **(compile_kwargs or {})) if backend else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if params else None
    torch.manual_seed(seed)
    out_steps = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        args = _fresh(inputs)
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()

        def forward():
            with ctx:
                return call(fn, args)

        out, saved = saved_tensor_bytes(forward, exclude=params) if meter_saved else (forward(), None)
        loss = loss_fn(out)
        loss.backward()
        out_steps.append(Step(loss.detach(), _detach(out), [p.grad for p in params],
                              {k: v.detach().clone() for k, v in model.state_dict().items()},
                              saved))
        if opt is not None:
            opt.step()
    return out_steps


def assert_same_run(got: Sequence[Step], ref: Sequence[Step], *, rtol: float | None = None,
                    atol: float | None = None) -> None:
    """Losses, gradients and module state (buffers included) of every step are equal: bit
    for bit by default, or within ``rtol``/``atol`` (Inductor's kernels round differently).

    Raises:
        AssertionError: naming the step and the tensor that differs.
    """
    assert len(got) == len(ref), f"{len(got)} steps != {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_same_tensors([g.loss], [r.loss], rtol=rtol, atol=atol, what=f"step {i}: loss")
        assert_same_tensors(g.grads, r.grads, rtol=rtol, atol=atol, what=f"step {i}: grad")
        assert_same_tensors([g.state[k] for k in r.state], list(r.state.values()), rtol=rtol,
                            atol=atol, what=f"step {i}: state")


def assert_same_tensors(got: Sequence[Any], ref: Sequence[Any], *, rtol: float | None = None,
                        atol: float | None = None, what: str = "tensor") -> None:
    """Pairwise equal tensors (both None is equal): bit for bit, or within a tolerance."""
    assert len(got) == len(ref), f"{what}: {len(got)} != {len(ref)} tensors"
    for j, (a, b) in enumerate(zip(got, ref)):
        if a is None or b is None:
            assert a is None and b is None, f"{what} {j} is None in one run only"
        elif rtol is None and atol is None:
            assert torch.equal(a, b), f"{what} {j} differs by {(a - b).abs().max()}"
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"{what} {j}")


def ops_of(plan: Any, names: Sequence[str]) -> tuple[str, ...]:
    """The op of each named node of ``plan``'s decisions, without its overload (``"sin"``
    for ``aten.sin.default``; ``"primal"`` for a graph input), in the order given."""
    return tuple(plan.decisions[n].op.split(".")[0] for n in names)


def grads_of(fn: Callable[..., Any], inputs: Sequence[torch.Tensor],
             params: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, list]:
    """Runs ``fn(*inputs)`` (summed unless a scalar) forward and backward on fresh leaf
    copies of ``inputs``; returns (output, grads of the inputs that require grad, then of
    ``params``)."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*leaves)
    loss = out if out.dim() == 0 else out.sum()
    loss.backward()
    return out.detach(), [x.grad for x in leaves if x.requires_grad] + [p.grad for p in params]


class LiveStorages(compat.dispatch_mode_base()):
    """Tracks the bytes of live storages that ops create (the excluded inputs' aside).

    A dispatch mode that registers the untyped storage of every op output (keyed by its
    data pointer, with its ``nbytes()``), drops it when the storage is freed
    (``weakref.finalize``) and records the running total after each op.

    For graphs run directly (the partitioned forward and backward GraphModules of
    ``inner="eager"``, as :func:`measure_step` runs them). Not around a ``torch.compile``'d
    callable: Dynamo runs compiled code eagerly while a dispatch mode is active (use
    :class:`CompiledLiveStorages` there, for ``inner="eager"``), and Inductor's buffers are
    allocated past the dispatcher; measure a step compiled by Inductor with the profiler's
    allocator events instead (``torch.profiler.profile(profile_memory=True)``, as
    ``tests/test_inductor_order.py`` and ``bench/compare.py`` do).

    Attributes:
        total: bytes live now.
        peak: the largest ``total`` seen after an op, bytes.
        phase: a label the caller sets, recorded in ``log`` (:func:`measure_step`:
            ``"forward"``, ``"tangents"``, ``"backward"``).
        log: (phase, op name, total after the op's outputs were registered).
        boundary: ``total`` between the forward and the backward (set by measure_step).
        saved: bytes of the saved values' tracked storages, once each (set by measure_step).
    """

    def __init__(self, exclude: Sequence[Any] = ()) -> None:
        super().__init__()
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude
                         if isinstance(t, torch.Tensor)}
        self.live: dict[int, int] = {}
        self.total = 0
        self.peak = 0
        self.phase = ""
        self.log: list[tuple[str, str, int]] = []
        self.boundary = 0
        self.saved = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in compat.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._register(t.untyped_storage())
        self.peak = max(self.peak, self.total)
        self.log.append((self.phase, compat.op_name(func), self.total))
        return out

    def _register(self, storage) -> None:
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.excluded or ptr in self.live:
            return
        self.live[ptr] = storage.nbytes()
        self.total += storage.nbytes()
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.total -= self.live.pop(ptr)


class CompiledLiveStorages(LiveStorages):
    """:class:`LiveStorages` around code compiled with ``inner="eager"``: Dynamo keeps
    running the compiled frames (the mode ignores compilation, turned off while Dynamo
    compiles and on while the compiled graphs run), so every op of the partitioned forward
    and backward is seen, with the ops outside the compiled region (a pipeline schedule's,
    a loss function's, autograd's gradient accumulation).

    It counts the storages ops create, as Note [Memory model] in ckptfx/memory.py does:
    scratch memory inside one op (a kernel's workspace) is not seen. Storages that exist
    when it starts are not counted unless an op returns them (pass them in ``exclude``).

    Example:
        >>> import torch, ckptfx
        >>> from ckptfx.testing import CompiledLiveStorages
        >>> lin = torch.nn.Linear(64, 64)
        >>> f = torch.compile(lin, backend=ckptfx.CkptBackend(inner="eager"))
        >>> x = torch.randn(32, 64)
        >>> f(x).sum().backward()  # compiles
        >>> with CompiledLiveStorages(exclude=[*lin.parameters(), x]) as live:
        ...     f(x).sum().backward()
        >>> live.peak > 0
        True
    """

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True


def measure_step(fw: fx.GraphModule, bw: fx.GraphModule, primals: Sequence[Any],
                 hints: SizeHints = SizeHints()) -> LiveStorages:
    """Runs one step (``fw``, then ``bw``) as AOTAutograd's runtime runs compiled code, under
    a :class:`LiveStorages` tracker, and returns it.

    The graphs run boxed (each input dies after its last use) under ``no_grad``; tangents
    (ones) are allocated under the tracker just before the backward; the user outputs are
    dropped when the forward returns; the primals are not counted (Note [Memory model] in ckptfx/memory.py).

    Args:
        fw: the forward GraphModule of a partition.
        bw: its backward GraphModule.
        primals: the forward's inputs (tensors and, for dynamic shapes, ints).
        hints: the sizes of the symbols in this run (the tangents' shapes).
    """
    user_nodes, saved = saved_inputs(fw, bw)
    n_user = len(user_nodes)
    fw_run, bw_run = compat.boxed_copy(fw), compat.boxed_copy(bw)
    tracker = LiveStorages(exclude=primals)
    with torch.no_grad(), tracker:
        tracker.phase = FORWARD.value
        outs = list(fw_run(list(primals)))
        out_nodes = compat.arg_tree_leaves(*fw.graph.find_nodes(op="output")[0].args)
        by_name = {n.name: v for n, v in zip(out_nodes[n_user:], outs[n_user:])}
        del outs
        tracker.boundary = tracker.total
        saved_ptrs = {v.untyped_storage().data_ptr() for v in by_name.values()
                      if isinstance(v, torch.Tensor)}
        tracker.saved = sum(tracker.live.get(ptr, 0) for ptr in saved_ptrs)
        tracker.phase = "tangents"
        args = [torch.ones(hints.concrete_shape(p.meta["val"]), dtype=p.meta["val"].dtype)
                if p.name not in saved else by_name[saved[p.name].name]
                for p in bw.graph.find_nodes(op="placeholder")]
        del by_name
        tracker.phase = BACKWARD.value
        grads = bw_run(args)
        del grads
    return tracker


# --- toy graphs ---------------------------------------------------------------------------

N = 128  # a 128x128 fp32 tensor is 64 KiB


def chain(x):
    return x.sin().cos().tanh().sum()


def mlp(x, w1, w2):
    return (torch.relu(x @ w1) @ w2).sum()


def residual(x, w):
    return (x + torch.tanh(x @ w)).relu().sum()


def diamond(x):
    return (x.sin() * x.cos()).exp().sum()


def attention(q):
    s = q @ q.transpose(-1, -2) / 8.0
    return (s.softmax(-1) @ q).sum()


def layer_norm(x, w, b):
    return torch.nn.functional.layer_norm(x.tanh(), (x.shape[-1],), w, b).sin().sum()


def var_mean(x):
    var, mean = torch.var_mean(x.sin(), dim=-1, keepdim=True)
    return ((x - mean) * var.rsqrt()).sum()


def views(x, w):
    y = (x @ w).t().reshape(-1, 2 * N).contiguous()
    return y.exp().transpose(0, 1).sum()


def two_outputs(x):
    y = x.sin()  # saved for the backward and returned: alive to the end of the step
    return (y * y).sum(), y


def split(x):
    a, b = x.exp().split(N // 2)  # Tensor(a)[] return: both halves alias exp
    return (a * b).sum()


def leaf(*shape: int) -> torch.Tensor:
    """A seeded ``randn`` leaf that requires grad."""
    torch.manual_seed(0)
    return torch.randn(*shape, requires_grad=True)


def _seeded(module: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return module()


TOY_GRAPHS: dict[str, Callable[[], tuple[Callable[..., Any], list[torch.Tensor]]]] = {
    "chain": lambda: (chain, [leaf(N, N)]),
    "mlp": lambda: (_seeded(lambda: nn.Sequential(nn.Linear(N, 2 * N), nn.ReLU(),
                                                  nn.Linear(2 * N, N))), [torch.randn(4, 8, N)]),
    "residual": lambda: (residual, [leaf(N, N), leaf(N, N)]),
    "diamond": lambda: (diamond, [leaf(N, N)]),
    "attention": lambda: (attention, [leaf(4, 64, 32)]),
    "layer_norm": lambda: (layer_norm, [leaf(N, N), leaf(N), leaf(N)]),
    "var_mean": lambda: (var_mean, [leaf(N, N)]),
    "views": lambda: (views, [leaf(N, N), leaf(N, N)]),
    "two_outputs": lambda: (two_outputs, [leaf(N, N)]),
    "split": lambda: (split, [leaf(N, N)]),
    "batchnorm": lambda: (_seeded(lambda: nn.Sequential(nn.Linear(N, N), nn.BatchNorm1d(N),
                                                        nn.Tanh())), [torch.randn(64, N)]),
}
"""name -> a factory of (function or module, inputs): the toy graphs of ckptfx's own tests."""
