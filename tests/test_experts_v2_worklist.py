"""Generation-2 expert kernel: the stream-K work list (docs/kernels-v2.md).

The persistent kernel splits a linear axis of weight stages (GEMM1 k-stages and GEMM2 row tiles of
every (expert, token block, I-slice) item) evenly over its CTAs, so items are cut mid-pass (the fp32
accumulator is handed to the next CTA), between passes, and between row tiles (h is published
through global memory and the row-tile owners wait for it). These tests run it against
`moespec.reference` at the work-list edge cases, with poisoned workspaces and outputs, and check
that deterministic mode gives the same bits whatever the grid size (the emulated SM count) and
the block/thread schedule. `_pieces` mirrors the kernel's split so the tests can assert that the
split paths they mean to cover really occur.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from moespec import _cuda, ops, reference
from moespec.types import ExpertLayout
from test_cuda_kernels import LAYOUTS, _assert_close_act, _poison_workspaces, _reshuffle, _weights

SLICE, BK = 128, 128  # I columns per item; k per GEMM1 stage = rows per GEMM2 tile


@contextlib.contextmanager
def _sms(kdev, n):
    """The emulated device with n SMs (grid = n persistent CTAs); on a GPU: its own count."""
    if not kdev.emulated or n is None:
        yield
        return
    C = _cuda._C
    old = C.emu_sms()
    C.emu_set_sms(n)
    try:
        yield
    finally:
        C.emu_set_sms(old)


def _pieces(token_counts, H, I, G):
    """Mirror of the kernel's split: for each item (expert with `token_counts[u]` tokens, block of
    32, slice) the CTAs' pieces as (cta, lo, hi) on the item's axis [row tiles | GEMM1 stages in
    descending (pass, k)]. Returns (pieces by item, items, kt1, rt2)."""
    kt1 = rt2 = -(-H // BK)
    ns = -(-I // SLICE)
    passes = [2 if min(SLICE, I - z * SLICE) > 64 else 1 for z in range(ns)]
    lens = [p * kt1 + rt2 for p in passes]
    items = []
    for c in token_counts:
        for _ in range(-(-c // 32)):
            items += [(z, lens[z]) for z in range(ns)]
    W = sum(L for _, L in items)
    out, P = [], 0
    for z, L in items:
        cut = []
        for c in range(G):
            lo, hi = max(W * c // G, P), min(W * (c + 1) // G, P + L)
            if lo < hi:
                cut.append((c, lo - P, hi - P))
        out.append(cut)
        P += L
    return out, items, kt1, rt2


def _split_kinds(token_counts, H, I, G):
    """Which split paths a launch takes: 'mid_pass' (a pass's accumulator handed on), 'h' (an
    item's h published for other CTAs), 'rows' (row tiles of one item on several CTAs)."""
    pieces, _, kt1, rt2 = _pieces(token_counts, H, I, G)
    kinds = set()
    for cut in pieces:
        if len(cut) < 2:
            continue
        kinds.add("h")
        for _, lo, hi in cut[1:]:
            if lo > rt2 and (lo - rt2) % kt1:
                kinds.add("mid_pass")
            if lo < rt2:
                kinds.add("rows")
    return kinds


def _run(kdev, x, w_gu, w_dn, ids, w, kept, det, layout=ExpertLayout(), b_gu=None, b_dn=None):
    return ops.moe_experts(x, w_gu, w_dn, ids.to(kdev.device).int(), w.to(kdev.device), kept, det, layout,
                           b_gate_up=b_gu, b_down=b_dn, backend=kdev.backend)


def _routing(gen, T, E, k, case):
    """topk ids [T, k], weights [T, k] and kept experts (or None) for a work-list edge case."""
    w = torch.rand(T, k, generator=gen) + 0.05
    if case == "one_expert_all_tokens":  # expert 3 on every token (slot 0), kept alone
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
        for t in range(T):
            row = ids[t][ids[t] != 3][: k - 1]
            ids[t] = torch.cat([torch.tensor([3]), row])
        return ids, w, torch.tensor([3])
    if case == "every_expert_one_token":  # k = 1, T = E: a permutation
        return torch.randperm(E, generator=gen)[:T].view(T, 1), w[:, :1], None
    if case == "items_eq_sms_plus_1":  # every expert once: E items of one token
        return torch.randperm(E, generator=gen).view(T, k), w, None
    ids = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
    if case == "c_equals_k":  # kept = the first token's k experts
        return ids, w, ids[0].clone()
    return ids, w, None


# (case, T, E, k, H, I, emulated SM counts); H, I multiples of 8 with row / K / slice tails.
EDGE_CASES = [
    ("one_expert_all_tokens", 70, 8, 2, 200, 264, (1, 5, 7)),  # 3 token blocks of one expert
    ("every_expert_one_token", 16, 16, 1, 136, 72, (5, 6)),
    ("t1", 1, 8, 4, 264, 136, (1, 5, 16)),
    ("c_equals_k", 3, 32, 4, 136, 200, (5, 7)),
    ("e256", 4, 256, 8, 136, 72, (5, 3)),
    ("items_lt_sms", 1, 8, 2, 136, 72, (5, 9)),  # 2 items on 5 or 9 CTAs
    ("items_eq_sms_plus_1", 3, 6, 2, 136, 72, (5,)),  # 6 experts x 1 item on 5 CTAs
]


@pytest.mark.parametrize("case,T,E,k,H,I,sms_list", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_worklist_edge_cases(kdev, case, T, E, k, H, I, sms_list, gen, monkeypatch):
    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    dtype = torch.bfloat16
    w_gu, w_dn, _, _ = _weights(gen, E, H, I, ExpertLayout(), dtype, False, kdev.device)
    x = torch.randn(T, H, generator=gen).to(dtype).to(kdev.device)
    ids, w, kept = _routing(gen, T, E, k, case)
    if case == "items_eq_sms_plus_1":
        assert torch.unique(ids).numel() == 6 and -(-I // SLICE) == 1
    kept_dev = None if kept is None else kept.to(kdev.device)
    want = reference.moe_experts(x, w_gu, w_dn, ids.to(kdev.device), w.to(kdev.device), kept_dev)
    _poison_workspaces(kdev, monkeypatch)
    first = None
    for sms in (sms_list if kdev.emulated else (None,)):
        with _sms(kdev, sms):
            got = _run(kdev, x, w_gu, w_dn, ids, w, kept_dev, True)
            _assert_close_act(got, want)
            _reshuffle(kdev)
            fast = _run(kdev, x, w_gu, w_dn, ids, w, kept_dev, False)
            _assert_close_act(fast, want)
        if first is None:
            first = got
        assert torch.equal(got, first), f"deterministic bits changed with the grid ({sms} CTAs)"


def test_edge_cases_cover_the_split_paths():
    """The shapes above (and the layout test's) do take every split path of the kernel."""
    one = _split_kinds([70], 200, 264, 5) | _split_kinds([70], 200, 264, 7)
    t1 = set().union(*(_split_kinds([1] * 4, 264, 136, g) for g in (5, 16)))
    assert {"mid_pass", "h", "rows"} <= one | t1, one | t1
    assert _split_kinds([1] * 6, 136, 72, 5) >= {"h"}
    assert _split_kinds([3] * 4, 520, 264, 7) == {"h", "mid_pass", "rows"}
    # items < SMs: every item cut over several CTAs, no CTA without work.
    pieces, items, _, _ = _pieces([1, 1], 136, 72, 9)
    assert len(items) == 2 and {c for cut in pieces for c, _, _ in cut} == set(range(9))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_split_items_every_layout(kdev, layout_name, dtype, gen, monkeypatch):
    """Items split mid-pass, between passes and between row tiles, in every weight layout (gpt-oss:
    biases and its clamped activation), bf16 and fp16, deterministic and atomic."""
    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    layout, bias = LAYOUTS[layout_name]
    T, E, k, H, I = 3, 4, 4, 520, 264  # every expert has 3 tokens: 4 items of kt1 = 5, 3 slices
    w_gu, w_dn, b_gu, b_dn = _weights(gen, E, H, I, layout, dtype, bias, kdev.device)
    x = torch.randn(T, H, generator=gen).to(dtype).to(kdev.device)
    ids = torch.stack([torch.randperm(E, generator=gen) for _ in range(T)])
    w = torch.rand(T, k, generator=gen) + 0.05
    want = reference.moe_experts(x, w_gu, w_dn, ids.to(kdev.device), w.to(kdev.device), None, b_gate_up=b_gu,
                                 b_down=b_dn, layout=layout)
    _poison_workspaces(kdev, monkeypatch)
    outs = []
    for sms in ((7, 3) if kdev.emulated else (None,)):
        with _sms(kdev, sms):
            outs.append(_run(kdev, x, w_gu, w_dn, ids, w, None, True, layout, b_gu, b_dn))
            _assert_close_act(outs[-1], want)
            _assert_close_act(_run(kdev, x, w_gu, w_dn, ids, w, None, False, layout, b_gu, b_dn), want)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_bits_independent_of_grid_and_schedule(kdev, gen, monkeypatch):
    """Deterministic mode: the same bits for 1..13 CTAs and fresh block/thread orders, and the
    same bits as one CTA doing every item whole (no split at all)."""
    if not kdev.emulated:
        pytest.skip("the grid size is the GPU's SM count; the emulator varies it")
    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    T, E, k, H, I = 5, 8, 2, 264, 200
    w_gu, w_dn, _, _ = _weights(gen, E, H, I, ExpertLayout(), torch.bfloat16, False, kdev.device)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    ids = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
    w = torch.rand(T, k, generator=gen) + 0.05
    want = reference.moe_experts(x, w_gu, w_dn, ids, w, None)
    _poison_workspaces(kdev, monkeypatch)
    with _sms(kdev, 1):
        base = _run(kdev, x, w_gu, w_dn, ids, w, None, True)
    _assert_close_act(base, want)
    counts = torch.bincount(ids.flatten(), minlength=E)
    kinds = set()
    for sms in (2, 3, 4, 5, 6, 7, 9, 13):
        kinds |= _split_kinds([c for c in counts.tolist() if c], H, I, sms)
        with _sms(kdev, sms):
            for _ in range(2):
                _reshuffle(kdev)
                got = _run(kdev, x, w_gu, w_dn, ids, w, None, True)
                assert torch.equal(got, base), f"{sms} CTAs"
    assert kinds == {"h", "mid_pass", "rows"}, kinds


def test_counters_buffer_sized_by_the_sm_count(kdev):
    """The counters buffer holds T counters plus the stream-K workspace of one slot per CTA."""
    if not kdev.emulated:
        pytest.skip("emulator only")
    C = _cuda._C
    with _sms(kdev, 5):
        n5 = C.experts_v2_counters_len(7)
    with _sms(kdev, 6):
        n6 = C.experts_v2_counters_len(7)
    per_cta = 3 + 2 * 128 * 32 + 32 * 128 // 2  # 3 flags, fp32 accumulators of 2 passes, a 16-bit h tile
    assert per_cta <= n6 - n5 <= per_cta + 3 and n5 >= 7 + 5 * per_cta  # + 16-byte alignment
