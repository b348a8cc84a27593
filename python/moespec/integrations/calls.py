"""Reading the shape of a transformers forward call: tokens, new tokens per sequence, cache length.

Arguments are recognised by what they are, not by their names (transformers 5.24 renamed
``past_key_values`` to ``cache`` and stopped passing ``cache_position``):

- the KV cache is the argument that is a transformers ``Cache`` (or has ``get_seq_length``),
  whatever its keyword;
- without a cache, the past length is the first position of each row of ``position_ids``,
  then the first entry of ``cache_position`` where an older version still passes it;
- padding: a 2-D ``attention_mask`` (``[B, past + new]``, 0 = padding) gives a per-token mask
  over the call's ``B * new`` tokens, which the router hooks use to leave padding out of the
  union and the scores.

Automatic mode budgets a call only inside a verification scope (`moespec.verification`, or
transformers' assisted / prompt-lookup generation) and only when it is verification-shaped:
more than one new token per sequence on top of a non-empty KV cache.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

__all__ = ["CallShape", "call_shape", "positional_names"]


@dataclass(frozen=True)
class CallShape:
    """Shape of one model forward.

    Attributes:
        batch: sequences in the call.
        new_tokens: new tokens per sequence (the query length, padding included).
        past_length: tokens already in the KV cache (0 without a cache; the longest row when
            read from ``position_ids``).
        token_mask: ``[batch * new_tokens]`` bool (False = padding) from a 2-D attention mask,
            or None when the call has none.
    """

    batch: int
    new_tokens: int
    past_length: int
    token_mask: Optional[torch.Tensor] = None

    @property
    def tokens(self) -> int:
        """Tokens routed through each MoE layer (padding included)."""
        return self.batch * self.new_tokens

    @property
    def is_verification(self) -> bool:
        """More than one new token per sequence with a non-empty cache."""
        return self.new_tokens > 1 and self.past_length > 0


def positional_names(fn) -> tuple[str, ...]:
    """Names of ``fn``'s positional parameters, in order (to place positional arguments)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in sig.parameters.values() if p.kind in kinds)


def _is_cache(value: Any) -> bool:
    if value is None or isinstance(value, (torch.Tensor, int, float, bool, str)):
        return False
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is what calls us
        Cache = ()
    return isinstance(value, Cache) or callable(getattr(value, "get_seq_length", None))


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def call_shape(names: Sequence[str], args: tuple, kwargs: dict) -> CallShape:
    """Shape of a transformers model forward called with ``(*args, **kwargs)``.

    Args:
        names: the forward's positional parameter names (`positional_names`), to place
            positional arguments.

    Data-dependent reads (``position_ids`` / ``cache_position`` values) are skipped while
    torch.compile or torch.export trace; the cache object's length is a shape and is read.
    """
    bound = dict(zip(names, args))
    bound.update(kwargs)
    extra = bound.get("kwargs")
    if isinstance(extra, dict):  # a **kwargs catch-all collects keyword-only model inputs
        bound = {**extra, **bound}
    batch = new = 0
    ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
    if isinstance(ids, torch.Tensor):
        batch, new = (1, ids.shape[0]) if ids.dim() == 1 else (ids.shape[0], ids.shape[-1])
    elif isinstance(embeds, torch.Tensor):
        batch, new = (1, embeds.shape[0]) if embeds.dim() == 2 else (embeds.shape[0], embeds.shape[1])
    else:  # unnamed: the first integer tensor is the token ids, a 3-D float tensor the embeddings
        for v in args:
            if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() in (1, 2):
                batch, new = (1, v.shape[0]) if v.dim() == 1 else (v.shape[0], v.shape[-1])
                break
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 3:
                batch, new = v.shape[0], v.shape[1]
                break
    past: Optional[int] = None
    for v in bound.values():
        if _is_cache(v):
            past = int(v.get_seq_length())
            break
    if past is None or past == 0:
        # No cache object (or an empty one that a caller may not use): fall back to positions.
        pos_past = None
        if not _tracing():
            pos = bound.get("position_ids")
            if isinstance(pos, torch.Tensor) and pos.numel():
                pos_past = _past_from_positions(pos, bound.get("attention_mask"), batch, new)
            else:
                cpos = bound.get("cache_position")
                if isinstance(cpos, torch.Tensor) and cpos.numel():
                    pos_past = int(cpos.reshape(-1)[0])
        past = max(past or 0, pos_past or 0)
    return CallShape(int(batch), int(new), int(past), _token_mask(bound.get("attention_mask"), batch, new))


def _past_from_positions(pos: torch.Tensor, mask: Any, batch: int, new: int) -> int:
    """Past length from ``position_ids``: the position of each row's first real token, longest row.

    transformers gives padding positions a dummy value (1), so padding columns are skipped.
    """
    rows = pos.reshape(-1, pos.shape[-1]).long()
    valid = _token_mask(mask, batch, new)
    if valid is not None and rows.shape == (batch, new):
        big = torch.iinfo(torch.long).max
        first = torch.where(valid.reshape(batch, new), rows, torch.full_like(rows, big)).min(dim=1).values
        first = first[first != big]
        return int(first.max()) if first.numel() else 0
    return int(rows[:, 0].max())


def _token_mask(mask: Any, batch: int, new: int) -> Optional[torch.Tensor]:
    """``[batch * new]`` bool from a 2-D ``[batch, >= new]`` attention mask (last ``new`` columns)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or new == 0:
        return None
    if mask.shape[0] != batch or mask.shape[1] < new:
        return None
    return (mask[:, mask.shape[1] - new:] != 0).reshape(-1)
