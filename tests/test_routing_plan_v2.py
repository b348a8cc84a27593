"""The generation-2 routing plan (csrc/include/moespec/routing_v2.cuh; docs/kernels-v2.md, "Routing
plan v2") against the generation-1 plan, bit for bit, on every kernel device (`kdev`).

v2 spreads the per-token work over CTAs of 8 tokens and does the rest in the last CTA to arrive, with
every sum in v1's order, so every output of the plan must have v1's bits: ids, weights, row
statistics, scores, meta, union / kept lists and the CSR. The tests compare the valid parts of both
plans after poisoning every buffer (NaN / 0x7FC00000 bits), over the modes of the plan (route from
logits or given ids, prob / topk scores, budget, coverage, min_budget, candidates, both policies,
renormalisation, invalid rows, out-of-range and repeated ids, kept lists, CSR none / all / active),
shapes from T=1 to several CTAs with an uneven last one (T=300), E up to 1024 and k up to 8. The
comparison with `moespec.reference` is in tests/test_cuda_kernels.py and test_kernel_edge_cases.py,
which run for both generations (`kgen`). Also: the ticket counter resets itself (graph-replay style
repeats on one plan), the plan does not depend on the emulated block/thread order, and the L2
prefetch covers the kept experts' first weight tiles, highest score first.
"""
from __future__ import annotations

import pytest
import torch

from moespec import _cuda, kernels, reference
from moespec.types import ExpertLayout

NAN, INF = float("nan"), float("inf")
POISON_I32 = 0x7FC00000


def _need_kernels(kdev):
    present = _cuda.has_kernel("budget_routing") if kdev.name == "cuda" else _cuda.has_emu_kernel("budget_routing")
    if not present:
        pytest.skip(f"moespec._C has no {kdev.name} routing plan")


def _poisoned_plan(T, E, k, device, generation):
    plan = kernels.RoutingPlan.empty(T, E, k, device, generation)
    for name in ("ids", "weights", "row_max", "row_sum", "scores", "union_experts", "kept_experts", "act_experts",
                 "act_offsets", "pair_token", "pair_slot", "pair_position", "contrib"):
        t = getattr(plan, name)
        if t is None:
            continue
        t.fill_(NAN) if t.is_floating_point() else t.fill_(POISON_I32)
    plan.meta.fill_(POISON_I32)
    return plan


def _bits(t):
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _state(plan, scores=True, stats=True, csr=True):
    """The meaningful part of a plan, as exact bits (valid prefixes by its own counts)."""
    m = plan.meta.cpu().tolist()
    U, C, A, P = m[kernels.META_UNION], m[kernels.META_KEPT], m[kernels.META_ACTIVE], m[kernels.META_PAIRS]
    out = {"ids": plan.ids, "weights": plan.weights, "meta": plan.meta[:3],
           "union": plan.union_experts[:U], "kept": plan.kept_experts[:C]}
    if stats:
        out.update(row_max=plan.row_max[:plan.T], row_sum=plan.row_sum[:plan.T])
    if scores:
        out["scores"] = plan.scores
    if csr:
        out.update(meta_csr=plan.meta[3:5], act_experts=plan.act_experts[:A], act_offsets=plan.act_offsets[:A + 1],
                   pair_token=plan.pair_token[:P], pair_slot=plan.pair_slot[:P], pair_position=plan.pair_position)
    return {key: _bits(v) for key, v in out.items()}


def _assert_same(a, b, what):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs between the v1 and v2 plans"


def _route_both(kdev, z, k, case, csr=True):
    T, E = z.shape
    states = []
    for g in ("v1", "v2"):
        plan = _poisoned_plan(T, E, k, kdev.device, g)
        kernels.plan_routing(z, k, plan=plan, csr=csr, generation=g, **case)
        budgeted = case.get("budget") is not None or case.get("coverage") is not None
        states.append(_state(plan, scores=budgeted, csr=csr))
        if g == "v2":
            assert plan.sync.cpu().tolist() == [0, 0, 0, 0], "the tail must reset the ticket and the flag"
    _assert_same(*states, f"T={T} E={E} k={k} {case}")


def _with_invalid_rows(gen, T, E):
    z = torch.randn(T, E, generator=gen) * 2
    if T >= 4:
        z[1] = NAN
        z[2, 3] = INF
        z[3] = -INF
    if T >= 6:
        z[5, : E // 2] = -INF  # valid: some -inf, some finite
    return z


def _cases(k, E):
    b = max(k, E // 8)
    cases = [dict(budget=None), dict(budget=None, renormalize=True)]
    for policy, renorm, score in (("substitute", True, "prob"), ("truncate", False, "prob"),
                                  ("substitute", False, "topk"), ("truncate", True, "topk")):
        for cand in ("union", "all"):
            cases.append(dict(budget=b, policy=policy, renormalize=renorm, score=score, candidates=cand))
    cases.append(dict(budget=None, coverage=0.6, renormalize=True))
    cases.append(dict(budget=b + 1, coverage=0.9, min_budget=k, policy="truncate", score="topk", candidates="all"))
    cases.append(dict(budget=max(k, E // 2), coverage=0.3, min_budget=k))
    return cases


# T=1 (one CTA), 8 (one full CTA), 9 and 300 (an uneven last CTA), 64; E up to 1024; k 1..8.
ROUTE_SHAPES = [(1, 8, 1), (1, 256, 8), (8, 60, 2), (9, 128, 8), (17, 64, 4), (64, 128, 8), (64, 256, 8),
                (300, 60, 6), (5, 1024, 8)]


@pytest.mark.parametrize("T,E,k", ROUTE_SHAPES)
def test_v2_plan_routes_like_v1_bitwise(kdev, T, E, k, gen):
    _need_kernels(kdev)
    z = _with_invalid_rows(gen, T, E).to(kdev.device)
    for case in _cases(k, E):
        _route_both(kdev, z, k, case)
    _route_both(kdev, z, k, dict(budget=max(k, E // 4)), csr=False)


def test_v2_plan_half_logits_and_many_kept(kdev, gen):
    """bf16/fp16 logits, and kept sets above 32 experts (the re-routing's v1 code path)."""
    _need_kernels(kdev)
    T, E, k = 40, 256, 8
    for dtype in (torch.bfloat16, torch.float16):
        z = (torch.randn(T, E, generator=gen) * 2).to(dtype).to(kdev.device)
        for case in (dict(budget=16), dict(budget=48), dict(budget=100, score="topk", candidates="all")):
            _route_both(kdev, z, k, case)


def test_v2_plan_all_rows_invalid(kdev, gen):
    _need_kernels(kdev)
    T, E, k = 11, 32, 4
    z = torch.randn(T, E, generator=gen)
    z[0::3] = NAN
    z[1::3] = -INF
    z[2::3, 7] = INF
    for case in (dict(budget=None), dict(budget=4, policy="truncate"), dict(budget=4, score="topk", renormalize=True),
                 dict(budget=None, coverage=0.5)):
        _route_both(kdev, z.to(kdev.device), k, case)
        plan = kernels.plan_routing(z.to(kdev.device), k, generation="v2", **case)
        assert plan.counts()["union"] == 0
        assert torch.equal(plan.ids.cpu(), torch.arange(k, dtype=torch.int32).expand(T, k))
        assert (plan.weights.cpu() == 0).all()


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (13, 60, 8), (300, 256, 8), (7, 1024, 8)])
def test_v2_plan_from_given_routing_like_v1(kdev, T, E, k, gen):
    """Given ids: out-of-range ids, repeated ids in a token, kept lists (also empty), all pairs."""
    _need_kernels(kdev)
    ids = torch.randint(-2, E + 3, (T, k), generator=gen)
    w = torch.rand(T, k, generator=gen)
    kept = torch.randperm(E, generator=gen)[: max(1, E // 3)]
    for kw in (dict(), dict(kept_experts=kept), dict(kept_experts=kept[:0]), dict(all_pairs=True)):
        for weights in (w, None, w.half()):
            states = []
            for g in ("v1", "v2"):
                plan = _poisoned_plan(T, E, k, kdev.device, g)
                kernels.plan_from_routing(ids.to(kdev.device), None if weights is None else weights.to(kdev.device), E,
                                          plan=plan, generation=g,
                                          **{n: v.to(kdev.device) if torch.is_tensor(v) else v for n, v in kw.items()})
                states.append(_state(plan, scores=False, stats=False))
            _assert_same(*states, f"given routing T={T} E={E} k={k} {list(kw)}")


@pytest.mark.parametrize("T,E,k", [(1, 8, 8), (20, 16, 8), (77, 128, 4)])
def test_v2_scores_like_v1_with_repeated_ids(kdev, T, E, k, gen, monkeypatch):
    """score_experts: prob mode (NaN rows score NaN there) and topk mode with repeated ids in a token
    (then v2 sums in v1's pair order); both bitwise, and close to the reference."""
    _need_kernels(kdev)
    z = torch.randn(T, E, generator=gen)
    z[0, 1] = NAN
    ids = torch.randint(0, E, (T, k), generator=gen)  # repeats within a token are likely
    w = torch.rand(T, k, generator=gen)
    for mode, args in (("prob", (None, None)), ("topk", (ids, w))):
        got = []
        for g in ("v1", "v2"):
            monkeypatch.setenv("MOESPEC_KERNELS", g)
            dev_args = tuple(None if a is None else a.to(kdev.device) for a in args)
            got.append(_bits(kernels.score_experts(z.to(kdev.device), mode, *dev_args)))
        assert torch.equal(got[0], got[1]), mode
        if mode == "topk":
            want = reference.score_experts(z, "topk", ids, w)
            torch.testing.assert_close(got[1].view(torch.float32), want, rtol=1e-5, atol=1e-6)


def test_v2_plan_repeats_on_one_plan_and_under_other_orders(kdev, gen):
    """Graph-replay style: one plan's buffers reused for new logits (the ticket resets itself), and
    the same result under another emulated block/thread order."""
    _need_kernels(kdev)
    T, E, k = 70, 128, 8  # 9 CTAs
    plan = _poisoned_plan(T, E, k, kdev.device, "v2")
    for _ in range(3):
        z = (torch.randn(T, E, generator=gen) * 2).to(kdev.device)
        kernels.plan_routing(z, k, 20, renormalize=True, plan=plan, generation="v2")
        fresh = _poisoned_plan(T, E, k, kdev.device, "v1")
        kernels.plan_routing(z, k, 20, renormalize=True, plan=fresh, generation="v1")
        _assert_same(_state(fresh), _state(plan), "reused v2 plan")
        assert plan.sync.cpu().tolist() == [0, 0, 0, 0]
    first = _state(plan)
    if kdev.emulated:
        C = _cuda._C
        for salt in (1, 2):
            C.emu_set_seed((C.emu_seed() * 0x9E3779B97F4A7C15 + salt) & (2**64 - 1))
            kernels.plan_routing(z, k, 20, renormalize=True, plan=plan, generation="v2")
            _assert_same(first, _state(plan), "another block/thread order")


def test_v2_plan_is_selected_by_the_generation(kdev, gen, monkeypatch):
    """MOESPEC_KERNELS=v2 selects the v2 plan (its workspaces appear) in every entry point."""
    _need_kernels(kdev)
    z = torch.randn(9, 64, generator=gen).to(kdev.device)
    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    plan = kernels.plan_routing(z, 4, 8)
    assert plan.contrib is not None and plan.contrib.numel() == 9 * 64 and plan.sync is not None
    given = kernels.plan_from_routing(plan.ids, plan.weights, 64)
    assert given.sync is not None and given.contrib is None, "a given routing never scores: no [T, E] workspace"
    monkeypatch.setenv("MOESPEC_KERNELS", "v1")
    assert kernels.plan_routing(z, 4, 8).contrib is None
    with pytest.raises(ValueError, match="generation"):
        kernels.plan_routing(z, 4, 8, generation="v3")


def _expected_prefetch(plan, ranges, n):
    """The ranges of the first n kept experts, highest score first (ties: lower id)."""
    c = plan.counts()
    kept = plan.kept_experts[: c["kept"]].cpu().tolist()
    if c["budgeted"]:
        sc = plan.scores.cpu()
        kept = sorted(kept, key=lambda e: (-float(sc[e]), e))
    return kept[:n], {(base + e * stride, nbytes) for e in kept[:n] for base, stride, nbytes in ranges}


def _chunks(ranges, chunk=4096):
    """Ranges as the kernel issues them: 4 KB pieces (the last one shorter), each exactly once."""
    return sorted((a + off, min(chunk, n - off)) for a, n in ranges for off in range(0, n, chunk))


@pytest.mark.parametrize("layout_name", ["v5", "transposed"])
def test_v2_plan_prefetches_the_kept_experts_first_tiles(kdev, layout_name, gen, monkeypatch):
    """budgeted_moe_planned's v2 plan prefetches, for the kept experts (highest score first, at most
    _PREFETCH_TOTAL bytes), the first 64 gate and 64 up rows (a transposed block: its first 128 rows)."""
    _need_kernels(kdev)
    if not kdev.emulated:
        pytest.skip("the prefetch log is the emulator's")
    T, E, k, H, I = 12, 32, 4, 64, 96
    layout = ExpertLayout(transposed=layout_name == "transposed")
    shape = (E, H, 2 * I) if layout.transposed else (E, 2 * I, H)
    w_gu = torch.randn(shape, generator=gen).to(torch.bfloat16)
    z = torch.randn(T, E, generator=gen) * 2
    ranges = kernels._prefetch_ranges(w_gu, layout)
    row = shape[2] * 2
    if layout.transposed:
        assert ranges == [(w_gu.data_ptr(), w_gu.stride(0) * 2, min(128, H) * row)]  # the whole block here
    else:
        assert ranges == [(w_gu.data_ptr(), w_gu.stride(0) * 2, 64 * row),
                          (w_gu.data_ptr() + I * row, w_gu.stride(0) * 2, 64 * row)]
    per_expert = sum(r[2] for r in ranges)
    for budget, limit in ((8, 3), (None, 100)):  # a cut union ranked by score; the whole kept list
        monkeypatch.setattr(kernels, "_PREFETCH_TOTAL", limit * per_expert)
        _cuda._C.emu_take_prefetches()
        plan = kernels.plan_routing(z, k, budget, plan=None, generation="v2", prefetch=(w_gu, layout))
        experts, want = _expected_prefetch(plan, ranges, limit)
        assert len(experts) == min(limit, plan.counts()["kept"])
        assert sorted(_cuda._C.emu_take_prefetches()) == _chunks(want)
        kernels.plan_routing(z, k, budget, generation="v1", prefetch=(w_gu, layout))
        assert _cuda._C.emu_take_prefetches() == [], "v1 does not prefetch"
    # The layer entry point plumbs the weights through.
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    w_dn = torch.randn((E, I, H) if layout.transposed else (E, H, I), generator=gen).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "_PREFETCH_TOTAL", 2 * per_expert)
    _cuda._C.emu_take_prefetches()
    y, plan = kernels.budgeted_moe_planned(x, z, w_gu, w_dn, k, 8, layout=layout, generation="v2")
    assert sorted(_cuda._C.emu_take_prefetches()) == _chunks(_expected_prefetch(plan, ranges, 2)[1])
    monkeypatch.setattr(kernels, "_PREFETCH_TOTAL", 0)
    kernels.budgeted_moe_planned(x, z, w_gu, w_dn, k, 8, layout=layout, generation="v2")
    assert _cuda._C.emu_take_prefetches() == [], "_PREFETCH_TOTAL = 0 turns the prefetch off"
    want, routing = reference.budgeted_moe(x, z, w_gu, w_dn, k, 8, layout=layout)
    assert torch.isfinite(y.float()).all()
    if torch.equal(plan.kept_experts[: plan.counts()["kept"]].long(), routing.kept_experts):  # no score tie
        scale = want.float().abs().max().item() + 1e-6
        torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2 * scale)
