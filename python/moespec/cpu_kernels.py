"""Thin wrappers around moespec's C++ CPU kernels in ``moespec._C`` (docs/cpu-kernels.md).

`moespec.ops` sends CPU tensors here (``backend="cpu"``, the default for CPU tensors under
``backend="auto"``). The kernels are compiled into every build (also ``MOESPEC_CUDA=OFF``) and
pick the widest vector ISA the CPU has at run time: ``avx512bf16``, ``avx512``, ``avx2`` or
``scalar``; the environment variable ``MOESPEC_CPU_ISA`` caps the level (read at every call).

Two layers, like `moespec.kernels` for the GPU:

- the planned API: `plan_routing` (from router logits) or `plan_from_routing` (from given ids and
  weights) fill a `moespec.kernels.RoutingPlan` of CPU tensors; `moe_experts_planned` runs the
  budgeted grouped gated-MLP experts over it; `budgeted_moe_planned` does both for a layer. With a
  reused plan and output, a layer allocates nothing (the experts' workspace lives in C++ and only
  grows);
- op-level functions with the semantics of `moespec.reference` (`expert_union`, `score_experts`,
  `budget_routing`, `budget_routing_masked`, `moe_experts`), called by `moespec.ops` after it has
  validated the inputs.

Routing decisions equal the reference's bitwise except at exact probability ties (the kernels
break ties towards the lower id); the expert math accumulates in fp32 with the SwiGLU intermediate
rounded to the activation dtype, as the reference does. Results repeat bitwise for a given ISA
level whatever the thread count.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _cuda
from .kernels import (META_ACTIVE, META_BUDGETED, META_KEPT, META_PAIRS, META_UNION, RoutingPlan)
from .reference import default_candidates, route_topk_softmax
from .types import BudgetedRouting, ExpertLayout, ExpertUnion

__all__ = [
    "available",
    "unavailable_reason",
    "require",
    "isa",
    "detected_isa",
    "compiled_isas",
    "plan_routing",
    "plan_from_routing",
    "moe_experts_planned",
    "budgeted_moe_planned",
    "expert_union",
    "score_experts",
    "budget_routing",
    "budget_routing_masked",
    "moe_experts",
    "stream_read",
]

_FLOAT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ID_CODE = {torch.int32: 0, torch.int64: 1}
_SCORE_CODE = {None: 0, "prob": 1, "topk": 2}
_POLICY_CODE = {"substitute": 0, "truncate": 1}
_ORDER_CODE = {"gate_up": 0, "up_gate": 1, "interleaved": 2}
_ACT_CODE = {"silu": 0, "clamped_swiglu": 1}
_CSR_NONE, _CSR_ALL, _CSR_ACTIVE = 0, 1, 2
# One thread per this many bytes of expert weights read (at most `threads`): smaller layers run on
# fewer threads, where waking workers would cost more than it saves. 0 lifts the limit (tests).
MIN_THREAD_BYTES = 512 << 10


def unavailable_reason() -> Optional[str]:
    """Why the CPU kernels cannot run here (an extension without them), or None when they can."""
    C = _cuda._C
    if C is None:
        return f"the moespec extension (moespec._C) failed to import: {_cuda._IMPORT_ERROR}"
    if not hasattr(C, "cpu_routing_plan"):
        return "this moespec extension was built without the C++ CPU kernels; reinstall moespec"
    return None


def available() -> bool:
    """True when the C++ CPU kernels are compiled into the extension."""
    return unavailable_reason() is None


def require(op: str = "this op") -> None:
    """Raise a `RuntimeError` that says why ``op`` cannot run on the CPU kernels here."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"moespec: cannot run {op} with the CPU kernels: {reason}")


def isa() -> str:
    """The ISA level the CPU kernels use now: ``"avx512bf16"``, ``"avx512"``, ``"avx2"`` or ``"scalar"``
    (the best the CPU supports, capped by ``MOESPEC_CPU_ISA``). `ValueError` for a bad cap."""
    require("the CPU ISA query")
    return str(_cuda._C.cpu_isa())


def detected_isa() -> str:
    """The best ISA level this CPU and this build support (ignores ``MOESPEC_CPU_ISA``)."""
    require("the CPU ISA query")
    return str(_cuda._C.cpu_isa_detected())


def compiled_isas() -> list[str]:
    """The ISA levels compiled into this build, lowest first (``["scalar"]`` off x86-64)."""
    require("the CPU ISA query")
    return list(_cuda._C.cpu_isas_compiled())


def _ext():
    require("the moespec CPU kernels")
    return _cuda._C


def _threads(threads: Optional[int]) -> int:
    return max(1, int(torch.get_num_threads() if threads is None else threads))


def _plan_args(plan: RoutingPlan):
    a = _ext().CpuPlanArgs()
    a.T, a.E, a.k = plan.T, plan.E, plan.k
    a.ids, a.weights = plan.ids.data_ptr(), plan.weights.data_ptr()
    a.row_max, a.row_sum = plan.row_max.data_ptr(), plan.row_sum.data_ptr()
    a.scores, a.meta = plan.scores.data_ptr(), plan.meta.data_ptr()
    a.union_experts, a.kept_experts = plan.union_experts.data_ptr(), plan.kept_experts.data_ptr()
    a.act_experts, a.act_offsets = plan.act_experts.data_ptr(), plan.act_offsets.data_ptr()
    a.pair_token, a.pair_slot = plan.pair_token.data_ptr(), plan.pair_slot.data_ptr()
    a.pair_position = plan.pair_position.data_ptr()
    return a


def _cpu_plan(plan: Optional[RoutingPlan], T: int, E: int, k: int) -> RoutingPlan:
    if plan is None:
        return RoutingPlan.empty(T, E, k, "cpu")
    if not plan.matches(T, E, k, "cpu"):
        raise ValueError(f"RoutingPlan is sized for (T, E, k) = {(plan.T, plan.E, plan.k)} on {plan.ids.device}, "
                         f"need {(T, E, k)} on cpu")
    return plan


def _check_cpu(name: str, t: Optional[torch.Tensor]) -> None:
    if t is not None and t.device.type != "cpu":
        raise ValueError(f"the CPU kernels need CPU tensors, but {name} is on {t.device}")


def plan_routing(
    router_logits: torch.Tensor,
    top_k: int,
    budget: Optional[int] = None,
    policy: str = "substitute",
    renormalize: bool = False,
    score: str = "prob",
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
    *,
    candidates: Optional[str] = None,
    token_mask: Optional[torch.Tensor] = None,
    plan: Optional[RoutingPlan] = None,
    csr: bool = True,
) -> RoutingPlan:
    """Softmax top-k routing under a budget on the CPU, filling a `RoutingPlan`.

    Semantics of `moespec.reference.budget_routing_masked` (invalid rows, token mask, candidates);
    arguments as there (validated by `moespec.ops`; here only the tensor placement is checked).
    The softmax and the unbudgeted top-k are torch's (`moespec.reference.route_topk_softmax`, as
    the models' routers compute them), so an unbudgeted routing is bit-identical to the model's;
    the kernel does the rest (union, scores, kept set, re-routing, CSR). ``plan.row_max`` and
    ``plan.row_sum`` are not written.

    Args:
        router_logits: ``[T, E]`` CPU float tensor (any float dtype; the math is fp32).
        candidates: ``"all"``, ``"union"`` or None (`moespec.reference.default_candidates`).
        token_mask: optional ``[T]`` bool, False for padding.
        plan: buffers to reuse (must match ``(T, E, top_k)`` on the CPU).
        csr: also build the CSR of active pairs needed by `moe_experts_planned`.

    Returns:
        The filled plan: ``ids [T, k]`` int32, ``weights [T, k]`` fp32, ``meta`` counts, sorted
        ``union_experts`` / ``kept_experts`` prefixes, and the CSR (see `moespec.kernels.RoutingPlan`).
    """
    _check_cpu("router_logits", router_logits)
    _check_cpu("token_mask", token_mask)
    T, E = router_logits.shape
    plan = _cpu_plan(plan, T, E, top_k)
    probs, ids, w = route_topk_softmax(router_logits, top_k, renormalize)
    cand = default_candidates(policy) if candidates is None else candidates
    if cand not in ("all", "union"):
        raise ValueError(f"candidates must be 'all', 'union' or None, got {candidates!r}")
    budgeted = budget is not None or coverage is not None
    a = _plan_args(plan)
    a.probs, a.probs_stride = probs.data_ptr(), probs.stride(0)
    a.in_ids, a.in_ids_type = ids.data_ptr(), _ID_CODE[ids.dtype]
    a.in_weights, a.in_weights_dtype = w.data_ptr(), 0
    mask = None
    if token_mask is not None:
        mask = token_mask.contiguous().view(torch.uint8)
        a.token_mask = mask.data_ptr()
    a.route = 1
    a.renormalize = int(bool(renormalize))
    a.score_mode = _SCORE_CODE[score] if budgeted else 0
    a.budget = -1 if budget is None else int(budget)
    a.coverage = -1.0 if coverage is None else float(coverage)
    a.min_budget = int(top_k if min_budget is None else min_budget)
    a.policy = _POLICY_CODE[policy]
    a.all_candidates = int(cand == "all")
    a.csr_mode = _CSR_ACTIVE if csr else _CSR_NONE
    _ext().cpu_routing_plan(a)
    plan.max_active = max(1, min(E, T * top_k))
    return plan


def plan_from_routing(
    topk_ids: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
    num_experts: int,
    kept_experts: Optional[torch.Tensor] = None,
    *,
    plan: Optional[RoutingPlan] = None,
    all_pairs: bool = False,
) -> RoutingPlan:
    """The CSR plan of a given routing on the CPU.

    Args:
        topk_ids: ``[T, k]`` int32/int64; ids outside ``[0, E)`` are ignored (never read).
        topk_weights: ``[T, k]`` fp32/bf16/fp16, or None (weights 1).
        num_experts: E.
        kept_experts: optional ``[C]`` int ids allowed to run (out-of-range ids keep nothing).
        all_pairs: CSR of every in-range pair (the expert union) instead of the active ones
            (kept, non-zero weight).
    """
    _check_cpu("topk_ids", topk_ids)
    T, k = topk_ids.shape
    plan = _cpu_plan(plan, T, num_experts, k)
    ids = topk_ids.contiguous()
    a = _plan_args(plan)
    a.in_ids, a.in_ids_type = ids.data_ptr(), _ID_CODE[ids.dtype]
    w = None
    if topk_weights is not None:
        w = topk_weights.contiguous()
        if w.dtype not in _FLOAT_CODE:
            w = w.float()
        a.in_weights, a.in_weights_dtype = w.data_ptr(), _FLOAT_CODE[w.dtype]
    kept = None
    if kept_experts is not None:
        kept = kept_experts.contiguous()
        if kept.numel() == 0:  # "keep nothing" (a null pointer would mean "keep all"): one ignored id
            kept = torch.full((1,), -1, dtype=torch.int32)
        a.in_kept, a.in_kept_type, a.n_in_kept = kept.data_ptr(), _ID_CODE[kept.dtype], int(kept.numel())
    a.route = 0
    a.csr_mode = _CSR_ALL if all_pairs else _CSR_ACTIVE
    _ext().cpu_routing_plan(a)
    plan.max_active = max(1, min(num_experts, T * k))
    return plan


def moe_experts_planned(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    plan: RoutingPlan,
    layout: ExpertLayout = ExpertLayout(),
    b_gate_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    threads: Optional[int] = None,
) -> torch.Tensor:
    """Budgeted grouped gated-MLP experts over a CPU plan built with the CSR of active pairs.

    Only experts with active pairs have their weights read, each slice once for all its tokens.

    Args:
        x: ``[T, H]`` fp32/bf16/fp16 CPU tensor with contiguous rows.
        w_gate_up, w_down: contiguous weights of ``x.dtype`` in ``layout`` (see `moespec.ExpertLayout`).
        plan: from `plan_routing` or `plan_from_routing` (not ``all_pairs``) for the same T.
        b_gate_up: optional ``[E, 2I]``; b_down: optional ``[E, H]`` (any float dtype).
        out: optional contiguous ``[T, H]`` output of ``x.dtype``.
        threads: at most this many threads (default ``torch.get_num_threads()``); fewer when the
            experts read are small (one per `MIN_THREAD_BYTES` of weights).

    Returns:
        ``[T, H]`` in ``x.dtype``, accumulated in fp32, pairs combined in slot order.
    """
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down), ("b_gate_up", b_gate_up),
                    ("b_down", b_down), ("out", out)):
        _check_cpu(name, t)
    T, H = x.shape
    E, _, I = layout.dims(w_gate_up, w_down)
    if plan.T != T or plan.ids.device.type != "cpu":
        raise ValueError(f"the plan is for T={plan.T} on {plan.ids.device}, x is [{T}, {H}] on cpu")
    if x.dtype not in _FLOAT_CODE or w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise TypeError(f"x and the weights must share one dtype of fp32/bf16/fp16, got {x.dtype}, "
                        f"{w_gate_up.dtype}, {w_down.dtype}")
    if x.stride(1) != 1 or not w_gate_up.is_contiguous() or not w_down.is_contiguous():
        raise ValueError("x needs contiguous rows and the weights must be contiguous")
    if out is None:
        out = torch.empty(T, H, dtype=x.dtype)
    elif out.shape != (T, H) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{T}, {H}] {x.dtype} tensor, got {list(out.shape)} {out.dtype}")
    bgu = None if b_gate_up is None else b_gate_up.float().contiguous()
    bdn = None if b_down is None else b_down.float().contiguous()
    a = _ext().CpuExpertsArgs()
    a.dtype = _FLOAT_CODE[x.dtype]
    a.transposed = int(bool(layout.transposed))
    a.x, a.x_stride = x.data_ptr(), x.stride(0)
    a.w_gu, a.w_down = w_gate_up.data_ptr(), w_down.data_ptr()
    a.b_gu = 0 if bgu is None else bgu.data_ptr()
    a.b_down = 0 if bdn is None else bdn.data_ptr()
    a.T, a.k, a.H, a.I = T, plan.k, H, I
    a.order, a.activation = _ORDER_CODE[layout.gate_up], _ACT_CODE[layout.activation]
    a.alpha, a.limit = float(layout.alpha), float(layout.limit)
    a.meta, a.act_experts, a.act_offsets = plan.meta.data_ptr(), plan.act_experts.data_ptr(), plan.act_offsets.data_ptr()
    a.pair_token, a.pair_slot = plan.pair_token.data_ptr(), plan.pair_slot.data_ptr()
    a.pair_position, a.weights = plan.pair_position.data_ptr(), plan.weights.data_ptr()
    a.out = out.data_ptr()
    a.threads = _threads(threads)
    a.min_thread_bytes = int(MIN_THREAD_BYTES)
    _ext().cpu_moe_experts(a)
    return out


def budgeted_moe_planned(
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
    layout: ExpertLayout = ExpertLayout(),
    *,
    candidates: Optional[str] = None,
    b_gate_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    plan: Optional[RoutingPlan] = None,
    out: Optional[torch.Tensor] = None,
    threads: Optional[int] = None,
) -> tuple[torch.Tensor, RoutingPlan]:
    """A whole budgeted MoE layer on the CPU (plan + experts): returns ``(y [T, H], plan)``."""
    plan = plan_routing(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget,
                        candidates=candidates, plan=plan)
    y = moe_experts_planned(x, w_gate_up, w_down, plan, layout, b_gate_up, b_down, out, threads)
    return y, plan


def stream_read(buf: torch.Tensor, threads: Optional[int] = None) -> float:
    """Read ``buf`` once with the CPU kernels' vector loads on their thread pool (contiguous 1 MiB
    chunks claimed dynamically, as the experts claim their work items): the streaming read that
    ``moespec bench layer`` divides a layer's bytes by to get its byte floor.

    Args:
        buf: a contiguous CPU tensor (any dtype; its bytes are read as fp32 words).
        threads: how many threads read (default ``torch.get_num_threads()``).

    Returns:
        The sum of the fp32 words read (so that the reads cannot be optimised away).
    """
    _check_cpu("buf", buf)
    if not buf.is_contiguous():
        raise ValueError("stream_read needs a contiguous tensor")
    return float(_ext().cpu_stream_read(buf.data_ptr(), buf.numel() * buf.element_size(), _threads(threads)))


# ----------------------------------------------------------------------------- op-level API


def expert_union(topk_ids: torch.Tensor, num_experts: int) -> ExpertUnion:
    """`moespec.reference.expert_union` on the CPU kernels."""
    T, k = topk_ids.shape
    plan = plan_from_routing(topk_ids, None, num_experts, all_pairs=True)
    m = plan.meta.tolist()
    U, P = m[META_ACTIVE], m[META_PAIRS]
    return ExpertUnion(
        experts=plan.act_experts[:U].clone(),
        offsets=plan.act_offsets[:U + 1].clone(),
        pair_token=plan.pair_token[:P].clone(),
        pair_slot=plan.pair_slot[:P].clone(),
        pair_position=plan.pair_position.clone(),
    )


def score_experts(router_logits: torch.Tensor, mode: str, topk_ids: Optional[torch.Tensor],
                  topk_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """`moespec.reference.score_experts` on the CPU kernels: ``[E]`` fp32."""
    _check_cpu("router_logits", router_logits)
    T, E = router_logits.shape
    k = 1 if mode == "prob" else topk_ids.shape[1]
    plan = RoutingPlan.empty(T, E, k, "cpu")
    a = _plan_args(plan)
    keep = []
    if mode == "prob":
        probs = torch.softmax(router_logits.float(), dim=-1)  # as the reference
        keep.append(probs)
        a.probs, a.probs_stride = probs.data_ptr(), probs.stride(0)
    else:
        ids, w = topk_ids.contiguous(), topk_weights.contiguous()
        if w.dtype not in _FLOAT_CODE:
            w = w.float()
        keep += [ids, w]
        a.in_ids, a.in_ids_type = ids.data_ptr(), _ID_CODE[ids.dtype]
        a.in_weights, a.in_weights_dtype = w.data_ptr(), _FLOAT_CODE[w.dtype]
    a.score_mode = _SCORE_CODE[mode]
    _ext().cpu_routing_plan(a)
    return plan.scores


def budget_routing(router_logits: torch.Tensor, top_k: int, budget: Optional[int], policy: str = "substitute",
                   renormalize: bool = False, score: str = "prob", coverage: Optional[float] = None,
                   min_budget: Optional[int] = None, token_mask: Optional[torch.Tensor] = None,
                   candidates: Optional[str] = None) -> BudgetedRouting:
    """`moespec.reference.budget_routing` on the CPU kernels."""
    plan = plan_routing(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget,
                        candidates=candidates, token_mask=token_mask, csr=False)
    m = plan.meta.tolist()
    return BudgetedRouting(
        topk_ids=plan.ids.long(),
        topk_weights=plan.weights,
        kept_experts=plan.kept_experts[:m[META_KEPT]].clone(),
        union_size=m[META_UNION],
        budgeted=bool(m[META_BUDGETED]),
    )


def budget_routing_masked(router_logits: torch.Tensor, top_k: int, budget: Optional[int], policy: str = "substitute",
                          renormalize: bool = False, score: str = "prob", coverage: Optional[float] = None,
                          min_budget: Optional[int] = None, token_mask: Optional[torch.Tensor] = None,
                          candidates: Optional[str] = None):
    """`moespec.reference.budget_routing_masked` on the CPU kernels.

    Returns ``(ids [T,k] int64, weights [T,k] fp32, kept_mask [E] bool, union_size 0-d int64,
    budgeted 0-d bool)``.
    """
    plan = plan_routing(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget,
                        candidates=candidates, token_mask=token_mask, csr=False)
    m = plan.meta.tolist()
    kept_mask = torch.zeros(plan.E, dtype=torch.bool)
    kept_mask[plan.kept_experts[:m[META_KEPT]].long()] = True
    return (plan.ids.long(), plan.weights, kept_mask, torch.tensor(m[META_UNION], dtype=torch.int64),
            torch.tensor(bool(m[META_BUDGETED])))


def moe_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, kept_experts: Optional[torch.Tensor] = None,
                layout: ExpertLayout = ExpertLayout(), b_gate_up: Optional[torch.Tensor] = None,
                b_down: Optional[torch.Tensor] = None, threads: Optional[int] = None) -> torch.Tensor:
    """`moespec.reference.moe_experts` on the CPU kernels (``kept_experts``: ``[C]`` ids or an ``[E]`` bool
    mask). Always deterministic: the result does not depend on the thread count."""
    E = w_gate_up.shape[0]
    if kept_experts is not None and kept_experts.dtype == torch.bool:
        kept_experts = kept_experts.nonzero().reshape(-1).to(torch.int32)
    plan = plan_from_routing(topk_ids, topk_weights, E, kept_experts)
    x = x if x.stride(1) == 1 else x.contiguous()
    return moe_experts_planned(x, w_gate_up.contiguous(), w_down.contiguous(), plan, layout, b_gate_up, b_down,
                               threads=threads)

