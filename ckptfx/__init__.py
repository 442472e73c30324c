"""ckptfx: automatic activation rematerialization (gradient checkpointing) for torch.compile.

ckptfx decides, for every forward tensor the backward pass needs, whether to save it or to
recompute it in the backward, and rewrites AOTAutograd's forward and backward graphs to do so.

Entry points:
    ``torch.compile(model, backend="ckpt", options={...})``     (no import needed)
    ``backend = ckptfx.CkptBackend(memory_budget=0.5)``          (keeps ``backend.reports``)
    ``joint = ckptfx.trace_joint(model, *inputs)``; ``plan = ckptfx.plan_remat(joint, config)``;
    ``fw, bw, report = ckptfx.apply_plan(joint, plan)``
    ``joints = ckptfx.capture_joints(model, inputs)``: the joint graphs torch.compile builds
    (module paths, transformers models, symbolic sizes under ``dynamic=True``)
    ``ckptfx.partition_fn(config)`` for ``aot_function``/``aot_module``
    ``ckptfx.passes.RematPass`` for ``torch.fx.passes.infra`` pipelines

Importing ckptfx imports nothing heavy: each public name loads its module on first use,
and none of them imports torch._dynamo, torch._inductor, networkx or scipy at import.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# ``ckptfx --help`` and ``import ckptfx`` stay instant and import no torch until needed.
_EXPORTS = {
    "CkptBackend": "ckptfx.backend",
    "MemoryBudget": "ckptfx.config", "RematConfig": "ckptfx.config",
    "FrontierRow": "ckptfx.frontier", "pareto": "ckptfx.frontier",
    "CkptfxError": "ckptfx.errors", "ConfigError": "ckptfx.errors",
    "InfeasibleBudgetError": "ckptfx.errors", "PlanValidationError": "ckptfx.errors",
    "UnsupportedGraphError": "ckptfx.errors",
    "JointGraph": "ckptfx.joint", "Role": "ckptfx.joint", "trace_joint": "ckptfx.joint",
    "apply_plan": "ckptfx.pipeline", "partition_fn": "ckptfx.passes.partition",
    "Action": "ckptfx.plan", "Decision": "ckptfx.plan", "RematPlan": "ckptfx.plan",
    "plan_remat": "ckptfx.pipeline",
    "RematReport": "ckptfx.report",
    "capture_joints": "ckptfx.capture",
    "pipeline_stage_options": "ckptfx.stages", "RankMismatchError": "ckptfx.errors",
}
_SUBMODULES = ("errors", "policies", "passes", "capture", "timeline", "formula", "testing")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"ckptfx.{name}")
    else:
        raise AttributeError(f"module 'ckptfx' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
