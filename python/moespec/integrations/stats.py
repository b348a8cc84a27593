"""Routing statistics recorded by a patched model, per MoE layer and per forward call.

Plain data (no transformers); the speculative engine and the benchmarks read them, and
``to_dict()`` gives JSON-serialisable records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["LayerStats", "CallStats", "RoutingStats"]


@dataclass
class LayerStats:
    """What one MoE layer did in one forward call.

    Attributes:
        layer: MoE layer ordinal (0-based, counting MoE layers only).
        tokens: tokens routed by the layer in this call (batch x new tokens).
        union_size: distinct experts in the tokens' unbudgeted top-k routing.
        kept_size: experts whose weights were read (``union_size`` when nothing was dropped).
        kept_experts: sorted ids of those experts.
        expert_bytes: ``kept_size`` x bytes of one routed expert's weights (and biases) in their
            dtype; shared experts, which never count against a budget, are not included.
        budget: the cap in effect for this layer in this call (None: no cap; with
            ``coverage`` and no cap, ``kept_size`` says how many were kept).
        budgeted: the budget (or coverage) was applied to this layer in this call.
    """

    layer: int
    tokens: int
    union_size: int
    kept_size: int
    kept_experts: tuple[int, ...]
    expert_bytes: int
    budget: Optional[int] = None
    budgeted: bool = False

    @property
    def dropped(self) -> int:
        """Experts of the union that were not run (0 when the union fit the budget)."""
        return self.union_size - self.kept_size

    def to_dict(self) -> dict:
        """JSON-serialisable record."""
        return {
            "layer": self.layer,
            "tokens": self.tokens,
            "union_size": self.union_size,
            "kept_size": self.kept_size,
            "kept_experts": list(self.kept_experts),
            "expert_bytes": self.expert_bytes,
            "budget": self.budget,
            "budgeted": self.budgeted,
        }


@dataclass
class CallStats:
    """One top-level model forward that reached at least one MoE layer.

    Attributes:
        layers: one `LayerStats` per MoE layer reached, in execution order.
        tokens: tokens in the call (batch x new tokens).
        budgeted: a budget (or coverage) applied to this call.
        past_length: KV-cache length before the call (0 for prefill or no cache).
    """

    layers: list[LayerStats] = field(default_factory=list)
    tokens: int = 0
    budgeted: bool = False
    past_length: int = 0

    @property
    def expert_bytes(self) -> int:
        """Bytes of routed-expert weights read by the call, summed over layers."""
        return sum(s.expert_bytes for s in self.layers)

    @property
    def union_size(self) -> int:
        """Sum over layers of the unbudgeted union size."""
        return sum(s.union_size for s in self.layers)

    @property
    def kept_size(self) -> int:
        """Sum over layers of the experts actually run."""
        return sum(s.kept_size for s in self.layers)

    def to_dict(self) -> dict:
        """JSON-serialisable record (layers included)."""
        return {
            "tokens": self.tokens,
            "budgeted": self.budgeted,
            "past_length": self.past_length,
            "expert_bytes": self.expert_bytes,
            "layers": [s.to_dict() for s in self.layers],
        }


class RoutingStats:
    """Per-call routing statistics of a patched model.

    ``enabled`` (default True) can be turned off to skip the bookkeeping, which needs one
    host-device synchronisation per layer on GPU to count the union.
    """

    def __init__(self) -> None:
        self.calls: list[CallStats] = []
        self.enabled: bool = True

    def reset(self) -> None:
        """Forget all recorded calls."""
        self.calls.clear()

    def last(self) -> Optional[CallStats]:
        """The most recent call, or None."""
        return self.calls[-1] if self.calls else None

    def to_dict(self) -> dict:
        """JSON-serialisable record of every call."""
        return {"calls": [c.to_dict() for c in self.calls]}

    def __len__(self) -> int:
        return len(self.calls)

    def __repr__(self) -> str:
        return f"RoutingStats(calls={len(self.calls)}, enabled={self.enabled})"
