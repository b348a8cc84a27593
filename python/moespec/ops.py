"""The public op API of moespec (docs/design.md §3).

Every op validates its inputs (shapes, dtypes, devices, contiguity, id ranges, budgets) and
raises a clear `ValueError` / `TypeError` on bad input. CUDA tensors go to the compiled kernels
in ``moespec._C`` where a kernel for the op exists, CPU tensors to the C++ CPU kernels
(`moespec.cpu_kernels`); everything else runs ``moespec.reference``, which defines the semantics.

``backend`` selects the implementation: ``"auto"`` (the default, as above), ``"reference"``
(always the PyTorch reference), ``"cuda"`` (the kernels or a `RuntimeError` saying why not),
``"cpu"``: the C++ CPU kernels (`moespec.cpu_kernels`, compiled into every build; what ``"auto"``
picks for CPU tensors), or ``"emu"``: the same kernels on CPU tensors through the CPU emulator,
in an emulation build (``MOESPEC_CUDA=EMU``; slow, for testing kernels without a GPU; never
chosen by ``"auto"``).
"""
from __future__ import annotations

import numbers
import operator
from typing import Optional, Sequence

import torch

from . import _cuda, cpu_kernels, custom_ops, reference
from .types import POLICIES, SCORE_MODES, BudgetedRouting, ExpertLayout, ExpertUnion, RoutingMasks

__all__ = [
    "ExpertLayout",
    "ExpertUnion",
    "BudgetedRouting",
    "RoutingMasks",
    "expert_union",
    "score_experts",
    "budget_routing",
    "budget_routing_masked",
    "moe_experts",
    "budgeted_moe",
    "validate_budget",
    "validate_candidates",
    "as_int",
]

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ID_DTYPES = (torch.int32, torch.int64)
_BACKENDS = ("auto", "reference", "cuda", "emu", "cpu")
# The compiled launcher behind each op (the routing ops share one plan kernel).
_LAUNCHER = {"expert_union": "routing_plan", "score_experts": "routing_plan", "budget_routing": "routing_plan",
             "moe_experts": "moe_experts"}


# ----------------------------------------------------------------------------- validation


def _tensor(name: str, t, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def _same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def _contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(t.stride())}); call .contiguous() first")


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _check_id_range(name: str, ids: torch.Tensor, num_experts: int) -> None:
    # A range check reads data (a host sync on GPU): skip it while torch.compile/export trace
    # (the custom ops re-check at run time under MOESPEC_DEBUG=1) and inside CUDA-graph capture,
    # where the kernels ignore out-of-range ids instead of reading out of bounds.
    if ids.numel() == 0 or ids.dtype == torch.bool or _tracing() or _capturing(ids):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"{name} holds expert ids outside [0, {num_experts}): min {lo}, max {hi}")


def _check_routing(topk_ids: torch.Tensor, topk_weights: Optional[torch.Tensor], T: Optional[int], E: int) -> None:
    _tensor("topk_ids", topk_ids, 2)
    _dtype("topk_ids", topk_ids, _ID_DTYPES)
    if T is not None and topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows but there are {T} tokens")
    if topk_ids.shape[1] < 1:
        raise ValueError("topk_ids must have at least one column (top_k >= 1)")
    if topk_weights is not None:
        _tensor("topk_weights", topk_weights, 2)
        _dtype("topk_weights", topk_weights, _ACT_DTYPES)
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(
                f"topk_weights shape {tuple(topk_weights.shape)} != topk_ids shape {tuple(topk_ids.shape)}")
        _same_device("topk_ids", topk_ids, topk_weights=topk_weights)
    _check_id_range("topk_ids", topk_ids, E)


def _check_logits(router_logits) -> None:
    _tensor("router_logits", router_logits, 2)
    if not router_logits.is_floating_point():
        raise TypeError(f"router_logits must be a floating-point tensor, got {router_logits.dtype}")
    if router_logits.shape[1] < 1:
        raise ValueError("router_logits must have at least one expert column")


def as_int(name: str, value) -> int:
    """``value`` as a Python int if it is integer-like, else a `ValueError` naming ``name``.

    Integer-like: ``int``, NumPy integer scalars (``numpy.int64``, ...) and 0-d integer tensors
    (read with ``.item()``, a host sync for a CUDA tensor), i.e. anything with ``__index__``
    except booleans (``True``, ``numpy.bool_``, bool tensors), floats and tensors with more than
    one dimension or element.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise ValueError(f"{name} must be an int, got a tensor of dtype "
                             f"{str(value.dtype).replace('torch.', '')} and shape {tuple(value.shape)} "
                             "(a 0-d integer tensor is accepted)")
        return int(value.item())
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):  # also numpy.bool_
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def validate_budget(
    budget: Optional[int],
    top_k: int,
    policy: str = "substitute",
    score: str = "prob",
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
) -> tuple[Optional[int], int, Optional[int]]:
    """Raise `ValueError` unless the budget settings are meaningful for a top-``top_k`` router.

    Rules: ``budget`` is None or an integer with ``top_k <= budget``; ``policy`` in
    ``("substitute", "truncate")``; ``score`` in ``("prob", "topk")``; ``coverage`` None or a
    real number in ``(0, 1]``; ``min_budget`` None or an integer in ``[top_k, budget]``, only
    together with ``coverage``. ``top_k`` is an integer >= 1. An integer is an ``int``, a NumPy
    integer or a 0-d integer tensor; booleans are rejected (see `as_int`). A budget ``>= E``
    is valid (it never binds).

    Returns:
        ``(budget, top_k, min_budget)`` as Python ints (None kept), for callers that pass them on.
    """
    try:
        top_k = as_int("top_k", top_k)
    except ValueError:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}") from None
    if top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if budget is not None:
        try:
            budget = as_int("budget", budget)
        except ValueError:
            raise ValueError(f"budget must be an int or None (NumPy integers and 0-d integer tensors are "
                             f"accepted, bools are not), got {budget!r}") from None
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        if budget < top_k:
            raise ValueError(f"budget ({budget}) must be >= top_k ({top_k}): every token needs {top_k} experts")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if score not in SCORE_MODES:
        raise ValueError(f"score must be one of {SCORE_MODES}, got {score!r}")
    if coverage is not None:
        if isinstance(coverage, bool) or not isinstance(coverage, numbers.Real) or not 0.0 < float(coverage) <= 1.0:
            raise ValueError(f"coverage must be a number in (0, 1], got {coverage!r}")
    if min_budget is not None:
        if coverage is None:
            raise ValueError("min_budget only applies together with coverage")
        try:
            min_budget = as_int("min_budget", min_budget)
        except ValueError:
            raise ValueError(f"min_budget must be an int >= top_k ({top_k}), got {min_budget!r}") from None
        if min_budget < top_k:
            raise ValueError(f"min_budget must be an int >= top_k ({top_k}), got {min_budget!r}")
        if budget is not None and min_budget > budget:
            raise ValueError(f"min_budget ({min_budget}) must be <= budget ({budget})")
    return budget, top_k, min_budget


def validate_candidates(candidates: Optional[str], policy: str = "substitute") -> str:
    """Resolve the candidate set of a budget: ``"all"``, ``"union"``, or None for the policy's default.

    ``"all"``: the kept set is chosen among every expert (MoE-Spec's rule); ``"union"``: among
    the experts of at least one token's top-k (the default, `reference.default_candidates`: it
    measured better on the shipped models; docs/budget-rules.md).

    Raises:
        ValueError: anything else.
    """
    if candidates is None:
        return reference.default_candidates(policy)
    if not isinstance(candidates, str) or candidates not in reference.CANDIDATES:
        raise ValueError(f"candidates must be one of {reference.CANDIDATES} or None (the default, "
                         f"{reference.default_candidates(policy)!r}), got {candidates!r}")
    return candidates


def _resolve_backend(backend: str, device_tensor: torch.Tensor, kernel: str) -> bool:
    """True when the op should run the CUDA kernel ``kernel``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if backend == "cpu":
        _check_cpu_backend(device_tensor, kernel)
        return False
    launcher = _LAUNCHER[kernel]
    if backend == "emu":
        _cuda.require_emu(kernel)
        if device_tensor.device.type != "cpu":
            raise ValueError(f"backend='emu' needs CPU tensors, got tensors on {device_tensor.device}")
        if not _cuda.has_emu_kernel(launcher):
            raise RuntimeError(f"moespec: this emulation build has no kernel for {kernel}")
        return True
    if backend == "cuda":
        _cuda.require(kernel)
        if not device_tensor.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device_tensor.device}")
        if not _cuda.has_kernel(launcher):
            raise RuntimeError(f"moespec: this build has no CUDA kernel for {kernel}")
        return True
    return device_tensor.is_cuda and _cuda.has_kernel(launcher)


def _check_backend(backend: str, device_tensor: torch.Tensor, kernel: str) -> None:
    """Validate ``backend`` for an op that resolves it at run time (inside a custom op)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend in ("cuda", "emu", "cpu") and not _tracing():
        _resolve_backend(backend, device_tensor, kernel)


def _check_cpu_backend(device_tensor: torch.Tensor, kernel: str) -> None:
    cpu_kernels.require(kernel)
    if device_tensor.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device_tensor.device}")


def _use_cpu_kernels(backend: str, device_tensor: torch.Tensor, kernel: str) -> bool:
    """True when the op runs the C++ CPU kernels: ``backend="cpu"`` (validated), or ``"auto"``
    on CPU tensors."""
    if backend == "cpu":
        _check_cpu_backend(device_tensor, kernel)
        return True
    return backend == "auto" and device_tensor.device.type == "cpu" and cpu_kernels.available()


def _check_token_mask(token_mask: Optional[torch.Tensor], router_logits: torch.Tensor) -> None:
    if token_mask is None:
        return
    _tensor("token_mask", token_mask, 1)
    _dtype("token_mask", token_mask, (torch.bool,))
    if token_mask.shape[0] != router_logits.shape[0]:
        raise ValueError(f"token_mask has {token_mask.shape[0]} entries but router_logits has "
                         f"{router_logits.shape[0]} tokens")
    _same_device("router_logits", router_logits, token_mask=token_mask)


# ----------------------------------------------------------------------------- ops


def expert_union(topk_ids: torch.Tensor, num_experts: int, *, backend: str = "auto") -> ExpertUnion:
    """Unique experts of a routing and their (token, slot) pairs in CSR form.

    Args:
        topk_ids: ``[T, k]`` int32/int64 ids in ``[0, num_experts)``.
        num_experts: E.

    Returns:
        `ExpertUnion`: ``experts [U]`` int32 sorted, ``offsets [U+1]`` int32, ``pair_token`` and
        ``pair_slot`` ``[T*k]`` int32 (grouped by expert, then token, then slot),
        ``pair_position [T, k]`` int32 (inverse map).
    """
    try:
        num_experts = as_int("num_experts", num_experts)
    except ValueError:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}") from None
    if num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    _check_routing(topk_ids, None, None, num_experts)
    if _use_cpu_kernels(backend, topk_ids, "expert_union"):
        return cpu_kernels.expert_union(topk_ids, num_experts)
    if _resolve_backend(backend, topk_ids, "expert_union"):
        from . import kernels

        return kernels.expert_union(topk_ids, num_experts)
    return reference.expert_union(topk_ids, num_experts)


def score_experts(
    router_logits: torch.Tensor,
    mode: str = "prob",
    topk_ids: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-expert aggregate score over the tokens of one call (docs/design.md §3).

    Args:
        router_logits: ``[T, E]`` float (math in fp32).
        mode: ``"prob"`` (sum of full-softmax probabilities) or ``"topk"`` (sum of the top-k
            weights; needs ``topk_ids`` and ``topk_weights``).

    Returns:
        ``[E]`` fp32.
    """
    _check_logits(router_logits)
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
    T, E = router_logits.shape
    if mode == "topk":
        if topk_ids is None or topk_weights is None:
            raise ValueError("mode='topk' needs topk_ids and topk_weights")
        _check_routing(topk_ids, topk_weights, T, E)
        _same_device("router_logits", router_logits, topk_ids=topk_ids)
    _check_backend(backend, router_logits, "score_experts")
    return custom_ops.score_experts(router_logits, mode, topk_ids, topk_weights, backend)


def budget_routing(
    router_logits: torch.Tensor,
    top_k: int,
    budget: Optional[int],
    policy: str = "substitute",
    renormalize: bool = False,
    score: str = "prob",
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
    *,
    token_mask: Optional[torch.Tensor] = None,
    candidates: Optional[str] = None,
    backend: str = "auto",
) -> BudgetedRouting:
    """Softmax top-k routing of one forward call under an expert budget (docs/design.md §3).

    The budget is a cap: when the union of the tokens' top-k experts has at most ``budget``
    experts, ids and weights are bit-identical to unbudgeted routing. Otherwise the ``budget``
    candidate experts with the highest score (ties to the lower id) are kept, and

    - ``policy="substitute"``: each token takes its top-k among the kept experts, weighted by
      its original full-softmax probabilities, then renormalised if ``renormalize``;
    - ``policy="truncate"``: each token keeps its top-k; pairs outside the kept set get weight
      0, then the survivors are renormalised if ``renormalize`` (all dropped: all zero).

    ``coverage=tau`` keeps the smallest set of candidates reaching ``tau`` of their score
    mass, clamped to ``[min_budget (default top_k), budget]``. ``budget=None`` without coverage
    means no budget.

    Args:
        router_logits: ``[T, E]`` float.
        top_k: experts per token, ``1 <= top_k <= E``.
        token_mask: optional ``[T]`` bool, False for padding: padding tokens count neither
            towards the union nor the scores and, under a budget, get zero weights.
        candidates: the experts the kept set is chosen from: ``"all"`` (every expert, MoE-Spec's
            rule), ``"union"`` (the union of the tokens' top-k), or None for the policy's default
            (`validate_candidates`).

    Returns:
        `BudgetedRouting` (``topk_ids [T,k]`` int64, ``topk_weights [T,k]`` fp32,
        ``kept_experts`` int32 sorted, ``union_size``, ``budgeted``). Reading the kept set's
        length synchronises with the device; `budget_routing_masked` does not.
    """
    budget, top_k, min_budget = _check_routing_args(router_logits, top_k, budget, policy, score, coverage, min_budget,
                                                    token_mask)
    candidates = validate_candidates(candidates, policy)
    coverage = None if coverage is None else float(coverage)
    if _use_cpu_kernels(backend, router_logits, "budget_routing"):
        return cpu_kernels.budget_routing(router_logits, top_k, budget, policy, renormalize, score, coverage,
                                          min_budget, token_mask, candidates)
    # The CUDA plan has no token mask: masked routing runs the reference (on the same device).
    if _resolve_backend(backend, router_logits, "budget_routing") and token_mask is None:
        from . import kernels

        return kernels.budget_routing(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget,
                                      candidates)
    return reference.budget_routing(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget,
                                    token_mask, candidates)


def _check_routing_args(router_logits, top_k, budget, policy, score, coverage, min_budget, token_mask):
    """Validate the routing arguments; returns ``(budget, top_k, min_budget)`` as Python ints."""
    _check_logits(router_logits)
    budget, top_k, min_budget = validate_budget(budget, top_k, policy, score, coverage, min_budget)
    E = router_logits.shape[1]
    if top_k > E:
        raise ValueError(f"top_k ({top_k}) exceeds the number of experts ({E})")
    _check_token_mask(token_mask, router_logits)
    return budget, top_k, min_budget


def budget_routing_masked(
    router_logits: torch.Tensor,
    top_k: int,
    budget: Optional[int],
    policy: str = "substitute",
    renormalize: bool = False,
    score: str = "prob",
    coverage: Optional[float] = None,
    min_budget: Optional[int] = None,
    *,
    token_mask: Optional[torch.Tensor] = None,
    candidates: Optional[str] = None,
    backend: str = "auto",
) -> RoutingMasks:
    """`budget_routing` with fixed output shapes and no host synchronisation.

    The same routing decisions as `budget_routing`, for code that is compiled
    (``torch.compile(fullgraph=True)``, ``torch.export``) or captured in a CUDA graph: one
    ``torch.ops.moespec.budget_routing_masked`` node, the kept set as an ``[E]`` mask and the
    counts as device tensors. Arguments as in `budget_routing`.

    Returns:
        `RoutingMasks` (``topk_ids [T,k]`` int64, ``topk_weights [T,k]`` fp32, ``kept_mask [E]``
        bool, ``union_size`` 0-d int64, ``budgeted`` 0-d bool).
    """
    budget, top_k, min_budget = _check_routing_args(router_logits, top_k, budget, policy, score, coverage, min_budget,
                                                    token_mask)
    candidates = validate_candidates(candidates, policy)
    _check_backend(backend, router_logits, "budget_routing")
    return RoutingMasks(*custom_ops.budget_routing_masked(
        router_logits, top_k, budget, policy, renormalize, score,
        None if coverage is None else float(coverage), min_budget, token_mask, candidates, backend))


def _check_experts(
    x, w_gate_up, w_down, topk_ids, topk_weights, kept_experts, b_gate_up, b_down, layout
) -> None:
    if not isinstance(layout, ExpertLayout):
        raise TypeError(f"layout must be a moespec.ExpertLayout, got {type(layout).__name__}")
    _tensor("x", x, 2)
    _dtype("x", x, _ACT_DTYPES)
    if x.stride(-1) != 1:
        raise ValueError("x must have contiguous rows (x.stride(-1) == 1)")
    _tensor("w_gate_up", w_gate_up, 3)
    _tensor("w_down", w_down, 3)
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} dtype {w.dtype} must match x dtype {x.dtype}")
        _contiguous(name, w)
    T, H = x.shape
    E = w_gate_up.shape[0]
    if layout.transposed:
        want_h, two_i = w_gate_up.shape[1], w_gate_up.shape[2]
        gu_desc, down_desc = "[E, H, 2I]", "[E, I, H]"
    else:
        two_i, want_h = w_gate_up.shape[1], w_gate_up.shape[2]
        gu_desc, down_desc = "[E, 2I, H]", "[E, H, I]"
    if want_h != H:
        raise ValueError(f"w_gate_up {tuple(w_gate_up.shape)} ({gu_desc}) does not match hidden size H={H} of x")
    if two_i % 2 != 0 or two_i == 0:
        raise ValueError(f"w_gate_up {tuple(w_gate_up.shape)} ({gu_desc}) needs an even, non-zero 2I dimension")
    inter = two_i // 2
    want_down = (E, inter, H) if layout.transposed else (E, H, inter)
    if tuple(w_down.shape) != want_down:
        raise ValueError(f"w_down has shape {tuple(w_down.shape)}, expected {want_down} ({down_desc})")
    if b_gate_up is not None:
        _tensor("b_gate_up", b_gate_up, 2)
        if tuple(b_gate_up.shape) != (E, two_i):
            raise ValueError(f"b_gate_up has shape {tuple(b_gate_up.shape)}, expected {(E, two_i)}")
        _dtype("b_gate_up", b_gate_up, _ACT_DTYPES)
    if b_down is not None:
        _tensor("b_down", b_down, 2)
        if tuple(b_down.shape) != (E, H):
            raise ValueError(f"b_down has shape {tuple(b_down.shape)}, expected {(E, H)}")
        _dtype("b_down", b_down, _ACT_DTYPES)
    _check_routing(topk_ids, topk_weights, T, E)
    if kept_experts is not None:
        _tensor("kept_experts", kept_experts, 1)
        _dtype("kept_experts", kept_experts, _ID_DTYPES + (torch.bool,))
        if kept_experts.dtype == torch.bool and kept_experts.shape[0] != E:
            raise ValueError(f"a boolean kept_experts mask needs one entry per expert ({E}), "
                             f"got {kept_experts.shape[0]}")
        _check_id_range("kept_experts", kept_experts, E)
    _same_device("x", x, w_gate_up=w_gate_up, w_down=w_down, topk_ids=topk_ids, topk_weights=topk_weights,
                 kept_experts=kept_experts, b_gate_up=b_gate_up, b_down=b_down)


def moe_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    kept_experts: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    layout: ExpertLayout = ExpertLayout(),
    *,
    b_gate_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated-MLP experts over routed tokens; dropped and zero-weight pairs cost nothing.

    ``y[t] = sum_s topk_weights[t, s] * expert_{topk_ids[t, s]}(x[t])`` over pairs whose weight
    is non-zero and whose expert is in ``kept_experts`` (when given); other experts' weights are
    never read.

    Args:
        x: ``[T, H]`` fp32/bf16/fp16 with contiguous rows.
        w_gate_up: ``[E, 2I, H]`` contiguous, dtype of ``x`` (``[E, H, 2I]`` if ``layout.transposed``).
        w_down: ``[E, H, I]`` contiguous, dtype of ``x`` (``[E, I, H]`` if transposed).
        topk_ids: ``[T, k]`` int32/int64 in ``[0, E)``.
        topk_weights: ``[T, k]`` fp32 or activation dtype.
        kept_experts: optional ``[C]`` int32/int64 ids allowed to run, or an ``[E]`` bool mask.
        deterministic: fixed summation order (default); False allows the atomic combine.
        layout: `ExpertLayout` (gate/up order, transposition, activation).
        b_gate_up: optional ``[E, 2I]`` bias; b_down: optional ``[E, H]`` bias (gpt-oss).

    Returns:
        ``[T, H]`` in ``x.dtype``, accumulated in fp32.
    """
    _check_experts(x, w_gate_up, w_down, topk_ids, topk_weights, kept_experts, b_gate_up, b_down, layout)
    _check_backend(backend, x, "moe_experts")
    return custom_ops.moe_experts(x, w_gate_up, w_down, topk_ids, topk_weights, kept_experts, b_gate_up, b_down,
                                  bool(deterministic), layout.gate_up, bool(layout.transposed), layout.activation,
                                  float(layout.alpha), float(layout.limit), backend)


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
    deterministic: bool = True,
    layout: ExpertLayout = ExpertLayout(),
    *,
    b_gate_up: Optional[torch.Tensor] = None,
    b_down: Optional[torch.Tensor] = None,
    candidates: Optional[str] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, BudgetedRouting]:
    """Routing, budget and experts in one call, for custom softmax top-k MoE layers.

    Args:
        x: ``[T, H]``; router_logits: ``[T, E]``; weights as in `moe_experts`; budget settings
        as in `budget_routing`.

    Returns:
        ``(y [T, H] in x.dtype, BudgetedRouting)``.
    """
    _check_logits(router_logits)
    _tensor("x", x, 2)
    if router_logits.shape[0] != x.shape[0]:
        raise ValueError(f"router_logits has {router_logits.shape[0]} rows but x has {x.shape[0]} tokens")
    if isinstance(w_gate_up, torch.Tensor) and w_gate_up.dim() == 3 and router_logits.shape[1] != w_gate_up.shape[0]:
        raise ValueError(
            f"router_logits has {router_logits.shape[1]} experts but w_gate_up has {w_gate_up.shape[0]}")
    _same_device("x", x, router_logits=router_logits)
    routing = budget_routing(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget,
                             candidates=candidates, backend=backend)
    y = moe_experts(x, w_gate_up, w_down, routing.topk_ids, routing.topk_weights, routing.kept_experts,
                    deterministic, layout, b_gate_up=b_gate_up, b_down=b_down, backend=backend)
    return y, routing
