"""The ``"moespec"`` experts implementation, registered in transformers' experts registry.

transformers v5 dispatches every fused experts module through ``ExpertsInterface`` by the
name in ``config._experts_implementation``; registering ``"moespec"`` there routes the expert
math of patched models' budgeted calls to `moespec.ops.moe_experts` (on the patch's backend:
by default the CUDA kernels on GPU, the reference elsewhere) while module names, state-dict
keys and hooks stay as they are.
"""
from __future__ import annotations


import torch

from .. import ops
from .architectures import expert_layout, expert_weights

__all__ = ["IMPLEMENTATION_NAME", "register", "moespec_experts_forward", "ExpertsState"]

IMPLEMENTATION_NAME = "moespec"

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExpertsState:
    """Per-experts-module state a patch attaches.

    Attributes:
        layout: the weight layout read at patch time (None: moespec cannot run it).
        original: the experts implementation the model used before the patch (``"eager"``,
            ``"grouped_mm"``, ...); unbudgeted calls run it, so that they stay bitwise exact.
        budgeted: set by the router hook for the current call: run moespec's experts. Dropped
            pairs reach them with weight 0 (`budget_router_output`), so no kept set is needed:
            zero-weight pairs are never computed and their weights never read.
        backend: the `moespec.ops` backend moespec's experts run on (set by the router hook
            from the call's settings).
        always: run moespec's experts for unbudgeted calls too (``patch(..., experts="moespec")``).
    """

    __slots__ = ("layout", "original", "budgeted", "backend", "always")

    def __init__(self, layout, original: str = "eager", backend: str = "auto", always: bool = False) -> None:
        self.layout = layout
        self.original = original
        self.budgeted = False
        self.backend = backend
        self.always = always


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

    Runs only the experts of pairs with a non-zero weight: the patched router gives dropped
    pairs weight 0. Layouts or settings moespec cannot run (another activation, expert
    parallelism, mixed weight dtypes) fall back to the module's own eager loop.
    """
    state = getattr(self, "_moespec_state", None)
    if state is None or not (state.budgeted or state.always):
        return _original_forward(self, state, hidden_states, top_k_index, top_k_weights)
    layout = state.layout
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
        if not state.budgeted:  # experts="moespec" on a layer moespec cannot run: the model's own
            return _original_forward(self, state, hidden_states, top_k_index, top_k_weights)
        return _eager_forward(self, hidden_states, top_k_index, top_k_weights)
    # Autocast can hand fp32 activations to half-precision experts; compute in the weights' dtype.
    x = hidden_states.to(w_gate_up.dtype).contiguous()
    y = ops.moe_experts(x, w_gate_up, w_down, top_k_index, top_k_weights, None, layout=layout,
                        b_gate_up=b_gate_up, b_down=b_down, backend=state.backend)
    return y.to(hidden_states.dtype)


def _original_forward(module, state, hidden_states, top_k_index, top_k_weights):
    """The implementation the model ran before the patch (transformers' registry or eager)."""
    name = state.original if state is not None else "eager"
    if name in (None, "eager", IMPLEMENTATION_NAME):
        return _eager_forward(module, hidden_states, top_k_index, top_k_weights)
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    eager = getattr(type(module).forward, "__wrapped__", type(module).forward)
    return ALL_EXPERTS_FUNCTIONS.get_interface(name, eager)(module, hidden_states, top_k_index, top_k_weights)


def _eager_forward(module, hidden_states, top_k_index, top_k_weights):
    """The experts class's own loop (the function transformers' decorator wraps)."""
    eager = getattr(type(module).forward, "__wrapped__", type(module).forward)
    return eager(module, hidden_states, top_k_index, top_k_weights)
