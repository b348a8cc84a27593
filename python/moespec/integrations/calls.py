"""Reading the shape of a transformers forward call: tokens, new tokens per sequence, cache length.

Automatic mode budgets only verification-shaped calls (DESIGN §3): more than one new token
per sequence on top of a non-empty KV cache. Prefill (empty cache) and plain one-token
decode are never budgeted automatically.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["CallShape", "call_shape"]


@dataclass(frozen=True)
class CallShape:
    """Shape of one model forward.

    Attributes:
        batch: sequences in the call.
        new_tokens: new tokens per sequence (the query length).
        past_length: tokens already in the KV cache (0 without a cache).
    """

    batch: int
    new_tokens: int
    past_length: int

    @property
    def tokens(self) -> int:
        """Tokens routed through each MoE layer."""
        return self.batch * self.new_tokens

    @property
    def is_verification(self) -> bool:
        """More than one new token per sequence with a non-empty cache."""
        return self.new_tokens > 1 and self.past_length > 0


def _cache_length(cache: Any) -> Optional[int]:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple-of-tuples cache: [layer][key/value] -> [B, heads, past, dim]
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return None


def call_shape(signature: Optional[inspect.Signature], args: tuple, kwargs: dict) -> CallShape:
    """Shape of a transformers model forward called with ``(*args, **kwargs)``.

    Args:
        signature: the forward's signature (to place positional arguments), or None.
    """
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments if signature is not None else dict(kwargs)
    except TypeError:
        bound = dict(kwargs)
    extra = bound.get("kwargs")
    if isinstance(extra, dict):  # a **kwargs catch-all collects keyword-only model inputs
        bound = {**extra, **bound}
    batch = new = 0
    ids = bound.get("input_ids")
    embeds = bound.get("inputs_embeds")
    if ids is not None and hasattr(ids, "shape"):
        batch, new = (1, ids.shape[0]) if ids.dim() == 1 else (ids.shape[0], ids.shape[-1])
    elif embeds is not None and hasattr(embeds, "shape"):
        batch, new = (1, embeds.shape[0]) if embeds.dim() == 2 else (embeds.shape[0], embeds.shape[1])
    past = _cache_length(bound.get("past_key_values"))
    if past is None or (past == 0 and bound.get("past_key_values") is None):
        pos = bound.get("cache_position")
        past = int(pos.reshape(-1)[0]) if pos is not None and hasattr(pos, "numel") and pos.numel() else 0
    return CallShape(int(batch), int(new), int(past))
