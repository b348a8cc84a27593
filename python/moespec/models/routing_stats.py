"""Routing skew of a softmax top-k MoE on real text: per-layer expert-load Gini and union growth.

Union growth is measured over windows of T consecutive tokens (what a T-token draft chain
verifies) and compared with i.i.d. uniform routing, where the expected union is
``E * (1 - (1 - k/E) ** T)``.
"""
from __future__ import annotations

import torch


def gini(counts: torch.Tensor) -> float:
    """Gini coefficient of non-negative loads (0: perfectly even, -> 1: all on one expert)."""
    x = torch.sort(counts.double().flatten()).values
    n = x.numel()
    if n == 0 or float(x.sum()) == 0.0:
        return 0.0
    idx = torch.arange(1, n + 1, dtype=torch.float64)
    return float((2 * (idx * x).sum() / (n * x.sum())) - (n + 1) / n)


def iid_union(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts for ``tokens`` tokens routed i.i.d. uniformly."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


@torch.no_grad()
def router_topk_per_layer(model, ids: torch.Tensor, seq_len: int = 256) -> list[torch.Tensor]:
    """Top-k expert ids ``[N, k]`` per MoE layer for the token stream ``ids`` (windows of ``seq_len``)."""
    k = model.config.num_experts_per_tok
    per_layer: list[list[torch.Tensor]] = []
    n = (ids.numel() // seq_len) * seq_len
    for s in range(0, n, seq_len):
        out = model(input_ids=ids[s:s + seq_len].long().unsqueeze(0), output_router_logits=True)
        logits = out.router_logits
        if not per_layer:
            per_layer = [[] for _ in logits]
        for layer, z in enumerate(logits):
            per_layer[layer].append(torch.topk(z.float(), k, dim=-1).indices)
    return [torch.cat(chunks) for chunks in per_layer]


def routing_skew(model, ids: torch.Tensor, windows=(1, 2, 4, 8, 16, 32), seq_len: int = 256) -> dict:
    """Per-layer Gini of expert load and mean union size per window length, vs i.i.d. routing."""
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    topk = router_topk_per_layer(model, ids, seq_len)
    layers = []
    for layer, t in enumerate(topk):
        load = torch.bincount(t.reshape(-1), minlength=E)
        unions = {}
        for T in windows:
            m = (t.shape[0] // T) * T
            groups = t[:m].reshape(-1, T * k)
            unions[T] = round(float(torch.tensor([g.unique().numel() for g in groups], dtype=torch.float64).mean()), 2)
        layers.append({"layer": layer, "gini": round(gini(load), 3), "union": unions})
    return {
        "num_experts": E, "top_k": k, "tokens": int(topk[0].shape[0]) if topk else 0,
        "layers": layers,
        "iid_union": {T: round(iid_union(E, k, T), 2) for T in windows},
    }
