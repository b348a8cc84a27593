"""The PyTorch reference: the exact semantics of every moespec op (docs/design.md §3).

Runs on any device and for fp32, bf16 and fp16 inputs. `moespec.ops` validates inputs and then
calls either these functions or the CUDA kernels, which must agree with them (bitwise for
routing decisions, to dtype tolerance for the expert math).

Conventions:
- routing math is done in fp32 (router logits of any float dtype are upcast first);
- top-k follows ``torch.topk`` on the fp32 probabilities, exactly as transformers' routers do;
- the kept set is chosen among the *candidates*, ranked by score, ties to the lower expert id:
  every expert (``candidates="all"``, MoE-Spec's rule) or the union only (``"union"``, the
  experts in at least one token's top-k; the default, chosen by measurement); either way a
  budget applies only when the union has more experts than it;
- expert math accumulates in fp32; the SwiGLU intermediate is rounded to the activation dtype
  (as a fused kernel that stores it in bf16 does); slots are combined in slot order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .types import BudgetedRouting, ExpertLayout, ExpertUnion

__all__ = [
    "CANDIDATES",
    "default_candidates",
    "route_topk_softmax",
    "expert_union",
    "score_experts",
    "select_experts",
    "select_kept_mask",
    "union_mask",
    "effective_budget",
    "reroute",
    "budget_routing",
    "budget_routing_masked",
    "moe_experts",
    "budgeted_moe",
]


# ----------------------------------------------------------------------------- routing

CANDIDATES = ("all", "union")


def default_candidates(policy: str) -> str:
    """The candidate set a policy uses unless told otherwise (docs/budget-rules.md): ``"union"``.

    Under ``truncate`` a non-union expert in the kept set would be a wasted slot (no pair is
    routed to it). Under ``substitute`` MoE-Spec's ``"all"`` can keep an expert that is nobody's
    top-k but the runner-up of many tokens; on the shipped models it lost to the union at equal
    caps on greedy agreement and acceptance on both a chain and a tree draft
    (bench/results/cpu/budget_sweep.md), so the union is the default there too. ``policy`` is
    kept so that a measurement can give the policies different defaults.
    """
    return "union"


def _candidates(candidates: Optional[str], policy: str) -> str:
    if candidates is None:
        return default_candidates(policy)
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {CANDIDATES} or None, got {candidates!r}")
    return candidates


def route_topk_softmax(
    router_logits: torch.Tensor, top_k: int, renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unbudgeted softmax top-k routing, as transformers' Mixtral/Qwen/OLMoE routers compute it.

    Args:
        router_logits: ``[T, E]`` any float dtype.
        top_k: experts per token.
        renormalize: divide the k weights by their sum (Mixtral; Qwen/OLMoE with ``norm_topk_prob``).

    Returns:
        ``(probs [T, E] fp32, topk_ids [T, k] int64, topk_weights [T, k] fp32)``.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, ids, weights


def expert_union(topk_ids: torch.Tensor, num_experts: int) -> ExpertUnion:
    """Group the (token, slot) pairs of a routing by expert.

    Args:
        topk_ids: ``[T, k]`` int32/int64 expert ids in ``[0, num_experts)``.
        num_experts: E (only used for the result's meaning; ids are not re-validated here).

    Returns:
        `ExpertUnion` with sorted unique experts, CSR offsets ``[U+1]``, per-pair token and slot
        (grouped by expert, then by token, then slot) and the inverse map ``pair_position [T, k]``.
    """
    T, k = topk_ids.shape
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    # A stable sort keeps pairs of one expert in flat (token-major, then slot) order.
    sorted_ids, order = torch.sort(flat, stable=True)
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    offsets = torch.zeros(experts.numel() + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    pair_position = torch.empty(T * k, dtype=torch.int32, device=device)
    pair_position[order] = torch.arange(T * k, dtype=torch.int32, device=device)
    return ExpertUnion(
        experts=experts.to(torch.int32),
        offsets=offsets,
        pair_token=(order // max(k, 1)).to(torch.int32),
        pair_slot=(order % max(k, 1)).to(torch.int32),
        pair_position=pair_position.reshape(T, k),
    )


def score_experts(
    router_logits: Optional[torch.Tensor] = None,
    mode: str = "prob",
    topk_ids: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    num_experts: Optional[int] = None,
) -> torch.Tensor:
    """Aggregate per-expert score over all tokens of one forward call.

    ``mode="prob"``: ``score[e] = sum_t softmax(z_t)[e]`` (full-softmax probability mass).
    ``mode="topk"``: ``score[e] = sum of topk_weights[t, s] over pairs with topk_ids[t, s] == e``.

    Args:
        router_logits: ``[T, E]`` (needed for ``"prob"``; gives E for ``"topk"``).
        topk_ids, topk_weights: ``[T, k]`` (needed for ``"topk"``).
        num_experts: E when ``router_logits`` is not given.

    Returns:
        ``[E]`` fp32.
    """
    if mode == "prob":
        return torch.softmax(router_logits.float(), dim=-1).sum(dim=0)
    if mode == "topk":
        E = router_logits.shape[-1] if router_logits is not None else int(num_experts)
        scores = torch.zeros(E, dtype=torch.float32, device=topk_ids.device)
        return scores.index_add_(0, topk_ids.reshape(-1).long(), topk_weights.reshape(-1).float())
    raise ValueError(f"unknown score mode {mode!r}")


def effective_budget(
    sorted_scores: torch.Tensor,
    budget: Optional[int],
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
) -> int:
    """Number of experts to keep given candidate scores sorted in descending order.

    Without ``coverage`` this is ``budget`` (or all candidates when ``budget`` is None). With
    ``coverage=tau`` it is the smallest n whose leading score mass reaches ``tau`` of the
    candidates' total (fp32, summed in sorted order), clamped to ``[min_budget, budget]``.
    """
    U = int(sorted_scores.numel())
    if U == 0:
        if coverage is None:
            return 0 if budget is None else int(budget)
        return 1 if min_budget is None else int(min_budget)
    full = torch.ones(U, dtype=torch.bool, device=sorted_scores.device)
    n = _kept_count(sorted_scores.float(), full, torch.tensor(U, device=sorted_scores.device), budget, coverage,
                    1 if min_budget is None else min_budget)
    return int(n)


def _kept_count(
    sorted_scores: torch.Tensor,
    sorted_valid: torch.Tensor,
    union_size: torch.Tensor,
    budget: Optional[int],
    coverage: Optional[float],
    min_budget: int,
) -> torch.Tensor:
    """Effective budget as a 0-d device tensor (no host sync).

    ``sorted_scores [E]`` are the candidates' scores in descending order with the ``union_size``
    valid candidates first (``sorted_valid`` marks them).
    """
    if coverage is None:
        return union_size if budget is None else torch.full_like(union_size, int(budget))
    csum = torch.cumsum(torch.where(sorted_valid, sorted_scores, torch.zeros_like(sorted_scores)), dim=0)
    target = float(coverage) * csum[-1]
    # First index reaching the target (1-based); entries past the union hold the total, which
    # is >= target, so they are never counted.
    n = (csum < target).sum() + 1
    n = torch.minimum(n, union_size)
    if budget is not None:
        n = torch.clamp(n, max=int(budget))
    return torch.clamp(n, min=int(min_budget))


def select_kept_mask(
    scores: torch.Tensor,
    candidate_mask: torch.Tensor,
    budget: Optional[int],
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-shape form of `select_experts`: no host sync, no data-dependent shapes.

    Args:
        scores: ``[E]`` per-expert scores (>= 0).
        candidate_mask: ``[E]`` bool, the experts that may be kept (the union).
        budget, coverage, min_budget: as in `select_experts` (``min_budget`` default 1).

    Returns:
        ``(kept_mask [E] bool, kept_count 0-d int64)``: the ``C'`` highest-scoring candidates
        (ties to the lower id), or every candidate when there are at most ``C'``.
    """
    E = scores.shape[0]
    cand_scores = scores.float().masked_fill(~candidate_mask, float("-inf"))
    # Stable descending sort over ascending ids puts the lower id first among equal scores.
    sorted_scores, order = torch.sort(cand_scores, descending=True, stable=True)
    sorted_valid = candidate_mask.gather(0, order)
    union_size = candidate_mask.sum()
    C = _kept_count(sorted_scores, sorted_valid, union_size, budget, coverage,
                    1 if min_budget is None else min_budget)
    rank_kept = (torch.arange(E, device=scores.device) < C) & sorted_valid
    kept_mask = torch.zeros(E, dtype=torch.bool, device=scores.device).scatter(0, order, rank_kept)
    return kept_mask, kept_mask.sum()


def select_experts(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    budget: Optional[int],
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
) -> torch.Tensor:
    """Choose the kept experts among ``candidates`` (a budget is a cap, never a perturbation).

    Args:
        scores: ``[E]`` fp32 per-expert scores.
        candidates: ``[U]`` int sorted unique expert ids (the union).
        budget: maximum number kept (None: no cap besides coverage).
        coverage: optional share of candidate score mass to reach (adaptive budget).
        min_budget: lower clamp of the adaptive budget.

    Returns:
        ``[C']`` int32 sorted kept ids: the ``C'`` highest-scoring candidates, ties to the lower
        id; all candidates when ``U <= C'``.
    """
    mask = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    mask[candidates.long()] = True
    kept_mask, _ = select_kept_mask(scores, mask, budget, coverage, min_budget)
    return kept_mask.nonzero().reshape(-1).to(torch.int32)


def reroute(
    selection_scores: torch.Tensor,
    topk_ids: torch.Tensor,
    kept: torch.Tensor,
    policy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-route pairs whose expert was dropped.

    Args:
        selection_scores: ``[T, E]`` the scores the router ranks by (probabilities or logits).
        topk_ids: ``[T, k]`` unbudgeted ids.
        kept: ``[E]`` bool kept mask, or ``[C]`` kept ids.
        policy: ``"substitute"``: top-k of ``selection_scores`` restricted to the kept set;
            ``"truncate"``: keep ``topk_ids``, mark pairs outside the kept set dead.

    Returns:
        ``(ids [T, k] int64, alive [T, k] bool)``; the caller recomputes the weights of ``ids``
        with the model's own normalisation and zeroes dead pairs.
    """
    kept_mask = _as_mask(kept, selection_scores.shape[-1])
    if policy == "substitute":
        masked = selection_scores.float().masked_fill(~kept_mask, float("-inf"))
        ids = torch.topk(masked, topk_ids.shape[-1], dim=-1).indices
        return ids, torch.ones_like(ids, dtype=torch.bool)
    if policy == "truncate":
        ids = topk_ids.long()
        return ids, kept_mask[ids]
    raise ValueError(f"unknown policy {policy!r}")


def _as_mask(kept: torch.Tensor, num_experts: int) -> torch.Tensor:
    if kept.dtype == torch.bool:
        return kept
    mask = torch.zeros(num_experts, dtype=torch.bool, device=kept.device)
    return mask.index_fill(0, kept.long(), True)


def union_mask(topk_ids: torch.Tensor, num_experts: int, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[E]`` bool: experts in at least one (unmasked) token's top-k; no host sync."""
    ids = topk_ids.long()
    if token_mask is not None:
        # Padding tokens scatter into a spare slot that is cut off below.
        ids = torch.where(token_mask.reshape(-1, 1), ids, torch.full_like(ids, num_experts))
    mask = torch.zeros(num_experts + 1, dtype=torch.bool, device=ids.device)
    return mask.index_fill(0, ids.reshape(-1), True)[:num_experts]


def budget_routing_masked(
    router_logits: torch.Tensor,
    top_k: int,
    budget: Optional[int],
    policy: str = "substitute",
    renormalize: bool = False,
    score: str = "prob",
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
    token_mask: Optional[torch.Tensor] = None,
    candidates: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Capture-safe form of `budget_routing`: fixed output shapes, no host sync, no data branch.

    Same routing as `budget_routing`. ``token_mask [T]`` bool (True = real token) leaves
    padding out of the union and the scores; when a budget is set, padding tokens get zero
    weights so that they cannot widen the set of experts read.

    Rows without a softmax (any NaN, any +inf, or all -inf logits: ``torch.softmax`` gives NaN
    for the whole row) are invalid: they count neither towards the union nor the scores, get
    weight 0 and the ``k`` lowest ids of the returned kept set (``0..k-1`` when it holds fewer
    than ``k``, i.e. no valid row at all), so garbage in one row can neither produce NaN
    weights nor change other rows' routing or the experts read. Rows with some -inf logits and
    a finite one are valid.

    ``candidates`` (None: `default_candidates` of the policy): the experts the kept set is
    chosen from, ``"all"`` or ``"union"``; with ``coverage`` the target is that share of the
    candidates' score mass. Routing changes only when the kept count is below the union size.

    Returns:
        ``(topk_ids [T,k] int64, topk_weights [T,k] fp32, kept_mask [E] bool,
        union_size 0-d int64, budgeted 0-d bool)``. When nothing is dropped, ids and weights
        are bit-identical to unbudgeted routing and ``kept_mask`` is the union.
    """
    cand = _candidates(candidates, policy)
    probs, ids, weights = route_topk_softmax(router_logits, top_k, renormalize)
    E = probs.shape[-1]
    valid = ~torch.isnan(probs).any(dim=-1)  # [T]: the row has a softmax
    mask = valid if token_mask is None else token_mask & valid
    umask = union_mask(ids, E, mask)
    union_size = umask.sum()
    if budget is None and coverage is None:
        out_ids, out_w, kept_out = ids, weights, umask
        budgeted = torch.zeros((), dtype=torch.bool, device=ids.device)
    else:
        zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
        if score == "topk":
            scores = score_experts(router_logits, "topk", ids, torch.where(mask.reshape(-1, 1), weights, zero))
        else:
            scores = torch.where(mask.reshape(-1, 1), probs, zero).sum(dim=0)
        cmask = umask if cand == "union" else torch.ones_like(umask)
        kept_mask, kept_count = select_kept_mask(scores, cmask, budget, coverage,
                                                 top_k if min_budget is None else min_budget)
        budgeted = kept_count < union_size
        new_ids, alive = reroute(probs, ids, kept_mask, policy)
        # Original full-softmax probabilities, then the model's own normalisation over survivors.
        new_w = torch.where(alive, probs.gather(1, new_ids), zero)
        if renormalize:
            denom = new_w.sum(dim=-1, keepdim=True)
            new_w = torch.where(denom > 0, new_w / torch.where(denom > 0, denom, torch.ones_like(denom)), new_w)
        out_ids = torch.where(budgeted, new_ids, ids)
        out_w = torch.where(budgeted, new_w, weights)
        if token_mask is not None:
            out_w = torch.where(token_mask.reshape(-1, 1), out_w, torch.zeros_like(out_w))
        kept_out = torch.where(budgeted, kept_mask, umask)
    # Invalid rows: the k lowest kept ids (arange(k) when fewer are kept), weight 0.
    order = torch.arange(E, device=ids.device)
    lowest = torch.where(kept_out, order, order + E).topk(top_k, largest=False).values
    fill = torch.where(kept_out.sum() >= top_k, lowest, order[:top_k])
    out_ids = torch.where(valid.reshape(-1, 1), out_ids, fill.reshape(1, -1))
    out_w = torch.where(valid.reshape(-1, 1), out_w, torch.zeros_like(out_w))
    return out_ids, out_w, kept_out, union_size, budgeted


def budget_routing(
    router_logits: torch.Tensor,
    top_k: int,
    budget: Optional[int],
    policy: str = "substitute",
    renormalize: bool = False,
    score: str = "prob",
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
    token_mask: Optional[torch.Tensor] = None,
    candidates: Optional[str] = None,
) -> BudgetedRouting:
    """Softmax top-k routing under a per-call expert budget (docs/design.md §3).

    Args:
        router_logits: ``[T, E]`` any float dtype (math in fp32).
        top_k: experts per token.
        budget: maximum distinct experts for this call; None means no cap.
        policy: ``"substitute"`` or ``"truncate"``.
        renormalize: the model renormalises its k weights (Mixtral; ``norm_topk_prob``).
        score: ``"prob"`` (full-softmax mass) or ``"topk"`` (summed top-k weights).
        coverage: adaptive budget: smallest set reaching this share of the candidates' score mass.
        min_budget: lower clamp for ``coverage`` (default ``top_k``).
        token_mask: optional ``[T]`` bool, False for padding (see `budget_routing_masked`).
        candidates: ``"all"``, ``"union"`` or None (`default_candidates` of the policy).

    Returns:
        `BudgetedRouting`; when the union fits the effective budget, ids and weights are
        bit-identical to the unbudgeted routing. Reads the kept set back to the host (use
        `budget_routing_masked` where that sync is not allowed).
    """
    ids, w, kept_mask, union_size, budgeted = budget_routing_masked(
        router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget, token_mask, candidates)
    kept = kept_mask.nonzero().reshape(-1).to(torch.int32)
    return BudgetedRouting(ids, w, kept, int(union_size), bool(budgeted))


# ----------------------------------------------------------------------------- experts


def _gated_activation(gate_up: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Split a ``[n, 2I]`` projection by ``layout.gate_up`` and apply the gated activation (fp32)."""
    I = gate_up.shape[-1] // 2
    if layout.gate_up == "gate_up":
        gate, up = gate_up[..., :I], gate_up[..., I:]
    elif layout.gate_up == "up_gate":
        up, gate = gate_up[..., :I], gate_up[..., I:]
    else:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    if layout.activation == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=layout.limit)
    up = up.clamp(min=-layout.limit, max=layout.limit)
    return gate * torch.sigmoid(gate * layout.alpha) * (up + 1)


def _expert_forward(
    xe: torch.Tensor,
    e: int,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate_up: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    layout: ExpertLayout,
    act_dtype: torch.dtype,
) -> torch.Tensor:
    """One expert on its tokens ``xe [n, H]`` (fp32) -> ``[n, H]`` fp32."""
    wgu = w_gate_up[e].float()
    gu = xe @ wgu if layout.transposed else xe @ wgu.t()
    if b_gate_up is not None:
        gu = gu + b_gate_up[e].float()
    # The intermediate is stored in the activation dtype by the kernels; mirror that rounding.
    h = _gated_activation(gu, layout).to(act_dtype).float()
    wd = w_down[e].float()
    y = h @ wd if layout.transposed else h @ wd.t()
    if b_down is not None:
        y = y + b_down[e].float()
    return y


def moe_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    kept_experts: Optional[torch.Tensor] = None,
    *,
    b_gate_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    layout: ExpertLayout = ExpertLayout(),
    deterministic: bool = True,
) -> torch.Tensor:
    """Weighted sum of gated expert MLPs: ``y_t = sum_s w[t,s] * expert_{ids[t,s]}(x_t)``.

    Pairs whose weight is 0, or whose expert is not in ``kept_experts`` (when given), contribute
    nothing and their expert is never evaluated.

    Args:
        x: ``[T, H]`` fp32/bf16/fp16.
        w_gate_up: ``[E, 2I, H]`` (``[E, H, 2I]`` when ``layout.transposed``), dtype of ``x``.
        w_down: ``[E, H, I]`` (``[E, I, H]`` when transposed), dtype of ``x``.
        topk_ids: ``[T, k]`` int32/int64.
        topk_weights: ``[T, k]`` float.
        kept_experts: optional ``[C]`` int ids allowed to run, or an ``[E]`` bool mask.
        b_gate_up: optional ``[E, 2I]`` bias (in storage order), b_down: optional ``[E, H]``.
        layout: `ExpertLayout`.
        deterministic: accepted for API parity; the reference is always deterministic.

    Returns:
        ``[T, H]`` in ``x.dtype`` (accumulated in fp32, slots summed in slot order).
    """
    T, H = x.shape
    k = topk_ids.shape[1]
    E = w_gate_up.shape[0]
    ids = topk_ids.long()
    w = topk_weights.float()
    active = w != 0
    if kept_experts is not None:
        active &= _as_mask(kept_experts, E)[ids]
    contrib = torch.zeros(T, k, H, dtype=torch.float32, device=x.device)
    if bool(active.any()):
        flat_ids = torch.where(active, ids, torch.full_like(ids, -1)).reshape(-1)
        xf = x.float()
        for e in torch.unique(flat_ids[flat_ids >= 0]).tolist():
            pairs = torch.nonzero(flat_ids == e).squeeze(1)
            tok, slot = pairs // k, pairs % k
            y = _expert_forward(xf[tok], e, w_gate_up, w_down, b_gate_up, b_down, layout, x.dtype)
            contrib[tok, slot] = y * w[tok, slot].unsqueeze(1)
    out = contrib[:, 0]
    for s in range(1, k):
        out = out + contrib[:, s]
    return out.to(x.dtype)


def budgeted_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    budget: Optional[int],
    policy: str = "substitute",
    renormalize: bool = False,
    score: str = "prob",
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
    *,
    b_gate_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    layout: ExpertLayout = ExpertLayout(),
    deterministic: bool = True,
    candidates: Optional[str] = None,
) -> tuple[torch.Tensor, BudgetedRouting]:
    """`budget_routing` followed by `moe_experts` over the kept experts.

    Returns:
        ``(y [T, H] in x.dtype, BudgetedRouting)``.
    """
    routing = budget_routing(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget,
                             candidates=candidates)
    y = moe_experts(
        x, w_gate_up, w_down, routing.topk_ids, routing.topk_weights, routing.kept_experts,
        b_gate_up=b_gate_up, b_down=b_down, layout=layout, deterministic=deterministic,
    )
    return y, routing
