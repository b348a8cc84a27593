"""Budgeted routing for each family of router found in transformers' MoE models (docs/design.md §3).

Torch only; `architectures` says which rule a given transformers router follows. Every rule
chooses the kept set among the settings' candidates (every expert, or the union); it
takes the router's own unbudgeted output ``(logits, weights, ids)`` and returns a
`RoutingMasks` of fixed shapes, without host synchronisation (the drop-in compiles and exports):
when nothing is dropped it returns that output unchanged (bitwise), so a budget is a cap and
never a perturbation.

Rules:
- ``softmax_topk`` (Mixtral, Qwen2/3-MoE, OLMoE): `moespec.ops.budget_routing_masked` (on the
  settings' backend).
- ``sigmoid_group_topk`` (DeepSeek-V3): score = the biased selection score ``sigmoid(z) + b``
  (clamped at 0) normalised per token; substitute re-runs the model's group-limited top-k over
  the kept experts; weights are the unbiased sigmoid scores, renormalised if the model does,
  times the routed scaling factor.
- ``topk_logits_softmax`` (gpt-oss): score = full-softmax probability of the logits;
  substitute takes the top-k logits among the kept experts; weights are the softmax over the
  chosen (surviving) logits, as the model computes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops, reference
from ..types import RoutingMasks
from .config import LayerBudgets

__all__ = ["RouterSpec", "ROUTER_KINDS", "budget_router_output"]

ROUTER_KINDS = ("softmax_topk", "sigmoid_group_topk", "topk_logits_softmax")


@dataclass(frozen=True)
class RouterSpec:
    """The numbers that define a router's top-k rule (read once from the model).

    Attributes:
        kind: one of `ROUTER_KINDS`.
        num_experts: E.
        top_k: k.
        renormalize: the model renormalises its k weights (Mixtral; ``norm_topk_prob``).
        n_group, topk_group: group-limited selection (DeepSeek-V3).
        routed_scaling_factor: multiplies the routed weights (DeepSeek-V3).
    """

    kind: str
    num_experts: int
    top_k: int
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"RouterSpec.kind must be one of {ROUTER_KINDS}, got {self.kind!r}")


def budget_router_output(
    spec: RouterSpec,
    logits: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    cap: Optional[int],
    settings: LayerBudgets,
    correction_bias: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
) -> RoutingMasks:
    """Apply one layer's budget to one call's router output (fixed shapes, no host sync).

    Args:
        spec: the router's rule.
        logits: ``[T, E]`` router logits as the model returns them.
        weights, ids: ``[T, k]`` the model's unbudgeted top-k weights and ids.
        cap: this layer's cap (None: coverage only).
        settings: policy, score mode, coverage, min_budget, candidates, and the ops backend (the
            ``softmax_topk`` rule's `moespec.ops.budget_routing_masked`; the other rules are
            plain torch ops on the logits' device).
        correction_bias: ``[E]`` DeepSeek-V3's ``e_score_correction_bias``.
        token_mask: ``[T]`` bool, False for padding tokens: they count neither towards the
            union nor the scores, and get zero weights.

    Returns:
        `RoutingMasks` whose weights have the dtype of ``weights``: the model's own ids and
        weights (bitwise) where the union fits the effective budget; dropped pairs (truncate)
        have weight 0, so the experts need no kept set to skip them.
    """
    E = spec.num_experts
    min_budget = spec.top_k if settings.min_budget is None else settings.min_budget
    if spec.kind == "softmax_topk":
        r = ops.budget_routing_masked(logits, spec.top_k, cap, settings.policy, spec.renormalize, settings.score,
                                      settings.coverage, settings.min_budget, token_mask=token_mask,
                                      candidates=settings.candidates, backend=settings.backend)
        new_ids, new_w, kept, union, budgeted = r
    else:
        umask = reference.union_mask(ids, E, token_mask)
        union = umask.sum()
        rows = None if token_mask is None else token_mask.reshape(-1, 1)
        if settings.score == "topk":
            w = weights if rows is None else weights * rows
            scores = reference.score_experts(None, "topk", ids, w, num_experts=E)
        else:
            share = (_sigmoid_selection_share(logits, correction_bias) if spec.kind == "sigmoid_group_topk"
                     else torch.softmax(logits.float(), dim=-1))
            scores = (share if rows is None else share * rows).sum(dim=0)
        cmask = umask if settings.candidates == "union" else torch.ones_like(umask)
        kept, kept_count = reference.select_kept_mask(scores, cmask, cap, settings.coverage, min_budget)
        budgeted = kept_count < union
        if spec.kind == "sigmoid_group_topk":
            new_ids, new_w = _reroute_sigmoid_group(spec, logits, ids, kept, settings.policy, correction_bias)
        else:
            new_ids, new_w = _reroute_topk_logits(spec, logits, ids, kept, settings.policy)
        kept = torch.where(budgeted, kept, umask)
    out_ids = torch.where(budgeted, new_ids, ids)
    out_w = torch.where(budgeted, new_w.to(weights.dtype), weights)
    if token_mask is not None:
        out_w = torch.where(token_mask.reshape(-1, 1), out_w, torch.zeros_like(out_w))
    return RoutingMasks(out_ids, out_w, kept, union, budgeted)


# ----------------------------------------------------------------------------- DeepSeek-V3


def _selection_scores(logits: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmoid(z), sigmoid(z) + bias)`` in fp32, as the model computes them."""
    probs = logits.float().sigmoid()
    choice = probs if bias is None else probs + bias.float()
    return probs, choice


def _sigmoid_selection_share(logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-token share of each expert in the biased selection score: ``[T, E]`` rows summing to 1.

    The correction bias can make a score negative; clamping at 0 keeps each row a
    distribution, so one token cannot outweigh another in the per-call sum.
    """
    _, choice = _selection_scores(logits, bias)
    choice = choice.clamp(min=0)
    return choice / choice.sum(dim=-1, keepdim=True).clamp(min=1e-20)


def _reroute_sigmoid_group(
    spec: RouterSpec,
    logits: torch.Tensor,
    ids: torch.Tensor,
    kept_mask: torch.Tensor,
    policy: str,
    bias: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 ids and weights within the kept set.

    Substitute: the model's group-limited top-k, run on the biased scores of the kept experts
    only. A group is ranked by the sum of its (up to) two best kept experts; a group without
    kept experts is never chosen. If the chosen groups hold fewer than k kept experts, the
    remaining slots take the best kept experts of the other groups, so every token keeps k.
    """
    probs, choice = _selection_scores(logits, bias)
    T, E = probs.shape
    k = spec.top_k
    if policy == "substitute":
        masked = choice.masked_fill(~kept_mask, float("-inf"))
        per_group = E // spec.n_group
        best2 = masked.view(T, spec.n_group, per_group).topk(min(2, per_group), dim=-1).values
        finite = torch.isfinite(best2)
        group_scores = torch.where(finite, best2, torch.zeros_like(best2)).sum(dim=-1)
        group_scores = group_scores.masked_fill(~finite.any(dim=-1), float("-inf"))
        chosen = torch.topk(group_scores, spec.topk_group, dim=-1).indices
        in_group = torch.zeros(T, spec.n_group, dtype=torch.bool, device=probs.device)
        in_group.scatter_(1, chosen, True)
        in_group = in_group.repeat_interleave(per_group, dim=1)
        # Rank by tier (kept and in a chosen group > kept elsewhere > not kept), then score.
        tier = kept_mask.long().unsqueeze(0) * (1 + in_group.long())
        by_score = torch.sort(choice, dim=-1, descending=True, stable=True).indices
        by_tier = torch.sort(tier.gather(1, by_score), dim=-1, descending=True, stable=True).indices
        new_ids = by_score.gather(1, by_tier)[:, :k]
        w = probs.gather(1, new_ids)
    elif policy == "truncate":
        new_ids, alive = reference.reroute(choice, ids, kept_mask, "truncate")
        w = probs.gather(1, new_ids) * alive
    else:
        raise ValueError(f"unknown policy {policy!r}")
    if spec.renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return new_ids, w * spec.routed_scaling_factor


# ----------------------------------------------------------------------------- gpt-oss


def _reroute_topk_logits(
    spec: RouterSpec,
    logits: torch.Tensor,
    ids: torch.Tensor,
    kept: torch.Tensor,
    policy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss ids and weights: softmax over the chosen logits (in the logits' dtype, as the model).

    Softmax over a subset of logits equals the full-softmax probabilities renormalised over
    that subset, which is docs/design.md §3's rule for a model that renormalises.
    """
    new_ids, alive = reference.reroute(logits, ids, kept, policy)
    chosen = logits.gather(1, new_ids).masked_fill(~alive, float("-inf"))
    w = torch.softmax(chosen, dim=1, dtype=logits.dtype)
    # A token whose k experts were all dropped (truncate) gets zero routed output, not NaN.
    return new_ids, torch.where(alive, w, torch.zeros_like(w))
