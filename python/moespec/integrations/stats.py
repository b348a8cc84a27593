"""Routing statistics recorded by a patched model, per MoE layer and per forward call.

Plain data (no transformers); the speculative engine and the benchmarks read them, and
``to_dict()`` gives JSON-serialisable records. Values computed on the device stay there until
read, so recording never synchronises a patched forward.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["LayerStats", "CallStats", "RoutingStats"]


def _as_int(v) -> int:
    return int(v.item()) if isinstance(v, torch.Tensor) else int(v)


class LayerStats:
    """What one MoE layer did in one forward call.

    A patched forward records device tensors and never synchronises; each value is read back
    (and cached) the first time it is asked for.

    Attributes:
        layer: MoE layer ordinal (0-based, counting MoE layers only).
        tokens: tokens routed by the layer in this call (batch x new tokens, padding excluded
            when the call had a 2-D attention mask).
        union_size: distinct experts in the (real) tokens' unbudgeted top-k routing.
        kept_size: experts in the kept set (``union_size`` when nothing was dropped).
        kept_experts: sorted ids of those experts.
        read_size: kept experts that at least one (token, slot) pair was routed to: the experts
            whose weights were read. Below ``kept_size`` when a kept expert got no token (a
            non-union candidate that no re-routed token picked, or any under ``truncate``).
        expert_bytes: ``read_size`` x bytes of one routed expert's weights (and biases) in their
            dtype; shared experts, which never count against a budget, are not included.
        dropped_mass: share of the call's unbudgeted top-k routing weight that sat on experts
            outside the kept set (0.0 when nothing was dropped).
        budget: the cap in effect for this layer in this call (None: no cap; with
            ``coverage`` and no cap, ``kept_size`` says how many were kept).
        budgeted: the budget (or coverage) was applied to this layer in this call.
    """

    def __init__(self, layer: int, tokens, union_size, kept_experts, bytes_per_expert: int,
                 budget: Optional[int] = None, budgeted: bool = False, read_experts=None,
                 dropped_mass=0.0) -> None:
        """``tokens``, ``union_size`` and ``dropped_mass``: numbers or 0-d tensors; ``kept_experts`` and
        ``read_experts`` (default: the kept set): ids or an ``[E]`` bool mask."""
        self.layer = layer
        self.budget = budget
        self.budgeted = budgeted
        self.bytes_per_expert = int(bytes_per_expert)
        self._tokens = tokens
        self._union_size = union_size
        self._kept = kept_experts
        self._read = read_experts
        self._dropped_mass = dropped_mass

    @property
    def tokens(self) -> int:
        self._tokens = _as_int(self._tokens)
        return self._tokens

    @property
    def union_size(self) -> int:
        self._union_size = _as_int(self._union_size)
        return self._union_size

    @property
    def kept_experts(self) -> tuple[int, ...]:
        kept = self._kept
        if isinstance(kept, torch.Tensor):
            ids = kept.nonzero().reshape(-1) if kept.dtype == torch.bool else kept
            kept = tuple(int(e) for e in ids.tolist())
            self._kept = kept
        return tuple(kept)

    @property
    def kept_size(self) -> int:
        return len(self.kept_experts)

    @property
    def read_size(self) -> int:
        if self._read is None:
            return self.kept_size
        if isinstance(self._read, torch.Tensor):
            self._read = _as_int(self._read.sum()) if self._read.dtype == torch.bool else self._read.numel()
        return int(self._read)

    @property
    def dropped_mass(self) -> float:
        if isinstance(self._dropped_mass, torch.Tensor):
            self._dropped_mass = float(self._dropped_mass.item())
        return float(self._dropped_mass)

    @property
    def expert_bytes(self) -> int:
        return self.read_size * self.bytes_per_expert

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
            "read_size": self.read_size,
            "expert_bytes": self.expert_bytes,
            "dropped_mass": round(self.dropped_mass, 6),
            "budget": self.budget,
            "budgeted": self.budgeted,
        }

    def __repr__(self) -> str:
        return (f"LayerStats(layer={self.layer}, tokens={self.tokens}, union_size={self.union_size}, "
                f"kept_size={self.kept_size}, budget={self.budget}, budgeted={self.budgeted})")


class CallStats:
    """One top-level model forward that reached at least one MoE layer.

    Attributes:
        layers: one `LayerStats` per MoE layer reached, in execution order.
        tokens: tokens in the call (batch x new tokens, padding excluded when the call had a
            2-D attention mask; read from the device when first asked for).
        budgeted: a budget (or coverage) applied to this call.
        past_length: KV-cache length before the call (0 for prefill or no cache).
    """

    def __init__(self, layers: Optional[list] = None, tokens=0, budgeted: bool = False, past_length: int = 0) -> None:
        self.layers: list[LayerStats] = [] if layers is None else layers
        self._tokens = tokens
        self.budgeted = budgeted
        self.past_length = past_length

    @property
    def tokens(self) -> int:
        self._tokens = _as_int(self._tokens)
        return self._tokens

    def __repr__(self) -> str:
        return (f"CallStats(tokens={self.tokens}, budgeted={self.budgeted}, past_length={self.past_length}, "
                f"layers={len(self.layers)})")

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

    ``enabled`` (default True) can be turned off to skip the bookkeeping (a few small device
    ops per layer; nothing is read back until a value is asked for). Forwards traced by
    torch.compile / torch.export are not recorded.
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
