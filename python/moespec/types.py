"""Result and configuration types shared by `moespec.reference`, `moespec.ops` and the kernels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

POLICIES = ("substitute", "truncate")
SCORE_MODES = ("prob", "topk")
GATE_UP_ORDERS = ("gate_up", "up_gate", "interleaved")
ACTIVATIONS = ("silu", "clamped_swiglu")


@dataclass(frozen=True)
class ExpertLayout:
    """How expert weights are stored and which gated activation joins gate and up.

    The default is the transformers v5 fused layout (docs/design.md §2):
    ``w_gate_up [E, 2I, H]`` with rows ``[:I]`` gate and ``[I:]`` up, ``w_down [E, H, I]``,
    activation ``silu(gate) * up``.

    Attributes:
        gate_up: ``"gate_up"`` (gate rows first), ``"up_gate"`` (up rows first, FlashInfer's
            "w31"), or ``"interleaved"`` (gate = even rows/columns, up = odd; gpt-oss).
        transposed: weights are stored input-major: ``w_gate_up [E, H, 2I]``, ``w_down [E, I, H]``
            (gpt-oss). Otherwise output-major like ``nn.Linear``.
        activation: ``"silu"``: ``silu(g) * u``. ``"clamped_swiglu"`` (gpt-oss):
            ``g = min(g, limit)``, ``u = clamp(u, -limit, limit)``, ``g * sigmoid(alpha * g) * (u + 1)``.
        alpha, limit: parameters of ``clamped_swiglu``.
    """

    gate_up: str = "gate_up"
    transposed: bool = False
    activation: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.gate_up not in GATE_UP_ORDERS:
            raise ValueError(f"ExpertLayout.gate_up must be one of {GATE_UP_ORDERS}, got {self.gate_up!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ExpertLayout.activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @classmethod
    def gpt_oss(cls, alpha: float = 1.702, limit: float = 7.0) -> "ExpertLayout":
        """gpt-oss: transposed, interleaved gate/up, clamped SwiGLU (biases are passed as tensors)."""
        return cls(gate_up="interleaved", transposed=True, activation="clamped_swiglu", alpha=alpha, limit=limit)

    def dims(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> tuple[int, int, int]:
        """Return ``(E, H, I)`` read from the weight shapes (no validation)."""
        if self.transposed:
            E, H, two_i = w_gate_up.shape
        else:
            E, two_i, H = w_gate_up.shape
        return E, H, two_i // 2


@dataclass(frozen=True)
class ExpertUnion:
    """The experts used by a set of routed tokens, with per-expert token lists (CSR).

    Attributes:
        experts: ``[U]`` int32, the sorted unique expert ids.
        offsets: ``[U+1]`` int32; pairs of ``experts[u]`` are ``offsets[u]:offsets[u+1]``.
        pair_token: ``[T*k]`` int32, token index of each pair, grouped by expert, then ordered by
            token, then slot.
        pair_slot: ``[T*k]`` int32, top-k slot of each pair.
        pair_position: ``[T, k]`` int32, inverse map: where pair ``(t, slot)`` sits in the CSR.
    """

    experts: torch.Tensor
    offsets: torch.Tensor
    pair_token: torch.Tensor
    pair_slot: torch.Tensor
    pair_position: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.experts.numel())


@dataclass(frozen=True)
class BudgetedRouting:
    """Routing after a verification-time expert budget (docs/design.md §3).

    Attributes:
        topk_ids: ``[T, k]`` int64 expert ids per token (slot order as produced by top-k).
        topk_weights: ``[T, k]`` fp32 routing weights after the model's normalisation; 0 for
            pairs dropped by ``truncate``.
        kept_experts: ``[C']`` int32, sorted ids of the experts allowed to run (C' ≤ budget;
            the whole union when the union fits the budget).
        union_size: number of distinct experts in the unbudgeted top-k routing.
        budgeted: True when the budget removed at least one expert (union > effective budget).
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    kept_experts: torch.Tensor
    union_size: int
    budgeted: bool

    @property
    def kept_size(self) -> int:
        return int(self.kept_experts.numel())


class RoutingMasks(NamedTuple):
    """Capture-safe budgeted routing (`moespec.ops.budget_routing_masked`): fixed shapes, on device.

    Attributes:
        topk_ids: ``[T, k]`` int64 expert ids per token.
        topk_weights: ``[T, k]`` fp32 weights (0 for dropped pairs and, with a token mask and a
            budget, for padding tokens).
        kept_mask: ``[E]`` bool, the experts allowed to run (the union when nothing was dropped).
        union_size: 0-d int64 tensor, distinct experts in the unbudgeted routing of real tokens.
        budgeted: 0-d bool tensor, True when the budget dropped at least one expert.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    kept_mask: torch.Tensor
    union_size: torch.Tensor
    budgeted: torch.Tensor
