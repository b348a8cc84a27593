"""The ``"moespec"`` experts implementation, registered in transformers' experts registry.

transformers v5 dispatches every fused experts module through ``ExpertsInterface`` by the
name in ``config._experts_implementation``; registering ``"moespec"`` there routes the expert
math of patched models to `moespec.ops.moe_experts` (CUDA kernels on GPU, the reference
elsewhere) while module names, state-dict keys and hooks stay as they are.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .architectures import expert_layout, expert_weights

__all__ = ["IMPLEMENTATION_NAME", "register", "moespec_experts_forward", "ExpertsState"]

IMPLEMENTATION_NAME = "moespec"

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExpertsState:
    """Per-experts-module state a patch attaches: the layout and the kept set of the current call.

    The block calls its router and then its experts; the patched router leaves the kept set
    here and the experts forward consumes it, so no block code has to change.
    """

    __slots__ = ("layout", "pending_kept")

    def __init__(self, layout) -> None:
        self.layout = layout
        self.pending_kept: Optional[torch.Tensor] = None

    def take_kept(self) -> Optional[torch.Tensor]:
        """Return and clear the kept set left by the router for this forward."""
        kept, self.pending_kept = self.pending_kept, None
        return kept


def register() -> None:
    """Add ``"moespec"`` to transformers' global experts registry (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION_NAME, moespec_experts_forward)


def moespec_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward for transformers' registry: ``[T, H]`` in, ``[T, H]`` out.

    Runs only the experts the patched router kept for this call (all routed experts when no
    budget applies). Layouts or settings moespec cannot run (another activation, expert
    parallelism, mixed weight dtypes) fall back to the module's own eager loop, with the
    weights of dropped pairs zeroed.
    """
    state = getattr(self, "_moespec_state", None)
    kept = state.take_kept() if state is not None else None
    layout = state.layout if state is not None else expert_layout(self)
    w_gate_up, w_down, b_gate_up, b_down = expert_weights(self)
    runnable = (
        layout is not None
        and not getattr(self, "_is_expert_parallel", False)
        and w_gate_up.dtype in _KERNEL_DTYPES
        and w_down.dtype == w_gate_up.dtype
        and w_gate_up.is_contiguous()
        and w_down.is_contiguous()
    )
    if not runnable:
        return _eager_forward(self, hidden_states, top_k_index, top_k_weights, kept)
    # Autocast can hand fp32 activations to half-precision experts; compute in the weights' dtype.
    x = hidden_states.to(w_gate_up.dtype).contiguous()
    y = ops.moe_experts(x, w_gate_up, w_down, top_k_index, top_k_weights, kept, layout=layout,
                        b_gate_up=b_gate_up, b_down=b_down)
    return y.to(hidden_states.dtype)


def _eager_forward(module, hidden_states, top_k_index, top_k_weights, kept):
    """The experts class's own loop (the function transformers' decorator wraps)."""
    if kept is not None:
        mask = torch.zeros(module.num_experts, dtype=torch.bool, device=top_k_index.device)
        mask[kept.long()] = True
        top_k_weights = top_k_weights * mask[top_k_index.clamp(max=module.num_experts - 1)]
    eager = getattr(type(module).forward, "__wrapped__", type(module).forward)
    return eager(module, hidden_states, top_k_index, top_k_weights)
