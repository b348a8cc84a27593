"""Thin wrappers around the CUDA kernels in ``moespec._C`` (docs/design.md §3).

`moespec.ops` validates inputs and then calls the four op-level functions here for CUDA
tensors: `expert_union`, `score_experts`, `budget_routing`, `moe_experts`. They return
exact-length results, which for the routing ops needs one host synchronisation (to read the
device-side counts).

For CUDA graphs and the lowest overhead use the planned API instead, which never synchronises:

- `plan_routing` (from router logits) or `plan_from_routing` (from given ids/weights) fill a
  `RoutingPlan`: worst-case-sized device buffers plus device-side counts (``plan.meta``);
- `moe_experts_planned` runs the budgeted grouped SwiGLU experts over a plan;
- `budgeted_moe_planned` does both for a whole layer (4 launches).

In an emulation build (``MOESPEC_CUDA=EMU``, `moespec._cuda.backend` == "emu") every function here
takes CPU tensors instead and runs the same kernel sources on the CPU emulator (csrc/emu): slow,
meant for testing the kernels without a GPU.

Kernel generations (docs/kernels-v2.md): the experts run as generation ``v1`` (GEMM1, [SwiGLU],
GEMM2 and combine launches) or ``v2`` (a persistent launch over a device-built work list and its
combine kernel, both programmatic dependents where the image allows). The
environment variable ``MOESPEC_KERNELS`` (``v1`` or ``v2``, read at every call; default ``v1`` until
a GPU run shows which is faster per shape) selects it for every entry point, the custom ops
included; `moe_experts_planned` and `budgeted_moe_planned` also take ``generation=`` to override it
per call (the layer benchmark times both side by side that way).

Fallbacks (explicit, never silent about semantics): fp32 activations, more than
``_C.plan_max_experts`` experts or ``_C.plan_max_topk`` slots, H or I not a multiple of 8, or
tensors not 16-byte aligned run `moespec.reference` instead of the kernels.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import _cuda, reference
from .types import BudgetedRouting, ExpertLayout, ExpertUnion

__all__ = [
    "RoutingPlan",
    "plan_routing",
    "plan_from_routing",
    "moe_experts_planned",
    "budgeted_moe_planned",
    "experts_fallback_reason",
    "plan_supported",
    "expert_union",
    "score_experts",
    "budget_routing",
    "budget_routing_masked",
    "moe_experts",
    "kernel_generation",
    "GENERATIONS",
]

GENERATIONS = ("v1", "v2")
_DEFAULT_GENERATION = "v1"  # until a GPU run shows v2 faster (docs/kernels-v2.md)


def kernel_generation(generation: Optional[str] = None) -> str:
    """The expert-kernel generation a call uses: ``generation`` if given, else ``MOESPEC_KERNELS``,
    else ``v1``. `ValueError` names the setting for anything but ``v1``/``v2``."""
    src = "generation"
    if generation is None:
        generation, src = os.environ.get("MOESPEC_KERNELS", "") or _DEFAULT_GENERATION, "MOESPEC_KERNELS"
    if generation not in GENERATIONS:
        raise ValueError(f"{src} must be one of {', '.join(GENERATIONS)}, got {generation!r}")
    return generation

_FLOAT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ID_CODE = {torch.int32: 0, torch.int64: 1}
_SCORE_CODE = {None: 0, "prob": 1, "topk": 2}
_POLICY_CODE = {"substitute": 0, "truncate": 1}
_ORDER_CODE = {"gate_up": 0, "up_gate": 1, "interleaved": 2}
_ACT_CODE = {"silu": 0, "clamped_swiglu": 1}
_CSR_NONE, _CSR_ALL, _CSR_ACTIVE = 0, 1, 2

# Indices into RoutingPlan.meta (mirrors routing.cuh).
META_UNION, META_KEPT, META_BUDGETED, META_ACTIVE, META_PAIRS = 0, 1, 2, 3, 4
_META_SIZE = 8


def _ext(device: torch.device):
    """The extension, after checking that its kernels can run on ``device``'s tensors."""
    if device.type == "cpu":
        _cuda.require_emu("the moespec kernels on CPU tensors")
    else:
        _cuda.require("the moespec CUDA kernels")
    return _cuda._C


def _on(device: torch.device):
    """Make ``device`` current for a launch (nothing to do for the emulator)."""
    return contextlib.nullcontext() if device.type == "cpu" else torch.cuda.device(device)


def _plan_limits() -> tuple[int, int]:
    C = _cuda._C
    if C is None or not hasattr(C, "plan_max_experts"):
        return 0, 0
    return int(C.plan_max_experts), int(C.plan_max_topk)


def plan_supported(num_experts: int, top_k: int) -> bool:
    """True when the single-CTA routing plan handles ``num_experts`` experts and ``top_k`` slots."""
    max_e, max_k = _plan_limits()
    return 1 <= num_experts <= max_e and 1 <= top_k <= min(max_k, num_experts)


def _stream(device: torch.device) -> int:
    if device.type == "cpu":
        return 0  # the emulator runs launches synchronously, in order
    return int(torch.cuda.current_stream(device).cuda_stream)


@dataclass
class RoutingPlan:
    """Worst-case-sized device buffers of one routing plan; counts live on the device.

    All tensors are int32 unless noted, on one CUDA device:

    - ``ids [T, k]``: final expert ids (-1 for ids that were out of range); ``weights [T, k]`` fp32.
    - ``row_max, row_sum [T]`` fp32: softmax statistics; ``scores [E]`` fp32.
    - ``meta [8]``: ``[union size U, kept count C', budgeted flag, active experts A, CSR pairs P, ...]``.
    - ``union_experts [E]``, ``kept_experts [E]``: sorted; valid prefixes of length U and C'.
    - ``act_experts [E]``, ``act_offsets [E+1]``: experts that have CSR pairs (prefix A) and their
      CSR offsets (prefix A+1); ``pair_token, pair_slot [T*k]`` (prefix P), grouped by expert,
      then token, then slot; ``pair_position [T, k]``: CSR position of each pair, -1 if inactive.

    ``max_active`` is a host-side upper bound on A, used to size the expert kernels' grid.

    Workspaces of the generation-2 plan (docs/kernels-v2.md, "Routing plan v2"), allocated by
    `empty` when the generation in use is ``v2`` and otherwise on the first v2 launch: ``contrib``
    fp32 ``[T*E]`` (per-token score contributions; only for plans that score experts, i.e. not for
    `plan_from_routing`'s) and ``sync`` int32 ``[4]`` (the last-CTA ticket; zero at allocation, and
    the kernel leaves it zero, so CUDA-graph replays need no memset). The v2 *expert* kernel keeps
    its state here too, zeroed once (the counters with the workspaces above, before the plan's
    first launch) and left zero by every launch, so no memset sits between the plan and the expert
    kernel, which overlaps the plan's tail: ``expert_counters`` int32 (stream-K flags, which the
    combine kernel zeroes, and the h workspace) and, for ``deterministic=False``, ``expert_accum`` fp32 ``[T, H]``.
    """

    T: int
    E: int
    k: int
    ids: torch.Tensor
    weights: torch.Tensor
    row_max: torch.Tensor
    row_sum: torch.Tensor
    scores: torch.Tensor
    meta: torch.Tensor
    union_experts: torch.Tensor
    kept_experts: torch.Tensor
    act_experts: torch.Tensor
    act_offsets: torch.Tensor
    pair_token: torch.Tensor
    pair_slot: torch.Tensor
    pair_position: torch.Tensor
    max_active: int = 1
    contrib: Optional[torch.Tensor] = None
    sync: Optional[torch.Tensor] = None
    expert_counters: Optional[torch.Tensor] = None
    expert_accum: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, T: int, E: int, k: int, device, generation: Optional[str] = None,
              scores: bool = True) -> "RoutingPlan":
        """Allocate (uninitialised) buffers for ``T`` tokens, ``E`` experts and top-``k``; with the
        ``v2`` generation (``generation``, else `kernel_generation`) also its workspaces (the score
        workspace only when ``scores``)."""
        dev = torch.device(device)
        i32 = dict(dtype=torch.int32, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        P = max(T * k, 1)
        plan = cls(
            T=T, E=E, k=k,
            ids=torch.empty(T, k, **i32), weights=torch.empty(T, k, **f32),
            row_max=torch.empty(max(T, 1), **f32), row_sum=torch.empty(max(T, 1), **f32),
            scores=torch.empty(E, **f32), meta=torch.zeros(_META_SIZE, **i32),
            union_experts=torch.empty(E, **i32), kept_experts=torch.empty(E, **i32),
            act_experts=torch.empty(E, **i32), act_offsets=torch.empty(E + 1, **i32),
            pair_token=torch.empty(P, **i32), pair_slot=torch.empty(P, **i32),
            pair_position=torch.empty(T, k, **i32),
            max_active=max(1, min(E, T * k)),
        )
        if kernel_generation(generation) == "v2":
            plan._v2_workspaces(scores)
        return plan

    def _v2_workspaces(self, scores: bool = True) -> None:
        """Allocate the generation-2 workspaces if missing (worst case: every token scores)."""
        dev = self.ids.device
        if scores and self.contrib is None:
            self.contrib = torch.empty(max(self.T * self.E, 1), dtype=torch.float32, device=dev)
        if self.sync is None:
            self.sync = torch.zeros(4, dtype=torch.int32, device=dev)
        # Zeroed here, before the plan's launch (see _v2_expert_state); only where this build's kernels
        # can run on the device (a plan on another device, e.g. "meta" or CPU buffers for the C++ CPU
        # kernels in a GPU build, gets them on its first v2 expert launch, if any).
        if self.expert_counters is None and (dev.type == "cuda" and _cuda.available() or
                                             dev.type == "cpu" and _cuda.emu_compiled()):
            with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
                n = int(_cuda._C.experts_v2_counters_len(int(_cuda._C.experts_v2_grid())))
            if n > 0:
                self.expert_counters = torch.zeros(n, dtype=torch.int32, device=dev)

    def _v2_expert_state(self, ncounters: int, H: int, atomic: bool):
        """The v2 expert kernel's zero-on-entry buffers, which the kernel leaves zero: counters int32
        ``[>= ncounters]`` and, when ``atomic``, the accumulator fp32 ``[T, H]`` (else None).
        Allocated zeroed when missing or too small; the counters normally already by
        `_v2_workspaces`, before the plan's first launch, so no memset separates plan and experts."""
        dev = self.ids.device
        if self.expert_counters is None or self.expert_counters.numel() < ncounters:
            self.expert_counters = torch.zeros(ncounters, dtype=torch.int32, device=dev)
        if not atomic:
            return self.expert_counters, None
        if self.expert_accum is None or self.expert_accum.shape[1] != H:
            self.expert_accum = torch.zeros(self.T, H, dtype=torch.float32, device=dev)
        return self.expert_counters, self.expert_accum

    def matches(self, T: int, E: int, k: int, device) -> bool:
        return (self.T, self.E, self.k) == (T, E, k) and self.ids.device == torch.device(device)

    def counts(self) -> dict:
        """Read the device-side counts (synchronises)."""
        m = self.meta.tolist()
        return {"union": m[META_UNION], "kept": m[META_KEPT], "budgeted": bool(m[META_BUDGETED]),
                "active": m[META_ACTIVE], "pairs": m[META_PAIRS]}


def _plan_args(plan: RoutingPlan, generation: Optional[str] = None, scores: bool = True):
    a = _ext(plan.ids.device).PlanArgs()
    if kernel_generation(generation) == "v2":
        plan._v2_workspaces(scores)
        a.generation = 2
        a.sync = plan.sync.data_ptr()
        a.contrib = 0 if plan.contrib is None else plan.contrib.data_ptr()
    a.T, a.E, a.k = plan.T, plan.E, plan.k
    a.ids, a.weights = plan.ids.data_ptr(), plan.weights.data_ptr()
    a.row_max, a.row_sum = plan.row_max.data_ptr(), plan.row_sum.data_ptr()
    a.scores, a.meta = plan.scores.data_ptr(), plan.meta.data_ptr()
    a.union_experts, a.kept_experts = plan.union_experts.data_ptr(), plan.kept_experts.data_ptr()
    a.act_experts, a.act_offsets = plan.act_experts.data_ptr(), plan.act_offsets.data_ptr()
    a.pair_token, a.pair_slot = plan.pair_token.data_ptr(), plan.pair_slot.data_ptr()
    a.pair_position = plan.pair_position.data_ptr()
    return a


def _prep_logits(router_logits: torch.Tensor) -> torch.Tensor:
    z = router_logits
    if z.dtype not in _FLOAT_CODE:  # e.g. fp64: the math is fp32 anyway
        z = z.float()
    if z.stride(1) != 1:
        z = z.contiguous()
    return z


def _get_plan(plan: Optional[RoutingPlan], T: int, E: int, k: int, device,
              generation: Optional[str] = None, scores: bool = True) -> RoutingPlan:
    if plan is None:
        return RoutingPlan.empty(T, E, k, device, generation, scores)
    if not plan.matches(T, E, k, device):
        raise ValueError(f"RoutingPlan is sized for (T, E, k) = {(plan.T, plan.E, plan.k)} on {plan.ids.device}, "
                         f"need {(T, E, k)} on {device}")
    return plan


def _check_plan_routing_args(router_logits, top_k, budget, policy, score, coverage, min_budget,
                             plan: Optional[RoutingPlan]) -> None:
    """The argument checks of `moespec.ops.budget_routing`, minus the ones that read data: cheap
    metadata checks only, no device synchronisation. Raises `ValueError` (`TypeError` for a
    non-tensor or a non-float ``router_logits``, like the ops)."""
    from .ops import validate_budget

    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be 2-D [T, E], got shape {tuple(router_logits.shape)}")
    if not router_logits.is_floating_point():
        raise TypeError(f"router_logits must be a floating-point tensor, got {router_logits.dtype}")
    T, E = router_logits.shape
    if T < 1 or E < 1:
        raise ValueError(f"router_logits must have at least one token and one expert, got shape {(T, E)}")
    validate_budget(budget, top_k, policy, score, coverage, min_budget)
    if top_k > E:
        raise ValueError(f"top_k ({top_k}) exceeds the number of experts ({E})")
    if not plan_supported(E, top_k):
        raise ValueError(f"the routing plan supports E <= {_plan_limits()[0]} and top_k <= {_plan_limits()[1]}, "
                         f"got E={E}, top_k={top_k}")
    if plan is not None and plan.ids.device != router_logits.device:
        raise ValueError(f"router_logits is on {router_logits.device} but the plan's buffers are on "
                         f"{plan.ids.device}; move them to one device")


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
    plan: Optional[RoutingPlan] = None,
    csr: bool = True,
    candidates: Optional[str] = None,
    generation: Optional[str] = None,
    prefetch: Optional[tuple] = None,
) -> RoutingPlan:
    """Softmax top-k routing under a budget, as one graph-capturable launch (no host sync).

    Semantics are those of `moespec.reference.budget_routing`, except for rows without a valid softmax
    (any NaN, any +inf or all -inf logits), for which the reference is undefined (NaN weights): they
    are treated like padding tokens (no union, no score, weight 0, the lowest kept ids). The arguments
    are checked like `moespec.ops.budget_routing` does (metadata only, no device synchronisation;
    ids are never read back).

    Args:
        router_logits: ``[T, E]`` CUDA float tensor (fp32/bf16/fp16 read directly).
        top_k, budget, policy, renormalize, score, coverage, min_budget, candidates: as in
            `budget_routing` (``candidates`` None: the policy's default).
        plan: buffers to reuse (must match ``(T, E, top_k)``); allocated when None.
        csr: also build the CSR of active pairs needed by `moe_experts_planned`.
        generation: ``"v1"`` (one CTA) or ``"v2"`` (multi-CTA, docs/kernels-v2.md) plan, the same
            outputs bit for bit; None: `kernel_generation` (``MOESPEC_KERNELS``).
        prefetch: optional ``(w_gate_up, layout)``: the v2 plan then prefetches the kept experts'
            first gate/up weight tiles into L2, highest score first (`_prefetch_ranges`); v1 ignores it.

    Returns:
        The filled `RoutingPlan`.

    Raises:
        ValueError: bad shapes or budget settings (see `moespec.ops.validate_budget`), E or top_k
            beyond the plan's limits, or a ``plan`` of another size or device.
        TypeError: ``router_logits`` is not a floating-point tensor.
    """
    _check_plan_routing_args(router_logits, top_k, budget, policy, score, coverage, min_budget, plan)
    from .ops import validate_candidates

    candidates = validate_candidates(candidates, policy)
    T, E = router_logits.shape
    plan = _get_plan(plan, T, E, top_k, router_logits.device, generation)
    z = _prep_logits(router_logits)
    budgeted = budget is not None or coverage is not None
    a = _plan_args(plan, generation, scores=budgeted)
    if prefetch is not None and a.generation == 2:
        _set_prefetch(a, prefetch[0], prefetch[1], z.device)
    a.logits, a.logits_dtype, a.logits_stride = z.data_ptr(), _FLOAT_CODE[z.dtype], z.stride(0)
    a.route = 1
    a.renormalize = int(bool(renormalize))
    a.score_mode = _SCORE_CODE[score] if budgeted else 0
    a.budget = -1 if budget is None else int(budget)
    a.coverage = -1.0 if coverage is None else float(coverage)
    a.min_budget = int(top_k if min_budget is None else min_budget)
    a.all_candidates = int(candidates == "all")
    a.policy = _POLICY_CODE[policy]
    a.csr_mode = _CSR_ACTIVE if csr else _CSR_NONE
    bound = min(E, T * top_k)
    if budget is not None:
        bound = min(bound, max(int(budget), a.min_budget))
    plan.max_active = max(1, bound)
    with _on(z.device):
        _ext(z.device).routing_plan(a, _stream(z.device))
    return plan


def plan_from_routing(
    topk_ids: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
    num_experts: int,
    kept_experts: Optional[torch.Tensor] = None,
    *,
    plan: Optional[RoutingPlan] = None,
    all_pairs: bool = False,
    generation: Optional[str] = None,
) -> RoutingPlan:
    """Build the CSR plan of a given routing (graph-capturable, no host sync).

    Args:
        topk_ids: ``[T, k]`` int32/int64; ids outside ``[0, E)`` are ignored.
        topk_weights: ``[T, k]`` fp32/bf16/fp16, or None (weights 1).
        num_experts: E.
        kept_experts: optional ``[C]`` int ids allowed to run.
        all_pairs: CSR of every in-range pair (expert union) instead of the active ones
            (kept and non-zero weight).
        generation: ``"v1"`` or ``"v2"`` plan kernel (the same outputs); None: `kernel_generation`.
    """
    T, k = topk_ids.shape
    if not plan_supported(num_experts, k):
        raise ValueError(f"the routing plan supports E <= {_plan_limits()[0]} and top_k <= {_plan_limits()[1]}")
    plan = _get_plan(plan, T, num_experts, k, topk_ids.device, generation, scores=False)
    ids = topk_ids.contiguous()
    a = _plan_args(plan, generation, scores=False)
    a.in_ids, a.in_ids_type = ids.data_ptr(), _ID_CODE[ids.dtype]
    w = None
    if topk_weights is not None:
        w = topk_weights.contiguous()
        if w.dtype not in _FLOAT_CODE:
            w = w.float()
        a.in_weights, a.in_weights_dtype = w.data_ptr(), _FLOAT_CODE[w.dtype]
    kept = None
    bound = min(num_experts, T * k)
    if kept_experts is not None:
        kept = kept_experts.contiguous()
        if kept.numel() == 0:  # "keep nothing" (a null pointer would mean "keep all"): one ignored id
            kept = torch.full((1,), -1, dtype=torch.int32, device=kept.device)
        a.in_kept, a.in_kept_type, a.n_in_kept = kept.data_ptr(), _ID_CODE[kept.dtype], int(kept.numel())
        bound = min(bound, int(kept_experts.numel()))
    a.route = 0
    a.csr_mode = _CSR_ALL if all_pairs else _CSR_ACTIVE
    plan.max_active = max(1, bound)
    with _on(ids.device):
        _ext(ids.device).routing_plan(a, _stream(ids.device))
    return plan


# L2 prefetch by the v2 plan (docs/kernels-v2.md): per kept expert, the rows the expert kernel's first
# items stream (the first 64 gate and 64 up rows, or the first 128 rows of a transposed/interleaved
# block), at most _PREFETCH_ROW_BYTES per range, and at most _PREFETCH_TOTAL bytes over all experts
# (a fraction of an H100/H200's 50 MB L2, so the prefetch does not evict what it prefetched).
_PREFETCH_ROWS = 64
_PREFETCH_ROW_BYTES = 256 << 10
_PREFETCH_TOTAL = 8 << 20


def _prefetch_ranges(w_gate_up: torch.Tensor, layout: ExpertLayout) -> list[tuple[int, int, int]]:
    """``[(address of expert 0's range, bytes between experts, bytes)]`` (one or two ranges) for the
    v2 plan's L2 prefetch of ``w_gate_up`` (contiguous, ``layout``), or ``[]`` when it cannot be
    expressed (not contiguous or not 16-byte aligned)."""
    if w_gate_up.dim() != 3 or not w_gate_up.is_contiguous() or w_gate_up.data_ptr() % 16:
        return []
    es = w_gate_up.element_size()
    stride = w_gate_up.stride(0) * es
    row = w_gate_up.shape[2] * es  # bytes of one row of an expert's block
    if stride % 16 or row % 16:
        return []
    base = w_gate_up.data_ptr()
    if layout.transposed or layout.gate_up == "interleaved":
        return [(base, stride, min(2 * _PREFETCH_ROWS * row, stride, _PREFETCH_ROW_BYTES))]
    half = stride // 2  # gate rows then up rows (or the reverse): the first rows of each half
    nbytes = min(_PREFETCH_ROWS * row, half, _PREFETCH_ROW_BYTES)
    return [(base, stride, nbytes), (base + half, stride, nbytes)] if half % 16 == 0 else []


def _set_prefetch(a, w_gate_up: torch.Tensor, layout: ExpertLayout, device: torch.device) -> None:
    """Fill the prefetch fields of a v2 `PlanArgs` ``a`` (nothing when the weights are on another
    device, hold another number of experts, or `_prefetch_ranges` finds no range)."""
    if w_gate_up.device != device or w_gate_up.dim() != 3 or w_gate_up.shape[0] != a.E:
        return
    ranges = _prefetch_ranges(w_gate_up, layout)
    if not ranges or _PREFETCH_TOTAL <= 0:  # _PREFETCH_TOTAL = 0: no prefetch
        return
    per_expert = sum(r[2] for r in ranges)
    a.pf_experts = max(1, _PREFETCH_TOTAL // per_expert)
    for g, (base, stride, nbytes) in enumerate(ranges):
        setattr(a, f"pf_base{g}", base)
        setattr(a, f"pf_stride{g}", stride)
        setattr(a, f"pf_bytes{g}", nbytes)


def experts_fallback_reason(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                            topk_ids: torch.Tensor, layout: ExpertLayout = ExpertLayout()) -> Optional[str]:
    """Why `moe_experts` would run the reference instead of the kernels, or None."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"no kernel for {x.dtype} activations (bf16/fp16 only)"
    E, H, I = layout.dims(w_gate_up, w_down)
    T, k = topk_ids.shape
    if T == 0:
        return "no tokens"
    if not plan_supported(E, k):
        return f"E={E}, k={k} outside the routing plan's limits {_plan_limits()}"
    if H % 8 or I % 8:
        return f"H={H} and I={I} must be multiples of 8"
    if x.stride(0) % 8 or any(t.data_ptr() % 16 for t in (x, w_gate_up, w_down)):
        return "x rows and weights must be 16-byte aligned"
    return None


# Split-K is chosen for a nominal GPU of this many SMs (H100/H200), not the one present: the
# summation order, and so the bits of a deterministic result, must not depend on the SM count.
_NOMINAL_SMS = 132


def _k_splits(row_tiles: int, K: int, experts: int) -> int:
    """K splits so that few experts still give about 2 CTAs per (nominal) SM, each split keeping
    at least 4 pipeline stages of 64 (the kernels stream each expert's weights exactly once either way).

    ``experts`` is ``min(E, T * k)``, a function of the shapes only, never of the budget or the
    plan API used, so that every API gives the same split and the same bits for the same routing.
    """
    ctas = row_tiles * max(1, experts)
    want = -(-2 * _NOMINAL_SMS // ctas)
    return max(1, min(want, (-(-K // 64)) // 4))


def moe_experts_planned(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    plan: RoutingPlan,
    layout: ExpertLayout = ExpertLayout(),
    b_gate_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    out: Optional[torch.Tensor] = None,
    generation: Optional[str] = None,
) -> torch.Tensor:
    """Budgeted grouped SwiGLU experts over a plan built with the CSR of active pairs.

    Graph-capturable (no host sync). Only experts with active pairs have their weights read.

    Args:
        x: ``[T, H]`` bf16/fp16, rows contiguous and 16-byte aligned.
        w_gate_up, w_down: contiguous weights in ``layout`` (see `moespec.ExpertLayout`).
        plan: from `plan_routing` or `plan_from_routing` (not ``all_pairs``) for the same T.
        b_gate_up: optional ``[E, 2I]``; b_down: optional ``[E, H]`` (any float dtype).
        deterministic: fixed slot-order combine (default); False uses fp32 atomics.
        out: optional ``[T, H]`` output in ``x.dtype``.
        generation: ``"v1"`` or ``"v2"`` kernels; None: `kernel_generation` (``MOESPEC_KERNELS``).

    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    gen = kernel_generation(generation)
    T, H = x.shape
    E, _, I = layout.dims(w_gate_up, w_down)
    k = plan.k
    dev = x.device
    if plan.T != T or plan.ids.device != dev:
        raise ValueError(f"the plan is for T={plan.T} on {plan.ids.device}, x is [{T}, {H}] on {dev}")
    if out is None:
        out = torch.empty(T, H, dtype=x.dtype, device=dev)
    elif out.shape != (T, H) or out.dtype != x.dtype or out.device != dev:
        raise ValueError(f"out must be [{T}, {H}] {x.dtype} on {dev}, got {list(out.shape)} {out.dtype} on {out.device}")
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous (the kernels write rows of H elements back to back)")
    max_experts = max(1, min(plan.max_active, E))
    counters = None
    if gen == "v2":  # persistent kernel: fp32 partials per (pair, I-slice); its combine kernel sums them
        ksplit = ksplit1 = 1
        nslices = -(-I // int(_ext(dev).experts_v2_slice))
        hbuf = torch.empty(1, 8, dtype=x.dtype, device=dev)  # unused by v2, checked for alignment
        # The stream-K flags and h workspace (sized by the grid: SMs x resident CTAs per SM), and the
        # atomic accumulator: zero on entry, kept in the plan (the combine kernel leaves them zero; no
        # memset launch).
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            grid = int(_ext(dev).experts_v2_grid())
        if grid < 1:
            raise RuntimeError("moe_experts v2: cannot query the device's SM count")
        ncounters = int(_ext(dev).experts_v2_counters_len(grid))
        counters, ybuf = plan._v2_expert_state(ncounters, H, not deterministic)
        if deterministic:  # fp32 partials per (pair, I-slice): every element written before it is read
            ybuf = torch.empty(nslices * T * k, H, dtype=torch.float32, device=dev)
        gubuf = None
    else:
        shape_experts = min(E, T * k)
        ksplit = _k_splits(-(-H // 128), I, shape_experts)  # GEMM2: 128 rows of H per CTA, K = I
        ksplit1 = _k_splits(-(-I // 64), H, shape_experts)  # GEMM1: 64 columns of I per CTA, K = H
        hbuf = torch.empty(max(T * k, 1), I, dtype=x.dtype, device=dev)
        ybuf = torch.empty((ksplit * T * k if deterministic else T), H, dtype=torch.float32, device=dev)
        gubuf = torch.empty(ksplit1 * T * k, I, 2, dtype=torch.float32, device=dev) if ksplit1 > 1 else None
    bgu = None if b_gate_up is None else b_gate_up.float().contiguous()
    bdn = None if b_down is None else b_down.float().contiguous()
    a = _ext(dev).ExpertsArgs()
    a.dtype = _FLOAT_CODE[x.dtype]
    a.transposed = int(bool(layout.transposed))
    a.x, a.x_stride = x.data_ptr(), x.stride(0)
    a.w_gu, a.w_down = w_gate_up.data_ptr(), w_down.data_ptr()
    a.b_gu = 0 if bgu is None else bgu.data_ptr()
    a.b_down = 0 if bdn is None else bdn.data_ptr()
    a.T, a.k, a.H, a.I = T, k, H, I
    a.order, a.activation = _ORDER_CODE[layout.gate_up], _ACT_CODE[layout.activation]
    a.alpha, a.limit = float(layout.alpha), float(layout.limit)
    a.meta, a.act_experts, a.act_offsets = plan.meta.data_ptr(), plan.act_experts.data_ptr(), plan.act_offsets.data_ptr()
    a.pair_token, a.pair_slot = plan.pair_token.data_ptr(), plan.pair_slot.data_ptr()
    a.pair_position, a.weights = plan.pair_position.data_ptr(), plan.weights.data_ptr()
    a.hbuf, a.ybuf, a.out = hbuf.data_ptr(), ybuf.data_ptr(), out.data_ptr()
    a.atomic = 0 if deterministic else 1
    a.max_experts = max_experts
    a.ksplit = ksplit
    a.ksplit1 = ksplit1
    a.gubuf = 0 if gubuf is None else gubuf.data_ptr()
    a.generation = 2 if gen == "v2" else 1
    a.counters = 0 if counters is None else counters.data_ptr()
    a.counters_len = 0 if counters is None else counters.numel()
    if gen == "v2":
        a.grid = grid
    with _on(dev):
        _ext(dev).moe_experts(a, _stream(dev))
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
    deterministic: bool = True,
    layout: ExpertLayout = ExpertLayout(),
    *,
    b_gate_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    plan: Optional[RoutingPlan] = None,
    out: Optional[torch.Tensor] = None,
    candidates: Optional[str] = None,
    generation: Optional[str] = None,
) -> tuple[torch.Tensor, RoutingPlan]:
    """A whole budgeted MoE layer, graph-capturable: returns ``(y [T, H], plan)``. Launches: the plan,
    then 3-4 (``v1``) or a persistent kernel and its combine kernel (``v2``); see `kernel_generation`. The
    ``v2`` plan is the multi-CTA one, and it prefetches the kept experts' first gate/up tiles into L2."""
    plan = plan_routing(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget, plan=plan,
                        candidates=candidates, generation=generation, prefetch=(w_gate_up, layout))
    y = moe_experts_planned(x, w_gate_up, w_down, plan, layout, b_gate_up, b_down, deterministic, out, generation)
    return y, plan


# ----------------------------------------------------------------------------- op-level API


def expert_union(topk_ids: torch.Tensor, num_experts: int) -> ExpertUnion:
    """`moespec.reference.expert_union` on the GPU (one launch plus one sync for the lengths)."""
    T, k = topk_ids.shape
    if T == 0 or not plan_supported(num_experts, k):
        return reference.expert_union(topk_ids, num_experts)
    plan = plan_from_routing(topk_ids, None, num_experts, all_pairs=True)
    c = plan.counts()
    U, P = c["active"], c["pairs"]
    return ExpertUnion(
        experts=plan.act_experts[:U].clone(),
        offsets=plan.act_offsets[:U + 1].clone(),
        pair_token=plan.pair_token[:P].clone(),
        pair_slot=plan.pair_slot[:P].clone(),
        pair_position=plan.pair_position.clone(),
    )


def score_experts(router_logits: torch.Tensor, mode: str, topk_ids: Optional[torch.Tensor],
                  topk_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """`moespec.reference.score_experts` on the GPU: ``[E]`` fp32 (no host sync)."""
    T, E = router_logits.shape
    k = 1 if mode == "prob" else topk_ids.shape[1]
    if T == 0 or not plan_supported(E, k):
        return reference.score_experts(router_logits, mode, topk_ids, topk_weights)
    plan = RoutingPlan.empty(T, E, k, router_logits.device)
    a = _plan_args(plan)
    keep = []
    if mode == "prob":
        z = _prep_logits(router_logits)
        keep.append(z)
        a.logits, a.logits_dtype, a.logits_stride = z.data_ptr(), _FLOAT_CODE[z.dtype], z.stride(0)
    else:
        ids, w = topk_ids.contiguous(), topk_weights.contiguous()
        keep += [ids, w]
        a.in_ids, a.in_ids_type = ids.data_ptr(), _ID_CODE[ids.dtype]
        a.in_weights, a.in_weights_dtype = w.data_ptr(), _FLOAT_CODE[w.dtype]
    a.score_mode = _SCORE_CODE[mode]
    with _on(router_logits.device):
        _ext(router_logits.device).routing_plan(a, _stream(router_logits.device))
    return plan.scores


def budget_routing(router_logits: torch.Tensor, top_k: int, budget: Optional[int], policy: str,
                   renormalize: bool, score: str, coverage: Optional[float],
                   min_budget: Optional[int], candidates: Optional[str] = None) -> BudgetedRouting:
    """`moespec.reference.budget_routing` on the GPU (one launch plus one sync for the lengths)."""
    T, E = router_logits.shape
    if T == 0 or not plan_supported(E, top_k):
        return reference.budget_routing(router_logits, top_k, budget, policy, renormalize, score, coverage,
                                        min_budget, candidates=candidates)
    plan = plan_routing(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget, csr=False,
                        candidates=candidates)
    c = plan.counts()
    return BudgetedRouting(
        topk_ids=plan.ids.long(),
        topk_weights=plan.weights,
        kept_experts=plan.kept_experts[:c["kept"]].clone(),
        union_size=c["union"],
        budgeted=c["budgeted"],
    )


def budget_routing_masked(router_logits: torch.Tensor, top_k: int, budget: Optional[int], policy: str,
                          renormalize: bool, score: str, coverage: Optional[float], min_budget: Optional[int],
                          candidates: Optional[str] = None):
    """`moespec.reference.budget_routing_masked` on the GPU: one plan launch, no host sync.

    Returns ``(ids [T,k] int64, weights [T,k] fp32, kept_mask [E] bool, union_size 0-d int64,
    budgeted 0-d bool)``, read from the plan's worst-case buffers and device-side counts.
    """
    plan = plan_routing(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget, csr=False,
                        candidates=candidates)
    E = plan.E
    ar = torch.arange(E, device=plan.meta.device)
    # Only the first meta[KEPT] entries of kept_experts are written; the rest land in a spare slot.
    idx = torch.where(ar < plan.meta[META_KEPT], plan.kept_experts.long(), torch.full_like(ar, E))
    kept_mask = torch.zeros(E + 1, dtype=torch.bool, device=ar.device).index_fill(0, idx, True)[:E]
    return (plan.ids.long(), plan.weights, kept_mask, plan.meta[META_UNION].long(),
            plan.meta[META_BUDGETED] != 0)


def moe_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, kept_experts: Optional[torch.Tensor], deterministic: bool,
                layout: ExpertLayout, b_gate_up: Optional[torch.Tensor],
                b_down: Optional[torch.Tensor]) -> torch.Tensor:
    """`moespec.reference.moe_experts` on the GPU (no host sync; graph-capturable).

    Falls back to the reference for the cases listed by `experts_fallback_reason` (fp32 above all).
    """
    if experts_fallback_reason(x, w_gate_up, w_down, topk_ids, layout) is not None:
        return reference.moe_experts(x, w_gate_up, w_down, topk_ids, topk_weights, kept_experts,
                                     b_gate_up=b_gate_up, b_down=b_down, layout=layout, deterministic=deterministic)
    E = w_gate_up.shape[0]
    plan = plan_from_routing(topk_ids, topk_weights, E, kept_experts)
    return moe_experts_planned(x, w_gate_up, w_down, plan, layout, b_gate_up, b_down, deterministic)
