"""Edge cases of the routing-plan kernel against `moespec.reference` (on a GPU and on the emulator), for
both plan generations (`kgen`: the single-CTA v1 plan and the multi-CTA v2 plan).

- rows of router logits without a valid softmax (all NaN, all -inf, NaN or +inf among finite values):
  the reference defines them (`reference.budget_routing_masked`) like padding tokens (no union, no
  score, weight 0) with the k lowest kept ids, so they never produce NaN weights nor widen the set of
  experts read; the plan must do the same, and valid rows must route exactly like the reference with
  those rows masked;
- coverage: the plan must pick the same C as `reference._kept_count` at the boundary (prefix mass
  equal to the target exactly, or one fp32 rounding away), which needs its prefix sums to be those
  of CPU ``torch.cumsum`` (fp64 accumulation, sequential, each prefix rounded to fp32) and the
  strict ``<`` comparison;
- budgets below / at / above the union, both policies, renormalisation, both score modes, T = 1 to
  200, E up to 1024 (the plan's limit), k up to 8, exact ties between equal logits;
- `kernels.plan_routing` validates its arguments like the ops (metadata only).

Tolerances follow tests/test_cuda_kernels.py: routing decisions bitwise, except an exact or 1e-6
relative tie between two candidates (the kernel breaks ties towards the lower id, torch.topk's order
is unspecified) and, for the kept set, a 1e-5 relative tie at the boundary score; weights rtol 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel_checks import kept_near_tie, same_pick
from moespec import kernels, ops, reference

NAN, INF = float("nan"), float("inf")
COMBOS = [("substitute", True, "prob"), ("truncate", False, "prob"), ("substitute", False, "topk"),
          ("truncate", True, "topk")]


# ----------------------------------------------------------------------------- helpers




def _logits(gen, T, E, scale=2.0):
    return torch.randn(T, E, generator=gen) * scale


def _union(z, k, valid=None):
    ids = torch.softmax(z, -1).topk(k, dim=-1).indices
    if valid is not None:
        ids = ids[valid]
    return int(torch.unique(ids).numel())


def _cases(union, k, combos=COMBOS, every=1):
    """budget None, budgets below / at / above the union with each (policy, renormalize, score),
    coverage with and without a cap. ``every`` > 1 keeps every n-th budgeted case (big shapes)."""
    cases = [dict(budget=None), dict(budget=None, renormalize=True)]
    budgeted = []
    for b in sorted({k, max(k, union // 2), max(k, union - 1), union, union + 3}):
        for policy, renorm, score in combos:
            budgeted.append(dict(budget=b, policy=policy, renormalize=renorm, score=score))
    cases += budgeted[::every]
    cases.append(dict(budget=None, coverage=0.5, renormalize=True))
    cases.append(dict(budget=max(k, union - 1), coverage=0.9, min_budget=k, policy="truncate", score="topk"))
    cases.append(dict(budget=None, coverage=1.0, policy="substitute", score="prob"))
    return cases


def _route(kdev, z, k, case):
    return ops.budget_routing(z.to(kdev.device), k, backend=kdev.backend, **case)


def _check_case(kdev, z, k, case, valid=None):
    """One routing call against the reference; ``valid [T]`` bool marks rows with a valid softmax
    (the others are compared with the reference's padding semantics)."""
    T, E = z.shape
    got = _route(kdev, z, k, case)
    ids, w = got.topk_ids.cpu(), got.topk_weights.cpu()
    kept = got.kept_experts.cpu().long()
    # Invariants, whatever the reference says: in range, no NaN, the documented handling of invalid rows.
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == (T, k), case
    assert ((ids >= 0) & (ids < E)).all(), (case, ids)
    assert torch.isfinite(w).all() and (w >= 0).all(), (case, w)
    kept_mask = torch.zeros(E, dtype=torch.bool)
    kept_mask[kept] = True
    if got.budgeted:
        if case.get("policy", "substitute") == "substitute":
            assert kept_mask[ids].all(), (case, "substitute returned an expert outside the kept set")
        else:
            assert kept_mask[ids][w != 0].all(), (case, "truncate kept weight on a dropped expert")
    if valid is not None and not valid.all():
        bad = ~valid
        assert (w[bad] == 0).all(), (case, "an invalid row got a non-zero weight")
        if kept.numel() >= k:
            assert torch.equal(ids[bad], kept[:k].expand(int(bad.sum()), k)), (case, ids[bad], kept[:k])
        else:
            assert torch.equal(ids[bad], torch.arange(k).expand(int(bad.sum()), k)), (case, ids[bad])

    # The reference: invalid rows are padding (their logits replaced by finite values that the mask hides).
    if valid is None:
        zr, mask = z, None
    else:
        zr = torch.where(valid.unsqueeze(1), z, torch.zeros_like(z))
        mask = valid
    want = reference.budget_routing(zr, k, token_mask=mask, **case)
    if valid is not None:  # the reference itself, on the raw logits, defines the invalid rows the same way
        direct = reference.budget_routing(z, k, **case)
        assert direct.union_size == want.union_size and torch.equal(direct.kept_experts, want.kept_experts), case
        if torch.equal(kept.int(), direct.kept_experts):
            assert torch.equal(ids[~valid], direct.topk_ids[~valid]), (case, ids[~valid], direct.topk_ids[~valid])
            assert torch.equal(w[~valid], direct.topk_weights[~valid]), case
    probs = torch.softmax(zr.float(), -1)
    assert got.union_size == want.union_size, (case, got.union_size, want.union_size)
    if not torch.equal(kept.int(), want.kept_experts):
        unb = reference.budget_routing(zr, k, None, renormalize=case.get("renormalize", False), token_mask=mask)
        sel = slice(None) if mask is None else mask
        if case.get("score", "prob") == "topk":
            sc = reference.score_experts(zr[sel], "topk", unb.topk_ids[sel], unb.topk_weights[sel])
        else:
            sc = probs[sel].sum(0)
        assert kept_near_tie(sc, kept, want.kept_experts), (case, kept.tolist(), want.kept_experts.tolist())
        return got  # a legitimate tie: the rest may differ
    assert got.budgeted == want.budgeted, case
    rows = torch.arange(T) if valid is None else valid.nonzero().reshape(-1)
    ok = True
    for t in rows.tolist():
        for s in range(k):
            a, b = int(ids[t, s]), int(want.topk_ids[t, s])
            if a != b:
                ok = False
                assert same_pick(probs[t], a, b), (case, f"token {t} slot {s}: kernel {a}, reference {b}")
    if ok:
        torch.testing.assert_close(w[rows], want.topk_weights[rows], rtol=1e-5, atol=1e-6, msg=str(case))
    return got


# ----------------------------------------------------------------------------- invalid rows


def _with_invalid_rows(gen, T, E, k):
    """Random logits with the kinds of invalid rows spread over T, plus valid rows that hold -inf
    (at least k finite logits each, so that their top-k has no zero-probability tie)."""
    z = _logits(gen, T, E)
    valid = torch.ones(T, dtype=torch.bool)
    perm = torch.randperm(T, generator=gen).tolist()
    kinds = ["nan", "-inf", "nan_one", "+inf_one", "+inf_-inf", "nan_-inf", "valid_-inf", "valid_one_finite_k"]
    for t, kind in zip(perm, kinds):
        cols = torch.randperm(E, generator=gen)
        if kind == "nan":
            z[t] = NAN
        elif kind == "-inf":
            z[t] = -INF
        elif kind == "nan_one":
            z[t, cols[0]] = NAN
        elif kind == "+inf_one":
            z[t, cols[0]] = INF
        elif kind == "+inf_-inf":
            z[t, cols[: E // 2]] = -INF
            z[t, cols[-1]] = INF
        elif kind == "nan_-inf":
            z[t, cols[: E // 2]] = -INF
            z[t, cols[-1]] = NAN
        elif kind == "valid_-inf":
            z[t, cols[: E - k - 1]] = -INF
        else:  # exactly k finite logits
            z[t, cols[: E - k]] = -INF
        if not kind.startswith("valid"):
            valid[t] = False
    return z, valid


@pytest.mark.parametrize("T,E,k", [(12, 64, 4), (9, 16, 2), (10, 128, 8)])
def test_invalid_rows_route_as_padding(T, E, k, kdev, kgen, gen):
    z, valid = _with_invalid_rows(gen, T, E, k)
    union = _union(z, k, valid)
    for case in _cases(union, k, every=1 if E <= 64 else 2):
        _check_case(kdev, z, k, case, valid)


def test_invalid_rows_plan_and_csr(kdev, kgen, gen):
    """The planned API: bf16 logits, scores, CSR without invalid rows, determinism."""
    T, E, k = 10, 64, 4
    z, valid = _with_invalid_rows(gen, T, E, k)
    for dtype in (torch.float32, torch.bfloat16):
        zd = z.to(dtype).to(kdev.device)
        for budget, policy, score in ((None, "substitute", "prob"), (12, "substitute", "prob"), (12, "truncate", "topk")):
            plan = kernels.plan_routing(zd, k, budget, policy, True, score)
            c = plan.counts()
            ids, w = plan.ids.cpu().long(), plan.weights.cpu()
            assert torch.isfinite(w).all() and (w[~valid] == 0).all()
            assert ((ids >= 0) & (ids < E)).all()
            kept = plan.kept_experts[: c["kept"]].cpu().long()
            assert torch.equal(ids[~valid], kept[:k].expand(int((~valid).sum()), k))
            if budget is not None:
                assert torch.isfinite(plan.scores.cpu()).all()
            # Invalid rows' pairs (weight 0) are not in the CSR.
            pos = plan.pair_position.cpu()
            assert (pos[~valid] == -1).all()
            active = (w != 0) & torch.zeros(E, dtype=torch.bool).index_fill(0, kept, True)[ids]
            assert torch.equal(pos >= 0, active) and c["pairs"] == int(active.sum())
            first = [t.clone() for t in (plan.ids, plan.weights, plan.meta, plan.kept_experts, plan.pair_position)]
            kernels.plan_routing(zd, k, budget, policy, True, score, plan=plan)
            again = (plan.ids, plan.weights, plan.meta, plan.kept_experts, plan.pair_position)
            assert all(torch.equal(a, b) for a, b in zip(first, again)), "the plan must be deterministic"
            want = reference.budget_routing(
                torch.where(valid.unsqueeze(1), z.to(dtype).float(), torch.zeros(())), k, budget, policy, True,
                score, token_mask=valid)
            assert c["union"] == want.union_size


@pytest.mark.parametrize("T", [1, 3])
def test_all_rows_invalid(T, kdev, kgen, gen):
    E, k = 32, 4
    z = _logits(gen, T, E)
    z[0] = NAN
    if T > 1:
        z[1] = -INF
        z[2, 5] = INF
    for case in (dict(budget=None), dict(budget=None, renormalize=True), dict(budget=4, policy="truncate"),
                 dict(budget=4, score="topk", renormalize=True), dict(budget=None, coverage=0.5)):
        got = _route(kdev, z, k, case)
        assert got.union_size == 0 and not got.budgeted and got.kept_experts.numel() == 0, case
        assert torch.equal(got.topk_ids.cpu(), torch.arange(k).expand(T, k)), case
        assert (got.topk_weights.cpu() == 0).all(), case


def test_reference_defines_invalid_rows(gen):
    """The reference's rule for rows without a softmax: padding for the union and the scores,
    weight 0, the k lowest kept ids; the other rows route as if those rows were masked out."""
    T, E, k = 9, 32, 4
    z, valid = _with_invalid_rows(gen, T, E, k)
    zr = torch.where(valid.unsqueeze(1), z, torch.zeros_like(z))
    for case in (dict(budget=None), dict(budget=None, renormalize=True), dict(budget=k + 1),
                 dict(budget=k + 1, policy="truncate", score="topk"), dict(budget=None, coverage=0.5)):
        got = reference.budget_routing(z, k, **case)
        want = reference.budget_routing(zr, k, token_mask=valid, **case)
        assert torch.isfinite(got.topk_weights).all() and (got.topk_weights[~valid] == 0).all(), case
        assert got.union_size == want.union_size and torch.equal(got.kept_experts, want.kept_experts), case
        assert torch.equal(got.topk_ids[valid], want.topk_ids[valid]), case
        assert torch.equal(got.topk_weights[valid], want.topk_weights[valid]), case
        kept = got.kept_experts.long()
        assert torch.equal(got.topk_ids[~valid], kept[:k].expand(int((~valid).sum()), k)), case
    # The standalone score op keeps torch's NaN: it is not a routing.
    assert torch.isnan(reference.score_experts(z, "prob")).all()


# ----------------------------------------------------------------------------- coverage boundary


def _sorted_prefix(scores, mask):
    cand = scores.float().masked_fill(~mask, float("-inf"))
    sorted_scores, order = torch.sort(cand, descending=True, stable=True)
    valid = mask.gather(0, order)
    return torch.cumsum(torch.where(valid, sorted_scores, torch.zeros_like(sorted_scores)), 0)


def _boundary_taus(csum, U, gen, n=4):
    """Coverages whose fp32 target ``fp32(tau) * total`` lands exactly on a prefix mass, or one
    fp32 step around it (the reference's target arithmetic, checked with numpy fp32)."""
    total = np.float32(csum[-1].item())
    js = sorted({0, U - 1, *torch.randint(0, U, (n,), generator=gen).tolist()})
    out, exact = [], 0
    for j in js:
        c = np.float32(csum[j].item())
        t0 = np.float32(float(c) / float(total))
        cand = [t0]
        for direction in (np.float32(INF), np.float32(0)):
            t = t0
            for _ in range(2):
                t = np.nextafter(t, direction, dtype=np.float32)
                cand.append(t)
        for tau in cand:
            if 0 < tau <= 1:
                target = np.float32(tau) * total  # fp32 * fp32 in fp32, like torch
                exact += int(target == c)
                out.append(float(tau))
    return sorted(set(out)), exact


@pytest.mark.parametrize("candidates", ["union", "all"])
@pytest.mark.parametrize("T,E,k,score", [(17, 128, 4, "prob"), (64, 256, 8, "topk"), (6, 1024, 8, "prob"),
                                         (200, 64, 2, "prob")])
def test_coverage_boundary_matches_reference_cumsum(T, E, k, score, candidates, kdev, kgen, gen):
    """The kept count from the kernel's own scores equals `reference.select_kept_mask` on those
    scores for coverages placed exactly on (and one fp32 step around) the prefix masses of the
    candidates (the union, or every expert)."""
    z = _logits(gen, T, E, scale=1.0)
    zd = z.to(kdev.device)
    plan = kernels.plan_routing(zd, k, None, coverage=1.0, score=score, csr=False, candidates=candidates)
    c = plan.counts()
    U = c["union"]
    scores = plan.scores.cpu().clone()
    mask = torch.zeros(E, dtype=torch.bool)
    if candidates == "all":
        mask[:] = True
    else:
        mask[plan.union_experts[:U].cpu().long()] = True
    n_cand = int(mask.sum())
    csum = _sorted_prefix(scores, mask)
    taus, exact = _boundary_taus(csum, n_cand, gen)
    assert exact > 0, "no coverage hit a prefix mass exactly: the test lost its point"
    for tau in taus:
        for budget in (None, U - 1):
            if budget is not None and budget < k:
                continue
            want_mask, want_n = reference.select_kept_mask(scores, mask, budget, tau, k)
            kernels.plan_routing(zd, k, budget, coverage=tau, score=score, csr=False, plan=plan,
                                 candidates=candidates)
            got = plan.counts()
            kept = plan.kept_experts[: got["kept"]].cpu().long()
            assert torch.equal(plan.scores.cpu(), scores), "scores must be deterministic"
            if int(want_n) >= U:  # the union fits: untouched, the kept set is the union
                assert not got["budgeted"] and got["kept"] == U, (tau, budget)
                continue
            assert got["budgeted"] and got["kept"] == int(want_n), (tau, budget, got["kept"], int(want_n))
            assert torch.equal(kept, want_mask.nonzero().reshape(-1)), (tau, budget)


@pytest.mark.parametrize("E,k", [(64, 1), (64, 2), (128, 4), (1024, 8)])
def test_coverage_boundary_exact_fractions(E, k, kdev, kgen, gen):
    """Every row spreads its mass evenly over exactly k experts (equal finite logits, the rest -inf),
    so probabilities, scores and prefix sums are exact binary fractions; with T a power of two,
    coverage = prefix_j / T puts the target exactly on a prefix mass. Then C = j + 1 (the prefix that
    reaches the target counts; ``<``, not ``<=``), one fp32 step more gives j + 2. End to end against
    the reference, both score modes and policies."""
    T = 16
    z = torch.full((T, E), -INF)
    # Skewed expert choice so that scores differ (and also tie: ties go to the lower id in both).
    pool = max(2 * k, min(E, 3 * k + 5))
    weights = torch.linspace(3.0, 0.2, pool)
    experts = torch.randperm(E, generator=gen)[:pool]
    for t in range(T):
        pick = experts[torch.multinomial(weights, k, replacement=False, generator=gen)]
        z[t, pick] = float(torch.randn((), generator=gen))  # any common value: exp(0) == 1
    probs = torch.softmax(z, -1)
    assert torch.equal(probs[probs > 0], torch.full((T * k,), 1.0 / k))
    union = torch.unique(probs.topk(k, -1).indices)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[union] = True
    U = int(mask.sum())
    csum = _sorted_prefix(probs.sum(0), mask)
    js = sorted({0, k - 1, U // 2, U - 2, U - 1} & set(range(U)))
    for i, j in enumerate(js):
        tau = float(csum[j]) / T  # exact: T is a power of two
        assert np.float32(tau) * np.float32(T) == np.float32(csum[j].item())
        for tau_j, n in ((tau, j + 1), (float(np.nextafter(np.float32(tau), np.float32(2))), j + 2)):
            if tau_j > 1:
                continue
            policy, renorm, score = COMBOS[i % len(COMBOS)]
            case = dict(budget=None, coverage=tau_j, min_budget=k, policy=policy, renormalize=renorm, score=score)
            got = _check_case(kdev, z, k, case)
            want_kept = min(max(n, k), U)
            assert got.kept_experts.numel() == want_kept, (case, got.kept_experts.numel(), want_kept)


# ----------------------------------------------------------------------------- budgets, shapes, ties


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (1, 1024, 8), (3, 60, 6), (17, 256, 1), (64, 128, 8),
                                   (200, 64, 4), (200, 1024, 8)])
def test_budgets_against_reference(T, E, k, kdev, kgen, gen):
    z = _logits(gen, T, E)
    union = _union(z, k)
    every = 1 if T * E <= 16384 else 4
    for case in _cases(union, k, every=every):
        _check_case(kdev, z, k, case)


def _without_boundary_ties(gen, T, E, k, dtype):
    """Logits rounded to ``dtype`` whose k-th and (k+1)-th largest values differ in every row: 16-bit
    logits tie often, and a tie at the top-k boundary lets torch.topk pick either expert, which changes
    the union (test_equal_logit_ties_go_to_the_lower_id covers ties)."""
    z = _logits(gen, T, E).to(dtype)
    while True:
        top = z.float().topk(k + 1, dim=-1).values
        tied = top[:, k - 1] == top[:, k]
        if not tied.any():
            return z
        z[tied] = _logits(gen, int(tied.sum()), E).to(dtype)


def test_half_precision_logits(kdev, kgen, gen):
    for dtype in (torch.bfloat16, torch.float16):
        z = _without_boundary_ties(gen, 16, 128, 8, dtype)
        zf = z.float()
        union = _union(zf, 8)
        for case in (dict(budget=None), dict(budget=max(8, union // 2), renormalize=True),
                     dict(budget=max(8, union // 2), policy="truncate", score="topk")):
            got = _route(kdev, z, 8, case)
            want = reference.budget_routing(z, 8, **case)
            assert got.union_size == want.union_size
            if torch.equal(got.kept_experts.cpu(), want.kept_experts):
                probs = torch.softmax(zf, -1)
                ids = got.topk_ids.cpu()
                for t, s in (ids != want.topk_ids).nonzero().tolist():
                    assert same_pick(probs[t], ids[t, s], want.topk_ids[t, s])


@pytest.mark.parametrize("T,E,k", [(8, 32, 4), (33, 256, 8), (1, 16, 3)])
def test_equal_logit_ties_go_to_the_lower_id(T, E, k, kdev, kgen, gen):
    """Integer logits from a small range: many exact ties. The kernel's rule (value desc, then id
    asc) is checked exactly against a stable sort; the reference agrees up to those ties."""
    z = torch.randint(-2, 2, (T, E), generator=gen).float()
    probs = torch.softmax(z, -1)
    stable = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    for renorm in (False, True):
        got = _route(kdev, z, k, dict(budget=None, renormalize=renorm))
        ids = got.topk_ids.cpu()
        assert torch.equal(ids, stable), "unbudgeted ties must go to the lower id"
        want = reference.budget_routing(z, k, None, renormalize=renorm)
        for t, s in (ids != want.topk_ids).nonzero().tolist():
            assert same_pick(probs[t], ids[t, s], want.topk_ids[t, s], rel=0.0)
        w = probs.gather(1, ids)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        torch.testing.assert_close(got.topk_weights.cpu(), w, rtol=1e-5, atol=1e-6)
    umask = torch.zeros(E, dtype=torch.bool)
    umask[torch.unique(stable)] = True
    U = int(umask.sum())
    zd = z.to(kdev.device)
    for budget in sorted({k, max(k, U // 2), max(k, U - 1)}):
        for policy, renorm, score in COMBOS:
            plan = kernels.plan_routing(zd, k, budget, policy, renorm, score, csr=False)
            c = plan.counts()
            scores = plan.scores.cpu()
            assert c["union"] == U
            # The kept set is the reference's selection on the kernel's own scores (ties to the lower id),
            # among the policy's default candidates; a union that fits is kept whole.
            cmask = umask if reference.default_candidates(policy) == "union" else torch.ones_like(umask)
            want_mask, want_n = reference.select_kept_mask(scores, cmask, budget)
            if int(want_n) >= U:
                want_mask = umask
            kept = plan.kept_experts[: c["kept"]].cpu().long()
            assert torch.equal(kept, want_mask.nonzero().reshape(-1)), (budget, policy, score)
            assert c["budgeted"] == (int(want_n) < U)
            ids = plan.ids.cpu().long()
            if c["budgeted"] and policy == "substitute":
                masked = probs.masked_fill(~want_mask, -1.0)
                want_ids = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :k]
                assert torch.equal(ids, want_ids), (budget, policy, score)
            elif c["budgeted"]:
                assert torch.equal(ids, stable)
                w = plan.weights.cpu()
                assert (w[~want_mask[ids]] == 0).all() and (w[want_mask[ids]] > 0).all()


# ----------------------------------------------------------------------------- argument validation


def test_plan_routing_validates_arguments(kdev, kgen, gen):
    dev = kdev.device
    z = _logits(gen, 4, 16).to(dev)
    bad = [
        (dict(top_k=2, budget=1), "budget"),
        (dict(top_k=2, budget=0), "budget"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_k=17), "exceeds the number of experts"),
        (dict(top_k=9, budget=12), "routing plan supports"),
        (dict(top_k=2, budget=4, policy="drop"), "policy"),
        (dict(top_k=2, budget=4, score="logit"), "score"),
        (dict(top_k=2, coverage=0.0), "coverage"),
        (dict(top_k=2, coverage=1.5), "coverage"),
        (dict(top_k=2, coverage=-0.2), "coverage"),
        (dict(top_k=2, coverage=True), "coverage"),
        (dict(top_k=2, coverage=0.5, min_budget=1), "min_budget"),
        (dict(top_k=2, budget=4, coverage=0.5, min_budget=6), "min_budget"),
        (dict(top_k=2, budget=4, min_budget=2), "min_budget"),
        (dict(top_k=2, budget=4.0), "budget"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            kernels.plan_routing(z, **kw)
    with pytest.raises(ValueError, match="2-D"):
        kernels.plan_routing(z[0], 2)
    with pytest.raises(ValueError, match="2-D"):
        kernels.plan_routing(z.unsqueeze(0), 2)
    with pytest.raises(ValueError, match="at least one token"):
        kernels.plan_routing(z[:0], 2)
    with pytest.raises(ValueError, match="routing plan supports"):
        kernels.plan_routing(torch.zeros(2, 2048, device=dev), 2)
    with pytest.raises(TypeError, match="floating-point"):
        kernels.plan_routing(torch.zeros(4, 16, dtype=torch.int64, device=dev), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        kernels.plan_routing(z.tolist(), 2)
    with pytest.raises(ValueError, match="sized for"):
        kernels.plan_routing(z, 2, plan=kernels.RoutingPlan.empty(5, 16, 2, dev))
    with pytest.raises(ValueError, match="on meta"):
        kernels.plan_routing(z, 2, plan=kernels.RoutingPlan.empty(4, 16, 2, "meta"))
    # Valid settings go through (coverage 1 and an int coverage included); fp64 logits are read as fp32.
    for kw in (dict(top_k=2), dict(top_k=2, budget=2), dict(top_k=2, coverage=1), dict(top_k=8),
               dict(top_k=2, budget=3, coverage=0.5, min_budget=3, policy="truncate", score="topk")):
        kernels.plan_routing(z, **kw)
    kernels.plan_routing(z.double(), 2, 4)
    # The checks read metadata only (no device sync): they pass on a meta tensor, which has no data.
    kernels._check_plan_routing_args(torch.empty(4, 16, device="meta"), 2, 4, "truncate", "topk", 0.5, 2, None)
