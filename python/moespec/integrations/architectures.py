"""Which transformers (v5) MoE blocks moespec supports, and how to read each one.

This table is the only place that knows the class and attribute names of transformers' MoE
modules (see the project notes, §1.1): the block class, its router child and the router's
rule, and how the fused experts' weights are laid out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..types import ExpertLayout
from .routing import RouterSpec

__all__ = [
    "BlockSpec",
    "SUPPORTED_BLOCKS",
    "supported_architectures",
    "find_moe_blocks",
    "describe_unsupported",
    "expert_layout",
    "expert_weights",
    "bytes_per_expert",
]


@dataclass(frozen=True)
class BlockSpec:
    """How one transformers MoE block class is budgeted.

    Attributes:
        name: human-readable architecture name.
        model_type: transformers ``config.model_type``.
        router_attr: the block's router child (``gate`` or ``router``).
        router_kind: routing rule (`moespec.integrations.routing.ROUTER_KINDS`).
        always_renormalize: the router renormalises unconditionally (Mixtral); otherwise it
            follows the router's ``norm_topk_prob``.
    """

    name: str
    model_type: str
    router_attr: str
    router_kind: str
    always_renormalize: bool = False

    def router_spec(self, router: torch.nn.Module) -> RouterSpec:
        """Read the router's top-k rule from its attributes."""
        renorm = self.always_renormalize or bool(getattr(router, "norm_topk_prob", False))
        if self.router_kind == "sigmoid_group_topk":
            return RouterSpec(self.router_kind, int(router.num_experts), int(router.top_k), renorm,
                              n_group=int(router.num_group), topk_group=int(router.topk_group),
                              routed_scaling_factor=float(router.routed_scaling_factor))
        return RouterSpec(self.router_kind, int(router.num_experts), int(router.top_k), renorm)

    @staticmethod
    def correction_bias(router: torch.nn.Module) -> Optional[torch.Tensor]:
        """DeepSeek-V3's selection bias buffer (None for other routers)."""
        return getattr(router, "e_score_correction_bias", None)


# Keyed by block class name: classes are matched by name so that importing moespec never
# imports every transformers model module.
SUPPORTED_BLOCKS: dict[str, BlockSpec] = {
    "MixtralSparseMoeBlock": BlockSpec("Mixtral", "mixtral", "gate", "softmax_topk", always_renormalize=True),
    "Qwen2MoeSparseMoeBlock": BlockSpec("Qwen2-MoE", "qwen2_moe", "gate", "softmax_topk"),
    "Qwen3MoeSparseMoeBlock": BlockSpec("Qwen3-MoE", "qwen3_moe", "gate", "softmax_topk"),
    "OlmoeSparseMoeBlock": BlockSpec("OLMoE", "olmoe", "gate", "softmax_topk"),
    "DeepseekV3MoE": BlockSpec("DeepSeek-V3", "deepseek_v3", "gate", "sigmoid_group_topk"),
    "GptOssMLP": BlockSpec("gpt-oss", "gpt_oss", "router", "topk_logits_softmax"),
}


def supported_architectures() -> list[str]:
    """``"Name (model_type)"`` for every supported architecture."""
    return [f"{s.name} ({s.model_type})" for s in SUPPORTED_BLOCKS.values()]


def _is_fused_v5(block: torch.nn.Module, spec: BlockSpec) -> bool:
    experts = getattr(block, "experts", None)
    router = getattr(block, spec.router_attr, None)
    w = getattr(experts, "gate_up_proj", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 3 and isinstance(getattr(experts, "down_proj", None),
                                                                        torch.Tensor)
            and isinstance(getattr(router, "weight", None), torch.Tensor))


def find_moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, BlockSpec]]:
    """Supported MoE blocks of ``model`` in module order: ``(qualified name, block, spec)``."""
    found = []
    for name, module in model.named_modules():
        spec = SUPPORTED_BLOCKS.get(type(module).__name__)
        if spec is not None and _is_fused_v5(module, spec):
            found.append((name, module, spec))
    return found


def describe_unsupported(model: torch.nn.Module) -> str:
    """A message saying why ``model`` cannot be patched and what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    what = type(model).__name__ + (f" (model_type={model_type!r})" if model_type else "")
    # Name MoE-looking blocks we saw, so the user knows whether it is an architecture or a
    # version problem (v4 blocks hold an nn.ModuleList of experts, not fused tensors).
    seen = sorted({type(m).__name__ for _, m in model.named_modules()
                   if hasattr(m, "experts") and type(m).__name__ != "GptOssExperts"})
    detail = ""
    if seen:
        detail = f"; it has MoE blocks of class {', '.join(seen)}"
        if any(n in SUPPORTED_BLOCKS for n in seen):
            detail += " without transformers v5 fused experts (gate_up_proj/down_proj); transformers>=5 is needed"
    return (f"moespec.patch: {what} has no supported MoE block{detail}. "
            f"Supported architectures: {', '.join(supported_architectures())}. The model was left untouched.")


def expert_layout(experts: torch.nn.Module) -> Optional[ExpertLayout]:
    """The `ExpertLayout` of a transformers fused experts module, or None if moespec cannot run it.

    Reads the flags set by transformers' ``@use_experts_implementation``: transposed storage,
    interleaved gate/up (gpt-oss), biases, and which gated activation ``_apply_gate`` computes.
    """
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
        return None
    transposed = bool(getattr(experts, "is_transposed", False))
    order = "gate_up" if getattr(experts, "is_concatenated", True) else "interleaved"
    if type(experts).__name__ == "GptOssExperts":
        return ExpertLayout(gate_up=order, transposed=transposed, activation="clamped_swiglu",
                            alpha=float(experts.alpha), limit=float(experts.limit))
    act = getattr(experts, "act_fn", None)
    # Only the default gate (act(gate) * up) with SiLU matches the "silu" layout.
    default_gate = getattr(type(experts)._apply_gate, "__name__", "") == "_default_apply_gate"
    if act is None or not default_gate or not _is_silu(act):
        return None
    return ExpertLayout(gate_up=order, transposed=transposed, activation="silu")


def _is_silu(act) -> bool:
    if isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return True
    return act is torch.nn.functional.silu


def expert_weights(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                                     Optional[torch.Tensor]]:
    """``(w_gate_up, w_down, b_gate_up, b_down)`` of a fused experts module (biases may be None)."""
    has_bias = bool(getattr(experts, "has_bias", False))
    return (experts.gate_up_proj, experts.down_proj,
            getattr(experts, "gate_up_proj_bias", None) if has_bias else None,
            getattr(experts, "down_proj_bias", None) if has_bias else None)


def bytes_per_expert(experts: torch.nn.Module) -> int:
    """Bytes of one routed expert's weights (and biases) in their storage dtype."""
    total = 0
    for t in expert_weights(experts):
        if t is not None:
            total += (t.numel() // t.shape[0]) * t.element_size()
    return int(total)
