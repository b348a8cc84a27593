"""budget_routing / score_experts against independent straightforward implementations."""
import math

import pytest
import torch

from moespec import ops, reference


# ----------------------------------------------------------------------------- independent model

def softmax_rows(z):
    out = []
    for row in z.double().tolist():
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        out.append([v / s for v in ex])
    return out


def naive_budget(z, k, budget, policy, renormalize, score="prob", coverage=None, min_budget=None, candidates=None):
    """Plain-Python docs/design.md §3: returns (ids per token, weights per token, kept list, union size).

    ``candidates``: "all" (every expert, MoE-Spec), "union", or None: the default, "union"."""
    if candidates is None:
        candidates = "union"
    P = softmax_rows(z)
    T, E = len(P), len(P[0])
    nat = [sorted(range(E), key=lambda e: (-P[t][e], e))[:k] for t in range(T)]

    def norm(ws):
        s = sum(ws)
        return [w / s for w in ws] if (renormalize and s > 0) else list(ws)

    nat_w = [norm([P[t][e] for e in nat[t]]) for t in range(T)]
    union = sorted({e for row in nat for e in row})
    if budget is None and coverage is None:
        return nat, nat_w, union, len(union)
    if score == "prob":
        sc = {e: sum(P[t][e] for t in range(T)) for e in range(E)}
    else:
        sc = {e: 0.0 for e in range(E)}
        for t in range(T):
            for e, w in zip(nat[t], nat_w[t]):
                sc[e] += w
    cands = list(range(E)) if candidates == "all" else union
    ranked = sorted(cands, key=lambda e: (-sc[e], e))
    C = len(cands) if budget is None else budget
    if coverage is not None:
        total = sum(sc[e] for e in ranked)
        acc, n = 0.0, len(ranked)
        for i, e in enumerate(ranked):
            acc += sc[e]
            if acc >= coverage * total - 1e-12:
                n = i + 1
                break
        lo = k if min_budget is None else min_budget
        C = max(lo, min(n, C))
    if len(union) <= C:
        return nat, nat_w, union, len(union)
    kept = sorted(ranked[:C])
    ids, ws = [], []
    for t in range(T):
        if policy == "substitute":
            row = sorted(kept, key=lambda e: (-P[t][e], e))[:k]
            ids.append(row)
            ws.append(norm([P[t][e] for e in row]))
        else:
            row = nat[t]
            ids.append(row)
            ws.append(norm([P[t][e] if e in kept else 0.0 for e in row]))
    return ids, ws, kept, len(union)


def random_logits(gen, T, E, skew=1.0):
    pop = -skew * torch.log(torch.randperm(E, generator=gen).float() + 1)
    return pop + torch.randn(T, E, generator=gen)


CASES = [(1, 8, 2), (3, 8, 2), (8, 60, 4), (17, 64, 6), (16, 128, 8), (64, 256, 8), (5, 16, 1)]


@pytest.mark.parametrize("T,E,k", CASES)
@pytest.mark.parametrize("policy", ["substitute", "truncate"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("candidates", [None, "all", "union"])
def test_budget_matches_naive(gen, T, E, k, policy, renormalize, candidates):
    z = random_logits(gen, T, E)
    union = len(torch.unique(torch.topk(z, k, dim=-1).indices))
    for budget in sorted({k, max(k, union // 2), max(k, union - 1), union, union + 3}):
        r = ops.budget_routing(z, k, budget, policy=policy, renormalize=renormalize, candidates=candidates)
        ids, ws, kept, U = naive_budget(z, k, budget, policy, renormalize, candidates=candidates)
        assert r.union_size == U == union
        assert r.kept_experts.tolist() == kept, f"budget {budget}"
        assert r.kept_size <= budget
        assert r.budgeted == (union > budget)
        assert r.topk_ids.tolist() == ids, f"budget {budget}"
        assert r.topk_ids.dtype == torch.int64 and r.topk_weights.dtype == torch.float32
        torch.testing.assert_close(r.topk_weights.double(), torch.tensor(ws, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7)
        # The routing only ever uses kept experts (truncate keeps dropped ids at weight 0).
        used = r.topk_ids[r.topk_weights != 0]
        assert set(used.tolist()) <= set(kept)


@pytest.mark.parametrize("T,E,k", CASES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_budget_at_or_above_union_is_bit_identical(gen, T, E, k, renormalize):
    z = random_logits(gen, T, E).to(torch.bfloat16)
    # What transformers' softmax top-k routers compute (Mixtral / Qwen with norm_topk_prob).
    probs = torch.nn.functional.softmax(z.float(), dim=-1)
    w_hf, ids_hf = torch.topk(probs, k, dim=-1)
    if renormalize:
        w_hf /= w_hf.sum(dim=-1, keepdim=True)
    union = len(torch.unique(ids_hf))
    for budget in (None, union, union + 1, E):
        for policy in ("substitute", "truncate"):
            r = ops.budget_routing(z, k, budget, policy=policy, renormalize=renormalize)
            assert torch.equal(r.topk_ids, ids_hf) and torch.equal(r.topk_weights, w_hf)
            assert not r.budgeted and r.union_size == union
            assert r.kept_experts.tolist() == sorted(set(ids_hf.reshape(-1).tolist()))


def test_ties_go_to_lower_expert_id():
    # Token 0 picks {0, 2}, token 1 picks {0, 5}, mirror images of each other, so experts 2 and 5
    # have exactly equal aggregate scores (a + b == b + a in fp32).
    z = torch.full((2, 8), -5.0)
    z[:, 0] = 3.0
    z[0, 2] = 1.0
    z[1, 5] = 1.0
    scores = ops.score_experts(z)
    assert float(scores[2]) == float(scores[5])
    for policy in ("substitute", "truncate"):
        r = ops.budget_routing(z, 2, 2, policy=policy)
        assert r.union_size == 3
        assert r.kept_experts.tolist() == [0, 2]
    kept = reference.select_experts(torch.ones(8), torch.tensor([1, 3, 4, 6]), budget=2)
    assert kept.tolist() == [1, 3]


@pytest.mark.parametrize("T,E,k", [(8, 64, 8), (16, 128, 8), (4, 8, 2)])
def test_score_modes(gen, T, E, k):
    z = torch.randn(T, E, generator=gen, dtype=torch.float64).to(torch.float16)
    P = softmax_rows(z)
    s = ops.score_experts(z)
    assert s.dtype == torch.float32 and s.shape == (E,)
    torch.testing.assert_close(s.double(), torch.tensor(P, dtype=torch.float64).sum(0), rtol=1e-5, atol=1e-6)
    _, ids, w = reference.route_topk_softmax(z, k, renormalize=True)
    st = ops.score_experts(z, "topk", ids, w)
    expect = [0.0] * E
    for t in range(T):
        for j in range(k):
            expect[int(ids[t, j])] += float(w[t, j])
    torch.testing.assert_close(st.double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["substitute", "truncate"])
@pytest.mark.parametrize("score", ["prob", "topk"])
@pytest.mark.parametrize("candidates", ["all", "union"])
def test_topk_score_and_coverage_match_naive(gen, policy, score, candidates):
    T, E, k = 16, 64, 4
    z = random_logits(gen, T, E, skew=1.5)
    for budget, coverage, min_budget in [(8, None, None), (None, 0.5, None), (24, 0.8, 6), (None, 0.99, 4),
                                         (12, 1.0, None), (None, 0.05, 5)]:
        r = ops.budget_routing(z, k, budget, policy=policy, renormalize=True, score=score,
                               coverage=coverage, min_budget=min_budget, candidates=candidates)
        ids, ws, kept, U = naive_budget(z, k, budget, policy, True, score, coverage, min_budget, candidates)
        assert r.kept_experts.tolist() == kept, (budget, coverage, min_budget)
        assert r.topk_ids.tolist() == ids
        torch.testing.assert_close(r.topk_weights.double(), torch.tensor(ws, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7)
        lo = k if min_budget is None else min_budget
        assert min(U, lo) <= r.kept_size <= (budget if budget is not None else E)
        assert r.budgeted == (r.kept_size < U)


def test_truncate_all_dropped_token_gets_zero_weight():
    # Token 1 routes only to experts that the other, more confident tokens outvote.
    z = torch.full((5, 8), -10.0)
    z[:4, 0], z[:4, 1] = 5.0, 4.0
    z[4, 6], z[4, 7] = 5.0, 4.9
    r = ops.budget_routing(z, 2, 2, policy="truncate", renormalize=True)
    assert r.kept_experts.tolist() == [0, 1]
    assert r.topk_weights[4].tolist() == [0.0, 0.0]
    assert r.topk_ids[4].tolist() == [6, 7]
    rs = ops.budget_routing(z, 2, 2, policy="substitute", renormalize=True)
    assert sorted(rs.topk_ids[4].tolist()) == [0, 1]
    assert abs(float(rs.topk_weights[4].sum()) - 1.0) < 1e-6


def test_all_candidates_keep_a_non_union_expert_with_mass():
    # Expert 3 is every token's second choice by a hair but nobody's top-1; with k=1 it is never in
    # the union, yet it carries the most mass after expert 0. MoE-Spec's rule keeps it.
    z = torch.full((4, 8), -4.0)
    for t in range(4):
        z[t, 4 + t] = 2.0   # each token's own favourite (4 distinct experts: the union)
        z[t, 3] = 1.9       # the shared runner-up
    r_all = ops.budget_routing(z, 1, 2, policy="substitute", candidates="all")
    r_union = ops.budget_routing(z, 1, 2, policy="substitute", candidates="union")
    assert r_all.union_size == r_union.union_size == 4 and r_all.budgeted and r_union.budgeted
    # Favourites tie (4..7): the lower id wins the second slot.
    assert r_all.kept_experts.tolist() == [3, 4] and r_union.kept_experts.tolist() == [4, 5]
    # The three tokens whose favourite is dropped take the shared runner-up under "all".
    assert r_all.topk_ids[:, 0].tolist() == [4, 3, 3, 3]
    assert r_all.kept_experts.tolist() == naive_budget(z, 1, 2, "substitute", False, candidates="all")[2]
    # The default is the union, for both policies.
    assert torch.equal(ops.budget_routing(z, 1, 2).kept_experts, r_union.kept_experts)
    assert torch.equal(ops.budget_routing(z, 1, 2, policy="truncate").kept_experts,
                       ops.budget_routing(z, 1, 2, policy="truncate", candidates="union").kept_experts)


def test_all_candidates_fit_is_bit_identical(gen):
    # The cap rule holds for both candidate sets: a union that fits is never perturbed, even when
    # a non-union expert outscores a union expert.
    z = random_logits(gen, 6, 32)
    nat = reference.route_topk_softmax(z, 2)
    union = len(torch.unique(nat[1]))
    for cand in ("all", "union"):
        r = ops.budget_routing(z, 2, union, candidates=cand)
        assert not r.budgeted and torch.equal(r.topk_ids, nat[1]) and torch.equal(r.topk_weights, nat[2])
        assert r.kept_experts.tolist() == sorted(set(nat[1].reshape(-1).tolist()))


@pytest.mark.parametrize("bad", ["none", "ALL", 1, ""])
def test_bad_candidates_are_rejected(bad):
    with pytest.raises(ValueError, match="candidates must be one of"):
        ops.budget_routing(torch.randn(2, 8), 2, 4, candidates=bad)
    with pytest.raises(ValueError, match="candidates must be one of"):
        ops.budget_routing_masked(torch.randn(2, 8), 2, 4, candidates=bad)
