"""Megatron-LM's selective activation recomputation as a ckptfx policy.

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(MLSys 2023), section 5: keep the outputs of the linear layers, recompute the attention core.
Re-exported as ``ckptfx.policies.megatron_selective`` (built-in name ``"megatron_selective"``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from typing import Any

from ckptfx.votes import MUST_RECOMPUTE, MUST_SAVE, PREFER_RECOMPUTE, Vote


@functools.lru_cache(maxsize=1)
def _op_classes() -> dict[str, frozenset[Any]]:
    """aten op packets by role (torch imported on first use)."""
    import torch

    aten = torch.ops.aten
    return {
        "linear": frozenset({aten.mm, aten.addmm, aten.linear, aten._int_mm, aten.convolution,
                             aten._convolution, aten.addbmm}),
        "batched": frozenset({aten.bmm, aten.baddbmm, aten.matmul}),
        "softmax": frozenset({aten._softmax, aten.softmax, aten._safe_softmax}),
        "fused": frozenset({
            aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention,
            aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
            aten._scaled_dot_product_flash_attention_for_cpu, aten._flash_attention_forward,
            aten._efficient_attention_forward}),
    }


@dataclasses.dataclass(frozen=True)
class megatron_selective:
    """Megatron-LM's selective activation recomputation (Korthikanti et al., "Reducing
    Activation Recomputation in Large Transformer Models", MLSys 2023, section 5).

    Saves the outputs of the expensive linear layers and recomputes the attention core
    (QKᵀ, scale, mask, softmax, dropout, ·V), whose ``seq x seq`` activations are large but
    cheap to recompute, and prefers recomputing cheap ops elsewhere. Votes, from a node's
    facts alone:

    * attention core: a tensor op run by an attention module's own code (its innermost
      module class matches ``attention_modules``; the Q/K/V/output projections run in
      ``Linear``/``Conv1D`` children and are not core), except 2-D matmuls; in graphs
      without module metadata, batched matmuls and softmax: MUST_RECOMPUTE.
    * other compute-intensive ops (the linear layers): MUST_SAVE.
    * fused attention kernels (SDPA, flash/efficient/cuDNN attention): no vote. They keep
      no ``seq x seq`` activation, so recomputing them frees only their small outputs; the
      min-cut keeps them as compute-intensive.
    * other ops (pointwise, normalisation, reductions): PREFER_RECOMPUTE if
      ``recompute_cheap``; a large enough byte difference still saves them.
    * views, random ops, ops with side effects, non-tensors: no vote. Views follow their
      base; random ops are not recomputed (no RNG replay), so attention dropout with p > 0
      keeps its output saved.

    Args:
        attention_modules: ``fnmatch`` globs over module class names, matched without case.
        recompute_cheap: prefer recomputing cheap ops outside the attention core.

    Example:
        >>> import torch, ckptfx
        >>> backend = ckptfx.CkptBackend(inner="eager", policy="megatron_selective")
    """

    attention_modules: tuple[str, ...] = ("*attention*",)
    recompute_cheap: bool = True

    def _in_attention_code(self, facts) -> bool:
        if not facts.module_types:
            return False
        innermost = facts.module_types[-1].lower()
        return any(fnmatch.fnmatchcase(innermost, g.lower()) for g in self.attention_modules)

    def __call__(self, facts) -> Vote | None:
        if (not facts.is_tensor or facts.is_view or facts.is_random or facts.ban_reason
                or facts.target is None):
            return None
        ops = _op_classes()
        packet = getattr(facts.target, "overloadpacket", facts.target)
        if packet in ops["fused"]:
            return None
        if facts.module_types:
            core = self._in_attention_code(facts) and packet not in ops["linear"]
        else:
            core = packet in ops["batched"] or packet in ops["softmax"]
        if core:
            return Vote(MUST_RECOMPUTE, f"megatron_selective: attention core ({facts.op_name})")
        if facts.compute_intensive:
            return Vote(MUST_SAVE, f"megatron_selective: output of a linear layer ({facts.op_name})")
        if self.recompute_cheap:
            return Vote(PREFER_RECOMPUTE, f"megatron_selective: cheap op ({facts.op_name})")
        return None
