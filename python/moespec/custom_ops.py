"""moespec's fixed-shape ops registered as PyTorch custom ops (``torch.ops.moespec.*``).

`torch.compile` and `torch.export` cannot trace into the pybind11 kernels (raw pointers) and
must not trace the reference's data-dependent Python; registered as custom ops with fake
implementations that only compute output shapes, each op is one opaque graph node whatever
backend runs it. The real implementation picks the backend at run time: the CUDA kernels for
CUDA tensors where they exist, the C++ CPU kernels (`moespec.cpu_kernels`) for CPU tensors, else
`moespec.reference` (which, in these fixed-shape forms, never synchronises with the device either).

`moespec.ops` validates inputs and calls these; use `moespec.ops`, not this module. Ops whose
output sizes depend on the data (`expert_union`, the list form of `budget_routing`) are not
registered: use `budget_routing_masked` in compiled or graph-captured code.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import _cuda, cpu_kernels, reference
from .types import ExpertLayout

__all__ = ["moe_experts", "budget_routing_masked", "score_experts", "debug_checks"]


def debug_checks() -> bool:
    """True when ``MOESPEC_DEBUG=1``: ops also check data (id ranges) inside compiled graphs."""
    return os.environ.get("MOESPEC_DEBUG", "") not in ("", "0")


def _use_cuda(backend: str, t: torch.Tensor, kernel: str) -> bool:
    """True when the compiled kernels run this op: CUDA tensors with a CUDA build, or CPU tensors
    with ``backend="emu"`` in an emulation build (ops.py validated the choice)."""
    if backend == "emu":
        return t.device.type == "cpu" and _cuda.has_emu_kernel(kernel)
    if backend == "reference" or not t.is_cuda:
        return False
    return _cuda.has_kernel(kernel)


def _use_cpu(backend: str, t: torch.Tensor) -> bool:
    """True when the C++ CPU kernels run this op: ``backend`` "cpu", or "auto" on CPU tensors."""
    return backend in ("auto", "cpu") and t.device.type == "cpu" and cpu_kernels.available()


def _check_ids_now(name: str, ids: Optional[torch.Tensor], num_experts: int) -> None:
    if ids is None or ids.numel() == 0 or ids.dtype == torch.bool:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"{name} holds expert ids outside [0, {num_experts}): min {lo}, max {hi}")


# ----------------------------------------------------------------------------- experts


@torch.library.custom_op("moespec::moe_experts", mutates_args=())
def moe_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    kept_experts: Optional[torch.Tensor],
    b_gate_up: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    deterministic: bool,
    gate_up: str,
    transposed: bool,
    activation: str,
    alpha: float,
    limit: float,
    backend: str,
) -> torch.Tensor:
    """`moespec.ops.moe_experts` as one node: ``[T, H]`` in ``x.dtype`` (a new tensor).

    ``kept_experts`` is ``[C]`` ids or an ``[E]`` bool mask; the layout travels as its fields.
    """
    layout = ExpertLayout(gate_up, transposed, activation, alpha, limit)
    if debug_checks():
        _check_ids_now("topk_ids", topk_ids, w_gate_up.shape[0])
        _check_ids_now("kept_experts", kept_experts, w_gate_up.shape[0])
    if _use_cpu(backend, x):
        y = cpu_kernels.moe_experts(x, w_gate_up, w_down, topk_ids, topk_weights, kept_experts, layout, b_gate_up,
                                    b_down)
    elif _use_cuda(backend, x, "moe_experts"):
        from . import kernels

        kept = kept_experts
        if kept is not None and kept.dtype == torch.bool:
            # The kernels take ids; -1 marks "not kept" and is ignored (no host sync).
            ar = torch.arange(kept.numel(), dtype=torch.int32, device=kept.device)
            kept = torch.where(kept, ar, torch.full_like(ar, -1))
        y = kernels.moe_experts(x, w_gate_up, w_down, topk_ids, topk_weights, kept, deterministic, layout,
                                b_gate_up, b_down)
    else:
        y = reference.moe_experts(x, w_gate_up, w_down, topk_ids, topk_weights, kept_experts,
                                  b_gate_up=b_gate_up, b_down=b_down, layout=layout, deterministic=deterministic)
    # A custom op's output may not alias an input.
    return y.clone() if y.data_ptr() == x.data_ptr() else y


@moe_experts.register_fake
def _(x, w_gate_up, w_down, topk_ids, topk_weights, kept_experts, b_gate_up, b_down, deterministic, gate_up,
      transposed, activation, alpha, limit, backend):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------- routing


@torch.library.custom_op("moespec::budget_routing_masked", mutates_args=())
def budget_routing_masked(
    router_logits: torch.Tensor,
    top_k: int,
    budget: Optional[int],
    policy: str,
    renormalize: bool,
    score: str,
    coverage: Optional[float],
    min_budget: Optional[int],
    token_mask: Optional[torch.Tensor],
    candidates: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moespec.reference.budget_routing_masked` as one node (see there for the outputs).

    ``candidates`` is resolved (``"all"`` or ``"union"``) by `moespec.ops`."""
    if _use_cpu(backend, router_logits):
        return cpu_kernels.budget_routing_masked(router_logits, top_k, budget, policy, renormalize, score, coverage,
                                                 min_budget, token_mask, candidates)
    if token_mask is None and _use_cuda(backend, router_logits, "routing_plan"):
        from . import kernels

        T, E = router_logits.shape
        if T > 0 and kernels.plan_supported(E, top_k):
            return kernels.budget_routing_masked(router_logits, top_k, budget, policy, renormalize, score,
                                                 coverage, min_budget, candidates)
    ids, w, kept, union, budgeted = reference.budget_routing_masked(
        router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget, token_mask, candidates)
    return ids, w, kept, union, budgeted


@budget_routing_masked.register_fake
def _(router_logits, top_k, budget, policy, renormalize, score, coverage, min_budget, token_mask, candidates,
      backend):
    T, E = router_logits.shape
    dev = router_logits.device
    return (torch.empty(T, top_k, dtype=torch.int64, device=dev),
            torch.empty(T, top_k, dtype=torch.float32, device=dev),
            torch.empty(E, dtype=torch.bool, device=dev),
            torch.empty((), dtype=torch.int64, device=dev),
            torch.empty((), dtype=torch.bool, device=dev))


@torch.library.custom_op("moespec::score_experts", mutates_args=())
def score_experts(
    router_logits: torch.Tensor,
    mode: str,
    topk_ids: Optional[torch.Tensor],
    topk_weights: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """`moespec.ops.score_experts` as one node: ``[E]`` fp32."""
    if _use_cpu(backend, router_logits):
        out = cpu_kernels.score_experts(router_logits, mode, topk_ids, topk_weights)
    elif _use_cuda(backend, router_logits, "routing_plan"):
        from . import kernels

        out = kernels.score_experts(router_logits, mode, topk_ids, topk_weights)
    else:
        out = reference.score_experts(router_logits, mode, topk_ids, topk_weights)
    return out.clone() if out.data_ptr() == router_logits.data_ptr() else out


@score_experts.register_fake
def _(router_logits, mode, topk_ids, topk_weights, backend):
    return router_logits.new_empty(router_logits.shape[1], dtype=torch.float32)
