"""The CUDA kernels against `moespec.reference` (run with ``pytest -m cuda`` on a GPU).

Routing decisions must match bitwise (union, kept set, re-routed ids); the only tolerated
difference is an exact or 1e-6-relative tie between two candidates, where the kernel breaks the
tie towards the lower id and torch.topk's order is unspecified. Expert math must match to
dtype tolerance, outputs are poisoned with NaN before the kernels write them, NaN never passes.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from moespec import _cuda, ops, reference
from moespec.types import ExpertLayout

pytestmark = pytest.mark.cuda

TS = [1, 2, 3, 8, 17, 64]
ES = [8, 60, 64, 128, 256]
KS = [1, 2, 4, 6, 8]
GRID = [(T, E, k) for T, E, k in itertools.product(TS, ES, KS) if k <= E]


def _kernels():
    for name in ("expert_union", "score_experts", "budget_routing", "moe_experts"):
        if not _cuda.has_kernel(name):
            pytest.skip(f"moespec._C has no kernel {name}")
    from moespec import kernels

    return kernels


def _logits(gen, T, E, dtype=torch.float32, scale=2.0):
    return (torch.randn(T, E, generator=gen) * scale).to(dtype).cuda()


def _rand_routing(gen, T, E, k, duplicates=False):
    if duplicates:
        ids = torch.randint(0, E, (T, k), generator=gen)
    else:
        ids = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
    w = torch.rand(T, k, generator=gen) + 0.05
    return ids, w


def _poison_allocator():
    """Fill freed blocks of torch's caching allocator with NaN so that workspaces start poisoned."""
    blocks = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(64)]  # small pool
    blocks += [torch.full((8 << 20,), float("nan"), device="cuda") for _ in range(4)]  # large pool
    del blocks


# ----------------------------------------------------------------------------- routing


def _same_pick(probs_row, a, b, rel=1e-6):
    """Two expert ids are an acceptable pair of picks when their probabilities tie."""
    pa, pb = float(probs_row[a]), float(probs_row[b])
    return abs(pa - pb) <= rel * max(abs(pa), abs(pb), 1e-30)


def _check_ids(ids_k, ids_r, probs):
    ids_k, ids_r = ids_k.cpu().long(), ids_r.cpu().long()
    bad = (ids_k != ids_r).nonzero().tolist()
    for t, s in bad:
        assert _same_pick(probs[t], ids_k[t, s], ids_r[t, s]), (
            f"token {t} slot {s}: kernel picked {int(ids_k[t, s])}, reference {int(ids_r[t, s])}")
    return not bad


def _kept_near_tie(scores, kept_k, kept_r, rel=1e-5):
    diff = set(kept_k.tolist()) ^ set(kept_r.tolist())
    if not diff:
        return False
    # A legitimate difference swaps experts whose scores tie with the boundary (the C-th best score).
    edge = min(float(scores[e]) for e in kept_r.tolist()) if kept_r.numel() else 0.0
    return all(abs(float(scores[e]) - edge) <= rel * abs(edge) + 1e-12 for e in diff)


@pytest.mark.parametrize("T,E,k", GRID)
def test_expert_union_matches_reference(T, E, k, gen):
    _kernels()
    for duplicates, id_dtype in ((False, torch.int64), (True, torch.int32)):
        ids, _ = _rand_routing(gen, T, E, k, duplicates)
        ids = ids.to(id_dtype)
        got = ops.expert_union(ids.cuda(), E, backend="cuda")
        want = reference.expert_union(ids, E)
        for field in ("experts", "offsets", "pair_token", "pair_slot", "pair_position"):
            a, b = getattr(got, field).cpu(), getattr(want, field)
            assert a.dtype == torch.int32 and torch.equal(a, b), field


@pytest.mark.parametrize("T,E,k", GRID[::3])
def test_score_experts_matches_reference(T, E, k, gen):
    _kernels()
    for dtype in (torch.float32, torch.bfloat16):
        z = _logits(gen, T, E, dtype)
        got = ops.score_experts(z, "prob", backend="cuda")
        want = reference.score_experts(z.cpu(), "prob")
        assert got.dtype == torch.float32 and got.shape == (E,)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    ids, w = _rand_routing(gen, T, E, k)
    for wd in (torch.float32, torch.float16):
        got = ops.score_experts(z, "topk", ids.cuda(), w.to(wd).cuda(), backend="cuda")
        want = reference.score_experts(z.cpu(), "topk", ids, w.to(wd))
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


def _budgets(union):
    return sorted({max(1, union // 2), max(1, union - 1), union, union + 3})


@pytest.mark.parametrize("T,E,k", GRID)
def test_budget_routing_matches_reference(T, E, k, gen):
    _kernels()
    z = _logits(gen, T, E)
    zc = z.cpu()
    probs = torch.softmax(zc, dim=-1)
    union = int(torch.unique(probs.topk(k, dim=-1).indices).numel())
    cases = [dict(budget=None)]
    for b in _budgets(union):
        if b < k:
            continue
        for policy, renorm, score in (("substitute", True, "prob"), ("truncate", False, "prob"),
                                      ("substitute", False, "topk"), ("truncate", True, "topk")):
            cases.append(dict(budget=b, policy=policy, renormalize=renorm, score=score))
    cases.append(dict(budget=None, coverage=0.5, renormalize=True))
    cases.append(dict(budget=max(k, union - 1), coverage=0.9, min_budget=k, policy="truncate"))
    for case in cases:
        got = ops.budget_routing(z, k, backend="cuda", **case)
        want = reference.budget_routing(zc, k, **case)
        assert got.union_size == want.union_size, case
        if not torch.equal(got.kept_experts.cpu(), want.kept_experts):
            # Only a tie in scores may change the kept set; then the rest legitimately differs.
            unb = reference.budget_routing(zc, k, None, renormalize=case.get("renormalize", False))
            sc = (reference.score_experts(zc, "topk", unb.topk_ids, unb.topk_weights)
                  if case.get("score") == "topk" else probs.sum(0))
            assert _kept_near_tie(sc, got.kept_experts.cpu(), want.kept_experts), (
                case, got.kept_experts.tolist(), want.kept_experts.tolist())
            continue
        assert got.budgeted == want.budgeted, case
        assert got.topk_ids.dtype == torch.int64 and got.topk_weights.dtype == torch.float32
        if _check_ids(got.topk_ids, want.topk_ids, probs):
            assert torch.isfinite(got.topk_weights).all()
            torch.testing.assert_close(got.topk_weights.cpu(), want.topk_weights, rtol=1e-5, atol=1e-6)


def test_budget_routing_half_logits(gen):
    _kernels()
    for dtype in (torch.bfloat16, torch.float16):
        z = _logits(gen, 16, 128, dtype)
        got = ops.budget_routing(z, 8, 16, backend="cuda")
        want = reference.budget_routing(z.cpu(), 8, 16)
        probs = torch.softmax(z.cpu().float(), -1)
        if torch.equal(got.kept_experts.cpu(), want.kept_experts):
            _check_ids(got.topk_ids, want.topk_ids, probs)


def test_routing_plan_is_deterministic_and_capturable(gen):
    k_ = _kernels()
    T, E, k = 17, 128, 8
    z = _logits(gen, T, E)
    plan = k_.plan_routing(z, k, 24, renormalize=True)
    first = [t.clone() for t in (plan.ids, plan.weights, plan.meta, plan.kept_experts, plan.act_offsets,
                                 plan.pair_token, plan.pair_position)]
    k_.plan_routing(z, k, 24, renormalize=True, plan=plan)
    again = (plan.ids, plan.weights, plan.meta, plan.kept_experts, plan.act_offsets, plan.pair_token,
             plan.pair_position)
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    static_z = z.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k_.plan_routing(static_z, k, 24, renormalize=True, plan=plan)
    z2 = _logits(gen, T, E)
    static_z.copy_(z2)
    graph.replay()
    torch.cuda.synchronize()
    want = reference.budget_routing(z2.cpu(), k, 24, renormalize=True)
    c = plan.counts()
    assert c["union"] == want.union_size and c["budgeted"] == want.budgeted
    kept = plan.kept_experts[:c["kept"]].cpu()
    if torch.equal(kept, want.kept_experts):
        _check_ids(plan.ids, want.topk_ids, torch.softmax(z2.cpu(), -1))


# ----------------------------------------------------------------------------- experts

LAYOUTS = {
    "v5": (ExpertLayout(), False),
    "up_gate": (ExpertLayout(gate_up="up_gate"), False),
    "transposed": (ExpertLayout(transposed=True), False),
    "gpt_oss": (ExpertLayout.gpt_oss(), True),
}


def _weights(gen, E, H, I, layout, dtype, bias):
    gu_shape = (E, H, 2 * I) if layout.transposed else (E, 2 * I, H)
    dn_shape = (E, I, H) if layout.transposed else (E, H, I)
    w_gu = (torch.randn(gu_shape, generator=gen) / H ** 0.5).to(dtype).cuda()
    w_dn = (torch.randn(dn_shape, generator=gen) / I ** 0.5).to(dtype).cuda()
    b_gu = (torch.randn(E, 2 * I, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    b_dn = (torch.randn(E, H, generator=gen) * 0.1).to(dtype).cuda() if bias else None
    return w_gu, w_dn, b_gu, b_dn


def _assert_close_act(got, want, tol=1e-2):
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.float(), want.float()
    assert torch.isfinite(g).all(), "non-finite values in the kernel output (unwritten or NaN)"
    scale = w.abs().max().item() + 1e-6
    torch.testing.assert_close(g, w, rtol=tol, atol=tol * scale)
    assert (g - w).norm() <= tol * w.norm() + 1e-6


EXPERT_GRID = [(T, E, k) for T, E, k in itertools.product(TS, [8, 60, 128, 256], [1, 2, 4, 8]) if k <= E]


@pytest.mark.parametrize("T,E,k", EXPERT_GRID)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_experts_matches_reference(T, E, k, dtype, gen):
    k_ = _kernels()
    H, I = (136, 72) if (T + E) % 2 else (200, 264)  # multiples of 8, not of 64; row and K tails
    name = list(LAYOUTS)[(T + E + k) % len(LAYOUTS)]
    layout, bias = LAYOUTS[name]
    w_gu, w_dn, b_gu, b_dn = _weights(gen, E, H, I, layout, dtype, bias)
    x = torch.randn(T, H, generator=gen).to(dtype).cuda()
    ids, w = _rand_routing(gen, T, E, k)
    w[0, 0] = 0.0  # a zero-weight pair costs nothing and contributes nothing
    ids, w = ids.cuda(), w.cuda()
    kept = torch.unique(ids)[: max(1, torch.unique(ids).numel() * 2 // 3)].to(torch.int32)
    for kept_arg in (None, kept) if T != 3 else (None, kept, kept[:0]):  # kept[:0]: nothing may run
        want = reference.moe_experts(x, w_gu, w_dn, ids, w, kept_arg, b_gate_up=b_gu, b_down=b_dn, layout=layout)
        _poison_allocator()
        plan = k_.plan_from_routing(ids, w, E, kept_arg)
        out = torch.full((T, H), float("nan"), dtype=dtype, device="cuda")
        got = k_.moe_experts_planned(x, w_gu, w_dn, plan, layout, b_gu, b_dn, True, out=out)
        _assert_close_act(got, want)
        again = ops.moe_experts(x, w_gu, w_dn, ids, w, kept_arg, True, layout, b_gate_up=b_gu, b_down=b_dn,
                                backend="cuda")
        assert torch.equal(again, got), "deterministic mode must repeat bitwise"
        fast = ops.moe_experts(x, w_gu, w_dn, ids, w, kept_arg, False, layout, b_gate_up=b_gu, b_down=b_dn,
                               backend="cuda")
        _assert_close_act(fast, want)


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_moe_experts_layouts_and_weight_dtypes(layout_name, gen):
    k_ = _kernels()
    del k_
    layout, bias = LAYOUTS[layout_name]
    # H, I = 1032: 17 K stages, so the few-expert case (3 kept) splits K in both GEMMs.
    T, E, k, H, I = 17, 60, 4, 1032, 1032
    w_gu, w_dn, b_gu, b_dn = _weights(gen, E, H, I, layout, torch.bfloat16, bias)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    ids, w = _rand_routing(gen, T, E, k)
    few = torch.unique(ids)[:3].cuda()
    for wd, kept in ((torch.float32, None), (torch.bfloat16, None), (torch.float32, few)):
        wc = w.to(wd).cuda()
        want = reference.moe_experts(x, w_gu, w_dn, ids.cuda(), wc, kept, b_gate_up=b_gu, b_down=b_dn,
                                     layout=layout)
        got = ops.moe_experts(x, w_gu, w_dn, ids.cuda().int(), wc, kept, True, layout, b_gate_up=b_gu,
                              b_down=b_dn, backend="cuda")
        _assert_close_act(got, want)
        again = ops.moe_experts(x, w_gu, w_dn, ids.cuda().int(), wc, kept, True, layout, b_gate_up=b_gu,
                                b_down=b_dn, backend="cuda")
        assert torch.equal(got, again)


def test_moe_experts_fp32_falls_back_to_reference(gen):
    _kernels()
    T, E, k, H, I = 5, 8, 2, 64, 32
    w_gu, w_dn, _, _ = _weights(gen, E, H, I, ExpertLayout(), torch.float32, False)
    x = torch.randn(T, H, generator=gen).cuda()
    ids, w = _rand_routing(gen, T, E, k)
    got = ops.moe_experts(x, w_gu, w_dn, ids.cuda(), w.cuda(), backend="cuda")
    want = reference.moe_experts(x, w_gu, w_dn, ids.cuda(), w.cuda())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 8, 64])
@pytest.mark.parametrize("policy", ["substitute", "truncate"])
def test_budgeted_layer_matches_reference(T, policy, gen):
    k_ = _kernels()
    E, k, H, I = 64, 8, 1032, 1032  # small T keeps few experts: both GEMMs split K (deterministically)
    layout = ExpertLayout()
    w_gu, w_dn, _, _ = _weights(gen, E, H, I, layout, torch.bfloat16, False)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    z = _logits(gen, T, E)
    for budget in (None, 8, 16, 64):
        want_y, want_r = reference.budgeted_moe(x, z, w_gu, w_dn, k, budget, policy, renormalize=True)
        y, plan = k_.budgeted_moe_planned(x, z, w_gu, w_dn, k, budget, policy, renormalize=True)
        c = plan.counts()
        if not torch.equal(plan.kept_experts[:c["kept"]].cpu(), want_r.kept_experts.cpu()):
            continue  # a score tie (checked by test_budget_routing_matches_reference)
        if not _check_ids(plan.ids, want_r.topk_ids, torch.softmax(z.cpu(), -1)):
            continue
        _assert_close_act(y, want_y)
        again, _ = k_.budgeted_moe_planned(x, z, w_gu, w_dn, k, budget, policy, renormalize=True, plan=plan)
        assert torch.equal(again, y), "deterministic mode must repeat bitwise (split-K included)"


def test_cuda_graph_capture_and_replay(gen):
    k_ = _kernels()
    T, E, k, H, I = 8, 128, 8, 136, 72
    layout = ExpertLayout()
    w_gu, w_dn, _, _ = _weights(gen, E, H, I, layout, torch.bfloat16, False)
    sx = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    sz = _logits(gen, T, E)
    plan = k_.RoutingPlan.empty(T, E, k, "cuda")
    out = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
    k_.budgeted_moe_planned(sx, sz, w_gu, w_dn, k, 16, renormalize=True, plan=plan, out=out)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k_.budgeted_moe_planned(sx, sz, w_gu, w_dn, k, 16, renormalize=True, plan=plan, out=out)
    for _ in range(3):
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
        z = _logits(gen, T, E)
        sx.copy_(x)
        sz.copy_(z)
        out.fill_(float("nan"))
        graph.replay()
        eager, _ = k_.budgeted_moe_planned(x, z, w_gu, w_dn, k, 16, renormalize=True)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), "graph replay must equal the eager launch bitwise"
        want, _ = reference.budgeted_moe(x, z, w_gu, w_dn, k, 16, renormalize=True)
        if torch.isfinite(want.float()).all():
            _assert_close_act(out, want)


def test_ops_moe_experts_capturable_and_ignores_bad_ids_in_capture(gen):
    _kernels()
    T, E, k, H, I = 4, 16, 2, 64, 32
    w_gu, w_dn, _, _ = _weights(gen, E, H, I, ExpertLayout(), torch.float16, False)
    x = torch.randn(T, H, generator=gen).half().cuda()
    ids, w = _rand_routing(gen, T, E, k)
    ids, w = ids.cuda(), w.cuda()
    bad = ids.clone()
    bad[0, 0] = E + 5  # ops.py cannot check ranges during capture; the kernels must ignore it
    bad[1, 1] = -3
    ops.moe_experts(x, w_gu, w_dn, ids, w)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.moe_experts(x, w_gu, w_dn, bad, w)
    graph.replay()
    torch.cuda.synchronize()
    w_ok = w.clone()
    w_ok[0, 0] = 0.0
    w_ok[1, 1] = 0.0
    want = reference.moe_experts(x, w_gu, w_dn, ids, w_ok)
    _assert_close_act(y, want)


def test_bad_input_gives_clear_errors(gen):
    k_ = _kernels()
    z = _logits(gen, 4, 8)
    with pytest.raises(ValueError):
        ops.budget_routing(z, 2, 1, backend="cuda")  # budget < top_k
    with pytest.raises(ValueError):
        ops.expert_union(torch.tensor([[0, 9]], device="cuda"), 8, backend="cuda")
    with pytest.raises(ValueError, match="routing plan supports"):
        k_.plan_routing(_logits(gen, 2, 4096), 2)
    # Too many experts for the single-CTA plan: the op falls back to the reference.
    big = _logits(gen, 3, 2048)
    got = ops.budget_routing(big, 2, 4, backend="cuda")
    want = reference.budget_routing(big, 2, 4)
    assert torch.equal(got.kept_experts.cpu(), want.kept_experts.cpu())


def test_nan_logits_never_crash_or_index_out_of_bounds(gen):
    """Garbage in (NaN / all -inf rows) must not make the plan read or write out of bounds."""
    k_ = _kernels()
    T, E, k = 8, 64, 4
    z = _logits(gen, T, E)
    z[1] = float("nan")
    z[2] = float("-inf")
    for budget, policy in ((None, "substitute"), (8, "substitute"), (8, "truncate")):
        plan = k_.plan_routing(z, k, budget, policy, renormalize=True)
        torch.cuda.synchronize()
        ids = plan.ids.cpu()
        assert ((ids >= -1) & (ids < E)).all()
        c = plan.counts()
        assert 0 <= c["kept"] <= E and 0 <= c["active"] <= c["kept"]
        # Healthy rows still route like the reference.
        want = reference.budget_routing(z[3:].cpu(), k, None, renormalize=True)
        if budget is None:
            _check_ids(plan.ids[3:], want.topk_ids, torch.softmax(z[3:].cpu(), -1))
