"""prepare_joint: the joint graph made ready for planning, in place.

The steps PyTorch's min-cut partitioner runs before it partitions, in its order: dead code is
eliminated, duplicate pure ops are merged (:mod:`ckptfx.passes.cse`; PyTorch's partitioner
runs its own CSE here), then AOTAutograd's own tag steps
(:func:`ckptfx._torch_compat.normalise_recompute_tags`).
"""

from __future__ import annotations

import torch.fx as fx

from ckptfx import _torch_compat as compat
from ckptfx.passes import cse


def prepare_joint(joint_module: fx.GraphModule) -> None:
    """Prepares ``joint_module`` (a joint forward+backward GraphModule) in place."""
    joint_module.graph.eliminate_dead_code()
    joint_module.recompile()
    cse.merge_duplicates(joint_module)
    compat.normalise_recompute_tags(joint_module)
