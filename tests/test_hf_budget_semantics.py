"""Budgeted MoE layers of patched transformers models against an independent implementation.

For every supported architecture and both policies, a budgeted forward is run on a tiny
random model; each MoE block's output is compared with docs/design.md §3 written out below token by
token in float64 (scores, top-C kept set, re-routing, the model's own normalisation, the
expert MLPs and shared experts). Nothing here calls moespec.reference.
"""
import math

import pytest
import torch

import moespec
from moespec.integrations.tiny import TINY_ARCHITECTURES, tiny_model

pytest.importorskip("transformers")

SOFTMAX_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


# ----------------------------------------------------------------------------- independent semantics


def _topk_desc(values, candidates, k):
    """The k candidates with the largest values, ties to the lower id."""
    return sorted(candidates, key=lambda e: (-values[e], e))[:k]


def _summed_weights(E, routes):
    """score "topk": per expert, the sum of the model's unbudgeted top-k weights."""
    score = [0.0] * E
    for route in routes:
        for e, w in route:
            score[e] += w
    return score


def _kept_set(score, union, cap, coverage=None, min_budget=None, candidates="union"):
    """The kept set among the candidates (every expert or the union); the union itself when it fits."""
    pool = range(len(score)) if candidates == "all" else union
    order = sorted(pool, key=lambda e: (-score[e], e))
    n = len(order) if cap is None else cap
    if coverage is not None:
        total = sum(score[e] for e in order)
        acc, m = 0.0, len(order)
        for i, e in enumerate(order):
            acc += score[e]
            if acc >= coverage * total:
                m = i + 1
                break
        n = max(min_budget, min(m, n))
    return set(order[:n]) if n < len(union) else set(union)


def _candidates(policy, candidates):
    return candidates or "union"  # the default of both policies (moespec.reference.default_candidates)


def _softmax_router(block, x, cap, policy, score_mode, renorm, coverage=None, min_budget=None, candidates=None):
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE: per-token ids and weights under the budget."""
    k = block.gate.top_k
    E = block.gate.num_experts
    p = torch.softmax(x @ block.gate.weight.double().T, dim=-1)
    T = x.shape[0]
    orig = [_topk_desc(p[t].tolist(), range(E), k) for t in range(T)]

    def weights_of(t, ids, alive):
        w = [float(p[t, e]) if a else 0.0 for e, a in zip(ids, alive)]
        s = sum(w)
        return [v / s for v in w] if renorm and s > 0 else w

    union = sorted({e for ids in orig for e in ids})
    if score_mode == "prob":
        score = p.sum(0).tolist()
    else:
        score = _summed_weights(E, [list(zip(ids, weights_of(t, ids, [True] * k))) for t, ids in enumerate(orig)])
    kept = _kept_set(score, union, cap, coverage, k if min_budget is None else min_budget,
                     _candidates(policy, candidates))
    routes = []
    for t in range(T):
        if kept == set(union):
            ids, alive = orig[t], [True] * k
        elif policy == "substitute":
            ids = _topk_desc(p[t].tolist(), sorted(kept), k)
            alive = [True] * k
        else:
            ids, alive = orig[t], [e in kept for e in orig[t]]
        routes.append(list(zip(ids, weights_of(t, ids, alive))))
    return routes, kept


def _deepseek_router(block, x, cap, policy, score_mode="prob", candidates=None):
    """DeepSeek-V3: sigmoid + correction bias, group-limited top-k, scaling (see routing.py)."""
    g = block.gate
    k, E, G, TG = g.top_k, g.num_experts, g.num_group, g.topk_group
    per = E // G
    s = torch.sigmoid(x @ g.weight.double().T)
    c = s + g.e_score_correction_bias.double()
    T = x.shape[0]

    def group_limited(t, allowed):
        vals = c[t].tolist()
        gscore = []
        for grp in range(G):
            members = sorted((vals[e] for e in range(grp * per, (grp + 1) * per) if e in allowed), reverse=True)
            gscore.append(sum(members[:2]) if members else float("-inf"))
        chosen = sorted(range(G), key=lambda i: (-gscore[i], i))[:TG]
        inside = [e for e in allowed if e // per in chosen]
        outside = [e for e in allowed if e // per not in chosen]
        ids = _topk_desc(vals, inside, k)
        return ids + _topk_desc(vals, outside, k - len(ids))

    def weights_of(t, ids, alive):
        w = [float(s[t, e]) if a else 0.0 for e, a in zip(ids, alive)]
        if g.norm_topk_prob:
            d = sum(w) + 1e-20
            w = [v / d for v in w]
        return [v * g.routed_scaling_factor for v in w]

    orig = [group_limited(t, set(range(E))) for t in range(T)]
    union = sorted({e for ids in orig for e in ids})
    if score_mode == "prob":
        share = c.clamp(min=0)
        score = (share / share.sum(-1, keepdim=True)).sum(0).tolist()
    else:
        score = _summed_weights(E, [list(zip(ids, weights_of(t, ids, [True] * k))) for t, ids in enumerate(orig)])
    kept = _kept_set(score, union, cap, candidates=_candidates(policy, candidates))
    routes = []
    for t in range(T):
        if kept == set(union):
            ids, alive = orig[t], [True] * k
        elif policy == "substitute":
            ids, alive = group_limited(t, kept), [True] * k
        else:
            ids, alive = orig[t], [e in kept for e in orig[t]]
        routes.append(list(zip(ids, weights_of(t, ids, alive))))
    return routes, kept


def _gpt_oss_router(block, x, cap, policy, score_mode="prob", candidates=None):
    """gpt-oss: top-k on the logits, softmax over the chosen logits."""
    r = block.router
    k, E = r.top_k, r.num_experts
    z = x @ r.weight.double().T + r.bias.double()
    p = torch.softmax(z, dim=-1)
    T = x.shape[0]
    orig = [_topk_desc(z[t].tolist(), range(E), k) for t in range(T)]
    union = sorted({e for ids in orig for e in ids})

    def softmax_of_chosen(t, ids, alive):
        live = [float(z[t, e]) for e, a in zip(ids, alive) if a]
        m = max(live) if live else 0.0
        den = sum(math.exp(v - m) for v in live)
        return [math.exp(float(z[t, e]) - m) / den if a else 0.0 for e, a in zip(ids, alive)]

    if score_mode == "prob":
        score = p.sum(0).tolist()
    else:
        score = _summed_weights(E, [list(zip(ids, softmax_of_chosen(t, ids, [True] * k)))
                                    for t, ids in enumerate(orig)])
    kept = _kept_set(score, union, cap, candidates=_candidates(policy, candidates))
    routes = []
    for t in range(T):
        if kept == set(union):
            ids, alive = orig[t], [True] * k
        elif policy == "substitute":
            ids, alive = _topk_desc(z[t].tolist(), sorted(kept), k), [True] * k
        else:
            ids, alive = orig[t], [e in kept for e in orig[t]]
        routes.append(list(zip(ids, softmax_of_chosen(t, ids, alive))))
    return routes, kept


def _expert_silu(experts, e, xt):
    W = experts.gate_up_proj[e].double()
    I = W.shape[0] // 2
    gate, up = W[:I] @ xt, W[I:] @ xt
    h = gate * torch.sigmoid(gate) * up
    return experts.down_proj[e].double() @ h


def _expert_gpt_oss(experts, e, xt):
    gu = xt @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()
    gate, up = gu[0::2].clamp(max=experts.limit), gu[1::2].clamp(-experts.limit, experts.limit)
    h = (up + 1) * gate * torch.sigmoid(experts.alpha * gate)
    return h @ experts.down_proj[e].double() + experts.down_proj_bias[e].double()


@torch.no_grad()
def expected_block(arch, block, x, cap, policy, score_mode="prob", coverage=None, min_budget=None, candidates=None):
    """The block's output for tokens ``x [T, H]`` under the budget, and the kept set."""
    xd = x.double()
    if arch in SOFTMAX_ARCHS:
        renorm = arch == "mixtral" or bool(block.gate.norm_topk_prob)
        routes, kept = _softmax_router(block, xd, cap, policy, score_mode, renorm, coverage, min_budget, candidates)
        expert = _expert_silu
    elif arch == "deepseek_v3":
        routes, kept = _deepseek_router(block, xd, cap, policy, score_mode, candidates)
        expert = _expert_silu
    else:
        routes, kept = _gpt_oss_router(block, xd, cap, policy, score_mode, candidates)
        expert = _expert_gpt_oss
    out = torch.zeros_like(xd)
    for t, route in enumerate(routes):
        for e, w in route:
            if w != 0.0:
                out[t] += w * expert(block.experts, e, xd[t])
    if arch == "qwen2_moe":
        out += torch.sigmoid(block.shared_expert_gate(x)).double() * block.shared_expert(x).double()
    elif arch == "deepseek_v3":
        out += block.shared_experts(x).double()
    return out, kept


# ----------------------------------------------------------------------------- harness


def run_budgeted(model, tokens, **budget_kwargs):
    """Run one budgeted forward; return per MoE block ``(block, input [T,H], output [T,H])`` and stats."""
    handle = moespec.patch(model)
    captured = []

    def hook(module, args, output):
        y = output[0] if isinstance(output, tuple) else output
        captured.append((module, args[0].reshape(-1, args[0].shape[-1]).detach(), y.reshape(-1, y.shape[-1]).detach()))

    hooks = [block.register_forward_hook(hook)
             for block in (model.get_submodule(info.name) for info in handle.layers)]
    try:
        with torch.no_grad(), moespec.expert_budget(model, **budget_kwargs):
            model(tokens)
        return captured, handle.stats.last()
    finally:
        for h in hooks:
            h.remove()
        handle.unpatch()


def _tokens(seed, batch=2, length=6):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("candidates", [None, "all", "union"])
@pytest.mark.parametrize("extra", [0, 2], ids=["C=k", "C=k+2"])
@pytest.mark.parametrize("policy", ["substitute", "truncate"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_budgeted_layers_match_independent_semantics(arch, policy, extra, candidates):
    model = tiny_model(arch, seed=3)
    # C = k drops the most experts; C > k leaves substitute a choice within the kept set.
    cap = model.config.num_experts_per_tok + extra
    captured, stats = run_budgeted(model, _tokens(11), budget=cap, policy=policy, candidates=candidates)
    assert len(captured) == len(stats.layers) >= 2
    assert stats.budgeted
    dropped = 0
    for (block, x, y), layer in zip(captured, stats.layers):
        expect, kept = expected_block(arch, block, x, cap, policy, candidates=candidates)
        torch.testing.assert_close(y.double(), expect, rtol=1e-4, atol=1e-5)
        assert set(layer.kept_experts) == kept
        assert layer.kept_size <= cap and layer.budget == cap
        dropped += layer.union_size - layer.kept_size
    assert dropped > 0, "the test must exercise an actual budget"


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_topk_score_mode_matches_independent_semantics(arch):
    model = tiny_model(arch, seed=4)
    cap = model.config.num_experts_per_tok + 1
    captured, stats = run_budgeted(model, _tokens(12), budget=cap, policy="substitute", score="topk")
    for (block, x, y), layer in zip(captured, stats.layers):
        expect, kept = expected_block(arch, block, x, cap, "substitute", score_mode="topk")
        torch.testing.assert_close(y.double(), expect, rtol=1e-4, atol=1e-5)
        assert set(layer.kept_experts) == kept


@pytest.mark.parametrize("candidates", ["all", "union"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_coverage_matches_independent_semantics(arch, candidates):
    model = tiny_model(arch, seed=4)
    k = model.config.num_experts_per_tok
    captured, stats = run_budgeted(model, _tokens(13), budget=12, coverage=0.6, min_budget=k + 1,
                                   candidates=candidates)
    for (block, x, y), layer in zip(captured, stats.layers):
        expect, kept = expected_block(arch, block, x, 12, "substitute", coverage=0.6, min_budget=k + 1,
                                      candidates=candidates)
        torch.testing.assert_close(y.double(), expect, rtol=1e-4, atol=1e-5)
        assert set(layer.kept_experts) == kept
        assert k + 1 <= layer.kept_size <= 12


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_per_layer_budgets(arch):
    model = tiny_model(arch, seed=5)
    k = model.config.num_experts_per_tok
    for budget, caps in (([None, k], [None, k]), (lambda i: k + i, [k, k + 1])):
        captured, stats = run_budgeted(model, _tokens(14), budget=budget, policy="truncate")
        assert [s.budget for s in stats.layers] == caps
        for (block, x, y), layer, cap in zip(captured, stats.layers, caps):
            expect, kept = expected_block(arch, block, x, cap, "truncate")
            torch.testing.assert_close(y.double(), expect, rtol=1e-4, atol=1e-5)
            assert set(layer.kept_experts) == kept
            if cap is None:
                assert not layer.budgeted and layer.kept_size == layer.union_size


def _router_linear(block):
    """The router's ``[E, H]`` weight (and bias where the router has one) of a supported block."""
    router = block.router if hasattr(block, "router") else block.gate
    return router.weight, getattr(router, "bias", None)


def _crafted_logits(arch, k, E):
    """Two tokens whose routers disagree on one expert each and share a strong runner-up.

    The first k-1 favourites are shared, token 0's last is expert k-1, token 1's is expert k (the
    union has k+1 experts); expert ``r`` is both tokens' next choice, so with C = k its summed mass
    beats the two single-token favourites: MoE-Spec's rule ("all") keeps it, the union rule cannot.
    DeepSeek-V3 (4 groups of 4, top-2 groups): favourites 0, 1, 4 and 5 / 6, runner-up 2 (group 0).
    Token 1's own favourite is slightly weaker, so the union rule has no near-tie to break.
    """
    z = torch.full((2, E), -4.0)
    if arch == "deepseek_v3":
        fav, r = ([0, 1, 4, 5], [0, 1, 4, 6]), 2
    else:
        fav, r = (list(range(k)), list(range(k - 1)) + [k]), E - 1
    for t in range(2):
        z[t, fav[t]] = 3.0
        z[t, r] = 2.9
    z[1, fav[1][-1]] = 2.95  # no near-tie between the two single-token favourites
    return z, r


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_all_candidates_keep_the_shared_runner_up(arch):
    """Both candidate sets on every architecture, on a call where they must differ."""
    model = tiny_model(arch, seed=6)
    handle = moespec.patch(model)
    try:
        block = model.get_submodule(handle.layers[0].name)
        k, E = handle.layers[0].top_k, handle.layers[0].num_experts
        z, runner_up = _crafted_logits(arch, k, E)
        weight, bias = _router_linear(block)
        H = weight.shape[1]
        with torch.no_grad():
            # One-hot hidden states: token t's logits are column t of the router weight.
            weight.zero_()
            weight[:, :2] = z.T
            if bias is not None:
                bias.zero_()
            if arch == "deepseek_v3":
                block.gate.e_score_correction_bias.zero_()
        x = torch.zeros(1, 2, H)
        x[0, 0, 0] = x[0, 1, 1] = 1.0
        kept_sets, outputs = {}, {}
        for cand in ("all", "union"):
            # The block alone (no model call scope, so no stats): its output says which rule ran.
            with torch.no_grad(), moespec.expert_budget(model, k, policy="substitute", candidates=cand):
                out = block(x)
            y = (out[0] if isinstance(out, tuple) else out).reshape(2, H)
            expect, kept_sets[cand] = expected_block(arch, block, x.reshape(2, H), k, "substitute", candidates=cand)
            torch.testing.assert_close(y.double(), expect, rtol=1e-4, atol=1e-5)
            outputs[cand] = expect
        assert runner_up in kept_sets["all"] and runner_up not in kept_sets["union"] and len(kept_sets["all"]) == k
        scale = outputs["union"].abs().max()
        assert (outputs["all"] - outputs["union"]).abs().max() > 0.1 * scale, "the two rules must route differently"
    finally:
        handle.unpatch()
