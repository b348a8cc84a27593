"""Comparison rules shared by the kernel tests (a kernel against `moespec.reference`).

Routing decisions must match bitwise; the only tolerated differences are ties, because the
kernel breaks them towards the lower id and torch.topk's order among equal values is unspecified.
"""
from __future__ import annotations


def same_pick(probs_row, a, b, rel=1e-6) -> bool:
    """Two expert ids are an acceptable pair of picks when their probabilities tie (1e-6 relative)."""
    pa, pb = float(probs_row[a]), float(probs_row[b])
    return abs(pa - pb) <= rel * max(abs(pa), abs(pb), 1e-30)


def kept_near_tie(scores, kept_k, kept_r, rel=1e-5) -> bool:
    """True when two different kept sets differ only by experts whose scores tie with the boundary
    (the C-th best score); False when they are equal."""
    diff = set(kept_k.tolist()) ^ set(kept_r.tolist())
    if not diff:
        return False
    edge = min(float(scores[e]) for e in kept_r.tolist()) if kept_r.numel() else 0.0
    return all(abs(float(scores[e]) - edge) <= rel * abs(edge) + 1e-12 for e in diff)
