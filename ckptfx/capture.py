"""capture_joints: the joint graphs ``torch.compile`` builds for a model, ready to plan.

``ckptfx.trace_joint`` traces with ``aot_module`` alone: its graphs carry no module paths and
it fails on code Dynamo handles (transformers' masking code, data-dependent Python). This
stage compiles a copy of the model with Dynamo, runs one forward and backward, and keeps every
joint graph AOTAutograd builds, prepared exactly as :func:`ckptfx.partition_fn` prepares it,
so the graphs carry ``nn_module_stack``/``stack_trace`` metadata and, under ``dynamic=True``
or ``torch._dynamo.mark_dynamic``, symbolic sizes.

Example:
    >>> import torch
    >>> from ckptfx.capture import capture_joints
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    >>> joints = capture_joints(model, torch.randn(4, 8))
    >>> len(joints)
    1
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckptfx.errors import UnsupportedGraphError


def default_loss(out: Any) -> torch.Tensor:
    """A scalar to call ``backward()`` on from a model's output.

    The output's ``loss`` (a transformers ``ModelOutput`` given ``labels``, or a dict with a
    ``"loss"`` key) when it has one; else the sum of its first tensor (the logits).

    Raises:
        UnsupportedGraphError: the output holds no tensor that requires grad.
    """
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    leaves = [t for t in _tensors(out) if t.requires_grad]
    if not leaves:
        raise UnsupportedGraphError(
            "the model's output holds no tensor that requires grad, so there is no backward "
            "to plan; return a loss or logits from a model with trainable parameters")
    return leaves[0].float().sum()


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    elif hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def call(module: Callable[..., Any], inputs: Any) -> Any:
    """Calls ``module`` with example inputs: a tensor, a tuple/list of positional arguments,
    or a dict of keyword arguments."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, (list, tuple)):
        return module(*inputs)
    return module(inputs)


def capture_joints(module: torch.nn.Module, inputs: Any, *,
                   loss: Callable[[Any], torch.Tensor] | None = None,
                   dynamic: bool | None = None) -> list[Any]:
    """Compiles a deep copy of ``module``, runs forward and backward once, returns every
    JointGraph AOTAutograd built (one per Dynamo graph, in compile order).

    Dynamo's caches are reset before and after (``torch._dynamo.reset()``), so call it
    before, not while, training with other compiled functions.

    Args:
        module: an ``nn.Module`` (not modified: a copy is compiled).
        inputs: its example inputs: a tensor, a tuple of positional arguments, or a dict of
            keyword arguments. Tensors marked with ``torch._dynamo.mark_dynamic`` keep those
            dimensions symbolic.
        loss: maps the output to a scalar (default :func:`default_loss`).
        dynamic: ``torch.compile``'s ``dynamic`` (True: every size symbolic).

    Returns:
        The JointGraphs; their ``gm`` nodes carry fake ``meta["val"]`` and module metadata.

    Raises:
        UnsupportedGraphError: Dynamo produced no graph with a backward (the model ran
            eagerly, e.g. ``nn.LSTM`` without ``torch._dynamo.config.allow_rnn = True``, or
            nothing requires grad).
    """
    from ckptfx import _torch_compat as compat

    joints: list[Any] = []
    compat.dynamo_reset()
    try:
        compiled = torch.compile(copy.deepcopy(module), backend=_capturing_backend(joints),
                                 dynamic=dynamic)
        (loss or default_loss)(call(compiled, inputs)).backward()
    finally:
        compat.dynamo_reset()
    if not joints:
        raise UnsupportedGraphError(no_graph_message(module))
    return joints


def no_graph_message(module: Any) -> str:
    """Why a compile gave ckptfx no joint graph to plan, and what to do about it."""
    rnn = isinstance(module, torch.nn.Module) and any(
        isinstance(m, torch.nn.RNNBase) for m in module.modules())
    hint = ("it holds an nn.RNN/LSTM/GRU, which Dynamo runs eagerly unless "
            "torch._dynamo.config.allow_rnn = True" if rnn else
            "Dynamo ran it eagerly (see TORCH_LOGS=graph_breaks) or nothing in it requires grad")
    return f"torch.compile produced no graph with a backward for ckptfx to plan: {hint}"


def _capturing_backend(joints: list[Any]):
    """An AOTAutograd backend that records each prepared JointGraph and partitions it with
    PyTorch's default partitioner, running the graphs uncompiled."""
    from functorch.compile import default_partition, make_boxed_func

    from ckptfx import _torch_compat as compat
    from ckptfx.joint import JointGraph
    from ckptfx.passes.prepare import prepare_joint

    def capture(gm, joint_inputs, *, num_fwd_outputs, **kwargs):
        prepare_joint(gm)
        joints.append(JointGraph.from_partition_args(
            gm, joint_inputs, num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=kwargs.get("static_lifetime_input_indices")))
        return default_partition(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs)

    def nop(gm, _inputs):
        return make_boxed_func(gm.forward)

    return compat.aot_autograd_backend(fw_compiler=nop, bw_compiler=nop, partition_fn=capture)


class _Captured(Exception):
    """Raised by :func:`inductor_joint`'s partitioner once it holds the joint graph: there is
    nothing left for Inductor to do."""


def inductor_joint(module: torch.nn.Module, inputs: Any, *,
                   loss: Callable[[Any], torch.Tensor] | None = None) -> Any:
    """The first joint graph of ``module`` as ``torch.compile``'s Inductor hands it to a
    partitioner: Inductor's decompositions and joint-graph passes applied, then prepared as
    :func:`ckptfx.partition_fn` prepares it. Compiling stops there: no code is generated,
    the model does not run, and later graphs (after a graph break) are not captured.

    Args:
        module: an ``nn.Module`` (not modified: a copy is compiled).
        inputs: its example inputs (as for :func:`capture_joints`).
        loss: maps the output to a scalar (default :func:`default_loss`).

    Returns:
        The JointGraph (``joint_inputs`` fake, ``static_input_names`` from Inductor's
        static-lifetime indices).

    Raises:
        UnsupportedGraphError: Dynamo produced no graph with a backward.
    """
    from ckptfx import _torch_compat as compat

    joints: list[Any] = []

    def backend(gm, example_inputs):
        patches = {"custom_partitioner_fn": _recording_partitioner(joints),
                   "force_disable_caches": True}  # a cache hit would skip the partitioner
        return compat.compile_fx(gm, example_inputs, config_patches=patches)

    compat.dynamo_reset()
    try:
        compiled = torch.compile(copy.deepcopy(module), backend=backend)
        (loss or default_loss)(call(compiled, inputs)).backward()
    except Exception as exc:  # noqa: BLE001 - Dynamo wraps the partitioner's _Captured
        if not joints:
            raise
        if not _caused_by_capture(exc):
            raise
    finally:
        compat.dynamo_reset()
    if not joints:
        raise UnsupportedGraphError(no_graph_message(module))
    return joints[0]


def _caused_by_capture(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, _Captured):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _recording_partitioner(joints: list[Any]):
    """An Inductor ``custom_partitioner_fn`` that prepares and records the joint graph, then
    stops the compile (:class:`_Captured`)."""
    from ckptfx import _torch_compat as compat
    from ckptfx.joint import JointGraph
    from ckptfx.passes.prepare import prepare_joint

    class Recorder(compat.inductor_partitioner_base()):
        def __call__(self, gm, joint_inputs, *, num_fwd_outputs, **kwargs):
            prepare_joint(gm)
            joints.append(JointGraph.from_partition_args(
                gm, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                static_lifetime_input_indices=kwargs.get("static_lifetime_input_indices")))
            raise _Captured()

        def uuid(self) -> Any:
            return None

    return Recorder()


def dynamo_joints(module: torch.nn.Module, *inputs: Any,
                  loss: Callable[[Any], torch.Tensor] | None = None,
                  dynamic: bool | None = None) -> list[Any]:
    """:func:`capture_joints` with positional inputs (``dynamo_joints(model, x, y)``)."""
    return capture_joints(module, tuple(inputs), loss=loss, dynamic=dynamic)

