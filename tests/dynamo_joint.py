"""Test helper: the JointGraph Dynamo + AOTAutograd build for a module, with module metadata.

``ckptfx.trace_joint`` traces with ``aot_module``, whose graphs carry no ``nn_module_stack``;
module-aware policies (``save_modules``, ``megatron_selective``, ``uniform``) need the graph
``torch.compile`` builds. This captures the (first) joint graph of a compiled call, prepared
exactly as ``ckptfx.partition_fn`` prepares it, so tests can plan it under many configs.
"""

from __future__ import annotations

import copy

import torch


def dynamo_joints(module, *inputs, loss=None):
    """Compiles a deep copy of ``module``, runs forward+backward once, returns every JointGraph.

    Args:
        module: an nn.Module.
        *inputs: its inputs.
        loss: maps the output to a scalar (default: ``out.sum()`` for tensors).

    Returns:
        The JointGraphs in compile order (one per Dynamo graph).
    """
    from functorch.compile import default_partition, make_boxed_func

    from ckptfx import _torch_compat as compat
    from ckptfx.joint import JointGraph

    joints = []

    def capture(gm, joint_inputs, *, num_fwd_outputs, **kwargs):
        compat.prepare_joint(gm)
        joints.append(JointGraph.from_partition_args(
            gm, joint_inputs, num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=kwargs.get("static_lifetime_input_indices")))
        return default_partition(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs)

    def nop(gm, _):
        return make_boxed_func(gm.forward)

    backend = compat.aot_autograd_backend(fw_compiler=nop, bw_compiler=nop, partition_fn=capture)
    torch._dynamo.reset()
    out = torch.compile(copy.deepcopy(module), backend=backend)(*inputs)
    (loss or (lambda o: o.sum()))(out).backward()
    torch._dynamo.reset()
    return joints
