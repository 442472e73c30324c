"""ckptfx: automatic activation rematerialization (gradient checkpointing) for torch.compile.

ckptfx decides, for every forward tensor the backward pass needs, whether to save it or to
recompute it in the backward, and rewrites AOTAutograd's forward and backward graphs to do so.

Entry points:
    ``torch.compile(model, backend="ckpt", options={...})``     (no import needed)
    ``backend = ckptfx.CkptBackend(memory_budget=0.5)``          (keeps ``backend.reports``)
    ``joint = ckptfx.trace_joint(model, *inputs)``; ``plan = ckptfx.plan_remat(joint, config)``;
    ``fw, bw, report = ckptfx.apply_plan(joint, plan)``
    ``ckptfx.partition_fn(config)`` for ``aot_function``/``aot_module``
    ``ckptfx.passes.RematPass`` for ``torch.fx.passes.infra`` pipelines

Importing ckptfx imports torch but not torch._dynamo, torch._inductor, networkx or scipy.
"""

from ckptfx import errors, policies
from ckptfx.backend import CkptBackend
from ckptfx.config import MemoryBudget, RematConfig
from ckptfx.frontier import FrontierRow, pareto
from ckptfx.errors import (
    CkptfxError,
    ConfigError,
    InfeasibleBudgetError,
    PlanValidationError,
    UnsupportedGraphError,
)
from ckptfx.joint import JointGraph, Role, trace_joint
from ckptfx.passes.partition import apply_plan, partition_fn
from ckptfx.plan import Decision, RematPlan
from ckptfx.planner import plan_remat
from ckptfx.report import RematReport
from ckptfx import passes  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CkptBackend", "CkptfxError", "ConfigError", "Decision", "InfeasibleBudgetError",
    "FrontierRow", "JointGraph", "MemoryBudget", "PlanValidationError", "RematConfig", "RematPlan",
    "RematReport", "Role", "UnsupportedGraphError", "apply_plan", "errors", "pareto", "partition_fn",
    "passes", "plan_remat", "policies", "trace_joint",
]
