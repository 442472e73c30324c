"""RematPass: ckptfx as a ``torch.fx.passes.infra`` pass over a joint graph.

The pass plans on a joint forward+backward GraphModule and records each candidate node's
:class:`~ckptfx.plan.Decision` in ``node.meta["ckptfx.decision"]``; it does not change the
graph's computation (``PassResult.modified`` is False). The plan, the partitioned forward and
backward modules and the report are kept on the pass (``last_plan``, ``last_fw``,
``last_bw``, ``last_report``) for later stages of a pipeline.

Example:
    >>> import torch, ckptfx
    >>> from torch.fx.passes.infra.pass_manager import PassManager
    >>> x = torch.randn(8, 8, requires_grad=True)
    >>> joint = ckptfx.trace_joint(lambda x: x.exp().tanh().sum(), x)
    >>> remat = ckptfx.passes.RematPass(num_fwd_outputs=joint.num_fwd_outputs)
    >>> _ = PassManager([remat])(joint.gm)
    >>> remat.last_plan.solver
    'mincut'
"""

from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ckptfx.config import RematConfig
from ckptfx.joint import JointGraph

DECISION_KEY = "ckptfx.decision"


class RematPass(PassBase):
    """Plans rematerialization on a joint graph (see module docstring).

    Args:
        config: options (default RematConfig()).
        num_fwd_outputs: how many leading outputs of the joint graph are forward outputs.
        static_lifetime_input_indices: primal indices with static lifetime (parameters).
    """

    def __init__(self, config: RematConfig | None = None, *, num_fwd_outputs: int,
                 static_lifetime_input_indices=None) -> None:
        super().__init__()
        self.config = RematConfig.coerce(config)
        self.num_fwd_outputs = num_fwd_outputs
        self.static = static_lifetime_input_indices
        self.last_plan = self.last_fw = self.last_bw = self.last_report = None

    def requires(self, graph_module) -> None:
        graph_module.graph.lint()

    def call(self, graph_module) -> PassResult:
        from ckptfx.passes.prepare import prepare_joint
        from ckptfx.pipeline import partition_joint

        prepare_joint(graph_module)
        joint = JointGraph.from_partition_args(
            graph_module, None, num_fwd_outputs=self.num_fwd_outputs,
            static_lifetime_input_indices=self.static)
        fw, bw, report, plan = partition_joint(joint, self.config, return_plan=True)
        for node in graph_module.graph.nodes:
            if node.name in plan.decisions:
                node.meta[DECISION_KEY] = plan.decisions[node.name]
        self.last_plan, self.last_fw, self.last_bw, self.last_report = plan, fw, bw, report
        return PassResult(graph_module, False)
