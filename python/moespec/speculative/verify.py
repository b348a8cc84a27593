"""Tree verification: one target forward over (root + draft tree), acceptance, KV compaction."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integrations.hf_compat import forward_kwargs
from .tree import DraftTree

__all__ = [
    "Acceptance",
    "accept_greedy",
    "accept_sampling",
    "cache_length",
    "check_cache_supported",
    "compact_cache",
    "crop_cache",
    "tree_forward",
]


# --- KV cache --------------------------------------------------------------------------------
def _layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(
            "moespec.speculative needs a transformers v5 cache (DynamicCache with `.layers[i].keys/.values`); "
            f"got {type(cache).__name__}"
        )
    return layers


def cache_length(cache) -> int:
    """Number of positions held by the cache (0 when empty / None)."""
    return 0 if cache is None else int(cache.get_seq_length())


def compact_cache(cache, keep: torch.Tensor) -> None:
    """Keep only the positions `keep` (in that order) in every layer, by index-gather on dim -2.

    Used after tree verification: `[0:past] + root + accepted path` become contiguous again.
    Layers other than plain `DynamicLayer` keep extra bookkeeping, so they are refused."""
    check_cache_supported(cache)
    for layer in _layers(cache):
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue  # a layer that shares another's KV (or never ran) has nothing to gather
        idx = keep.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)


def check_cache_supported(cache, who: str = "target") -> None:
    """Refuse caches that tree verification cannot handle, with a clear message.

    E.g. sliding-window layers (gpt-oss, Mistral-style) keep only the last window of KV and get
    their own mask from transformers, so one [q, past + q] tree mask cannot serve them."""
    for layer in _layers(cache):
        # Exact type: subclasses (sliding, indexed, quantised) carry state an index-gather would miss.
        if type(layer).__name__ != "DynamicLayer":
            raise NotImplementedError(
                f"moespec.speculative: the {who} model's cache uses {type(layer).__name__} layers; tree verification "
                "and KV compaction support full-attention DynamicCache layers (DynamicLayer) only"
            )


def crop_cache(cache, length: int) -> None:
    """Drop positions beyond `length` (v5 `crop` only takes a non-positive count to remove)."""
    extra = cache_length(cache) - length
    if extra > 0:
        cache.crop(-extra)


# --- forward ---------------------------------------------------------------------------------
def _model_dtype(model) -> torch.dtype:
    try:
        return next(model.parameters()).dtype
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.float32


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@torch.no_grad()
def tree_forward(model, cache, tree: DraftTree, root: int | None) -> torch.Tensor:
    """Run `model` over (root +) the tree nodes on top of `cache`; returns logits [q, V] (>= fp32).

    The mask is the additive float 4-D `[1, 1, q, past + q]` tree mask and positions are
    `past + depth`, so each node sees exactly the prefix, its ancestors and itself."""
    device = _model_device(model)
    past = cache_length(cache)
    include_root = root is not None
    ids = tree.input_ids(root, device=device)
    if tree.is_chain():
        # A chain (or plain decode) is exactly the default causal case: skip building a mask.
        out = model(input_ids=ids, **forward_kwargs(model, cache, use_cache=True))
    else:
        mask = tree.attention_mask(past, _model_dtype(model), device=device, include_root=include_root)
        pos = tree.position_ids(past, device=device, include_root=include_root)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                    **forward_kwargs(model, cache, use_cache=True))
    logits = out.logits[0]
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


# --- acceptance ------------------------------------------------------------------------------
@dataclass
class Acceptance:
    """Outcome of verifying one tree: accepted node ids (root-to-leaf order) and the bonus token."""

    path: list[int]
    tokens: list[int]
    bonus: int

    @property
    def accepted(self) -> int:
        return len(self.path)


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> Acceptance:
    """Longest root path whose every token equals the target argmax at its parent, plus the bonus.

    `logits` rows are (root, node 0, node 1, ...)."""
    argmax = logits.argmax(dim=-1).tolist()
    matched = {-1: True}
    best, best_depth = -1, 0
    for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents)):
        # row of the parent: 0 for the root, p + 1 for node p
        ok = matched.get(p, False) and argmax[p + 1] == tok
        matched[i] = ok
        if ok and tree.depths[i] > best_depth:
            best, best_depth = i, tree.depths[i]
    path = tree.path_to(best)
    return Acceptance(path=path, tokens=[tree.tokens[i] for i in path], bonus=int(argmax[best + 1]))


def target_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of temperature-scaled logits in fp64 (exact enough for rejection ratios)."""
    return torch.softmax(logits.double() / max(float(temperature), 1e-8), dim=-1)


def _sample(p: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=generator).item())


def accept_sampling(tree: DraftTree, logits: torch.Tensor, temperature: float = 1.0,
                    generator: torch.Generator | None = None) -> Acceptance:
    """Multi-branch speculative sampling for deterministic drafts (SpecInfer's rule with point-mass q).

    At the current node, try its distinct children in order: accept child x with probability
    p(x) under the current residual p; on rejection set p(x) = 0 and renormalise. If every child is
    rejected (or there is none), sample the bonus from the residual. The emitted tokens then follow
    the target distribution exactly, whatever the draft."""
    probs = target_probs(logits, temperature)
    children: dict[int, list[int]] = {}
    for i, par in enumerate(tree.parents):
        children.setdefault(par, []).append(i)
    cur, path = -1, []
    while True:
        p = probs[cur + 1].clone()
        accepted_child = None
        seen = set()
        for c in children.get(cur, ()):
            tok = tree.tokens[c]
            if tok in seen:  # a duplicate sibling would be tried twice against a zeroed residual
                continue
            seen.add(tok)
            total = float(p.sum())
            if total <= 0:
                break
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            if u * total < float(p[tok]):
                accepted_child = c
                break
            p[tok] = 0.0
        if accepted_child is None:
            if float(p.sum()) <= 0:  # only possible through rounding; fall back to the full target
                p = probs[cur + 1]
            bonus = _sample(p / p.sum(), generator)
            return Acceptance(path=path, tokens=[tree.tokens[i] for i in path], bonus=bonus)
        path.append(accepted_child)
        cur = accepted_child
