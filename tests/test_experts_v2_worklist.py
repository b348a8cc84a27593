"""Generation-2 expert kernel: the stream-K work list (docs/kernels-v2.md).

The persistent kernel splits a linear axis of weight units (GEMM1 column units of 8 intermediate
columns over all of K, GEMM2 row tiles over the whole slice, of every (expert, token block, I-slice)
item) evenly over its CTAs, so items are cut inside a pass, between passes and between row tiles;
a split item's h goes through global memory and its row-tile owners wait for it. One cp.async ring
runs through all the pieces of a CTA. These tests run it against
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
ITEM = 64  # tokens per item at most (sm_90 and the emulator; sm_80 builds keep 32)


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


def _units(nc, nr, kt1):
    """An item's units in axis order, as the kernel interleaves them: ("c", column unit) of kt1
    eighths of a stage and ("r", row tile) of 8 eighths."""
    out, c, r = [], 0, 0
    while c < nc or r < nr:
        if r == nr or (c < nc and (c + 1) * nr <= (r + 1) * nc):
            out.append(("c", c, kt1))
            c += 1
        else:
            out.append(("r", r, 8))
            r += 1
    return out


def _pieces(token_counts, H, I, G):
    """Mirror of the kernel's split: per item (expert with `token_counts[u]` tokens, block of ITEM,
    slice) the owning CTA of each unit, as {cta: ([column units], [row tiles])}; a unit belongs to
    the CTA whose share [W*c/G, W*(c+1)/G) holds its start. Returns (pieces by item, items, rt2)."""
    kt1 = rt2 = -(-H // BK)
    ns = -(-I // SLICE)
    passes = [2 if min(SLICE, I - z * SLICE) > 64 else 1 for z in range(ns)]
    items = []
    for cnt in token_counts:
        for _ in range(-(-cnt // ITEM)):
            items += [(z, 8 * passes[z]) for z in range(ns)]
    W = sum(nc * kt1 + 8 * rt2 for _, nc in items)
    out, P = [], 0
    for z, nc in items:
        own = {}
        for kind, idx, w in _units(nc, rt2, kt1):
            cta = next(c for c in range(G) if W * c // G <= P < W * (c + 1) // G)
            own.setdefault(cta, ([], []))[0 if kind == "c" else 1].append(idx)
            P += w
        out.append(own)
    return out, items, rt2


def _split_kinds(token_counts, H, I, G):
    """Which split paths a launch takes: 'h' (an item on several CTAs: h through global memory),
    'cols' (one pass's columns on several CTAs), 'rows' (row tiles of one item on several CTAs),
    'gemm1_only' / 'rows_only' (a CTA with only one kind of unit of a split item)."""
    pieces, _, _ = _pieces(token_counts, H, I, G)
    kinds = set()
    for own in pieces:
        if len(own) < 2:
            continue
        kinds.add("h")
        passes_of = [{c // 8 for c in cols} for cols, _ in own.values()]
        if any(len([1 for ps in passes_of if p in ps]) > 1 for p in (0, 1)):
            kinds.add("cols")
        if sum(1 for _, rows in own.values() if rows) > 1:
            kinds.add("rows")
        for cols, rows in own.values():
            kinds.add("gemm1_only" if not rows else ("rows_only" if not cols else "both"))
    return kinds


def _cta_pieces(token_counts, H, I, G):
    """Per CTA, the stage counts of its pieces in the order the kernel runs them (split items'
    GEMM1 units, whole items, split items' row tiles): one cp.async ring runs through them."""
    pieces, items, rt2 = _pieces(token_counts, H, I, G)
    kt1 = rt2
    out = {c: [[], [], []] for c in range(G)}
    for (z, nc), own in zip(items, pieces):
        for c, (cols, rows) in own.items():
            gemm1 = len({u // 8 for u in cols}) * kt1
            if len(own) == 1:
                out[c][1].append(gemm1 + len(rows))
            else:
                if cols:
                    out[c][0].append(gemm1)
                if rows:
                    out[c][2].append(len(rows))
    return {c: a + b + d for c, (a, b, d) in out.items()}


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
    """The shapes of these tests do take every split path of the kernel."""
    every = {"h", "cols", "rows", "gemm1_only", "rows_only", "both"}
    seen = set()
    for case, T, E, k, H, I, sms_list in EDGE_CASES:
        counts = {"one_expert_all_tokens": [T], "every_expert_one_token": [1] * T, "t1": [1] * k,
                  "items_lt_sms": [1] * k, "items_eq_sms_plus_1": [1] * 6}.get(case)
        if counts is not None:
            for g in sms_list:
                seen |= _split_kinds(counts, H, I, g)
    layouts = _split_kinds([3] * 4, 520, 264, 7) | _split_kinds([3] * 4, 520, 264, 3)  # test_split_items_every_layout
    assert {"h", "cols", "rows", "rows_only"} <= layouts, layouts
    assert seen | layouts == every, seen | layouts
    # The ring runs across pieces shorter than its lookahead (3 stages): the load cursor is then
    # more than one piece ahead of the compute cursor.
    short = [ps for ps in _cta_pieces([1] * 16, 136, 72, 5).values() if any(n < 3 for n in ps[:-1])]
    assert short and max(len(ps) for ps in short) >= 4, short
    # items < SMs: both items cut over the 9 CTAs, every CTA with work.
    pieces, items, _ = _pieces([1, 1], 136, 72, 9)
    assert len(items) == 2 and set().union(*pieces) == set(range(9))


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
    assert {"h", "cols", "rows"} <= kinds, kinds


def test_counters_buffer_sized_by_the_grid(kdev):
    """The grid is the SM count x the CTAs per SM the occupancy calculator allows (one: the kernel's
    shared memory), and the counters buffer holds an h flag per CTA (16-byte aligned), then a 16-bit
    h tile [64 tokens, 128 columns] per CTA."""
    if not kdev.emulated:
        pytest.skip("emulator only")
    C = _cuda._C
    for sms in (5, 6):
        with _sms(kdev, sms):
            assert C.experts_v2_grid() == sms
    for G in (1, 5, 6, 133):
        assert C.experts_v2_counters_len(G) == ((G + 3) // 4) * 4 + G * (ITEM * 128 // 2)
    assert C.experts_v2_counters_len(0) == -1


@pytest.mark.parametrize("deterministic", [True, False])
def test_state_left_zero_for_the_next_launch(kdev, gen, deterministic, monkeypatch):
    """The v2 expert kernel needs its counters (and, atomic mode, its accumulator) zero on entry and
    no memset runs before it (it is a programmatic dependent of the plan): every launch must leave
    them zero. One plan is reused across launches, grid sizes and routings; every result must match
    the reference, and the deterministic bits must repeat."""
    from moespec import kernels

    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    T, E, k, H, I = 12, 8, 2, 136, 200
    dtype = torch.bfloat16
    w_gu, w_dn, _, _ = _weights(gen, E, H, I, ExpertLayout(), dtype, False, kdev.device)
    x = torch.randn(T, H, generator=gen).to(dtype).to(kdev.device)
    _poison_workspaces(kdev, monkeypatch)
    plan = kernels.RoutingPlan.empty(T, E, k, kdev.device)
    first = {}
    for rep, sms in enumerate((5, 3, 7, 5) if kdev.emulated else (None,) * 3):
        ids, w, _ = _routing(gen, T, E, k, "random")
        ids, w = ids.to(kdev.device), w.to(kdev.device)
        if rep == 3:
            ids, w = first["ids"], first["w"]
        want = reference.moe_experts(x, w_gu, w_dn, ids, w, None)
        with _sms(kdev, sms):
            kernels.plan_from_routing(ids.int(), w, E, plan=plan)
            got = kernels.moe_experts_planned(x, w_gu, w_dn, plan, deterministic=deterministic)
            G = _cuda._C.emu_sms() if kdev.emulated else torch.cuda.get_device_properties(kdev.device).multi_processor_count
        _assert_close_act(got, want)
        # The split items' h flags (the h tiles after them are workspace): the combine kernel zeroes them.
        assert not plan.expert_counters[:G].any(), "flags left non-zero for the next launch"
        if deterministic:
            assert plan.expert_accum is None
        else:
            assert plan.expert_accum is not None and not plan.expert_accum.any(), "accumulator left non-zero"
        if rep == 0:
            first = {"ids": ids, "w": w, "got": got}
        if rep == 3 and deterministic:
            assert torch.equal(got, first["got"]), "a reused plan changed the deterministic bits"


# Items of up to 64 tokens (both 32-token blocks per weight stage): tokens per expert around the
# item width, so that items of 33-64 tokens, exactly 64, 64 + a tail and <= 32 all occur.
def _item_tokens(token_counts, I):
    """Tokens of every item in work-axis order (mirror of the kernel's item list)."""
    ns = -(-I // SLICE)
    return [min(ITEM, cnt - b * ITEM) for cnt in token_counts for b in range(-(-cnt // ITEM)) for _ in range(ns)]


def _routing_counts(gen, counts, k):
    """topk ids [T, k] with slot 0 = expert 0 on every token (T = counts[0]) and slot 1 walking
    experts 1.. with counts[1:] tokens each (sum(counts[1:]) == T); random weights."""
    T = counts[0]
    assert k == 2 and sum(counts[1:]) == T
    slot1 = torch.cat([torch.full((c,), u + 1) for u, c in enumerate(counts[1:])])
    slot1 = slot1[torch.randperm(T, generator=gen)]  # the pairs of an expert are not consecutive tokens
    ids = torch.stack([torch.zeros(T, dtype=torch.long), slot1], dim=1)
    return ids, torch.rand(T, k, generator=gen) + 0.05


WIDE_COUNTS = [90, 45, 33, 12]  # items of 64 + 26, 45, 33 and 12 tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_wide_items_every_layout(kdev, layout_name, dtype, gen, monkeypatch):
    """Experts with 33-64 and 65-130 tokens (one item of up to 64 tokens per weight stage), in
    every weight layout (gpt-oss: biases, clamped activation), bf16 and fp16, deterministic and
    atomic, whole and split items, against the reference; deterministic bits equal across grids."""
    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    layout, bias = LAYOUTS[layout_name]
    E, k, H, I = 4, 2, 264, 200
    w_gu, w_dn, b_gu, b_dn = _weights(gen, E, H, I, layout, dtype, bias, kdev.device)
    ids, w = _routing_counts(gen, WIDE_COUNTS, k)
    T = ids.shape[0]
    x = torch.randn(T, H, generator=gen).to(dtype).to(kdev.device)
    want = reference.moe_experts(x, w_gu, w_dn, ids.to(kdev.device), w.to(kdev.device), None, b_gate_up=b_gu,
                                 b_down=b_dn, layout=layout)
    _poison_workspaces(kdev, monkeypatch)
    outs = []
    for sms in ((1, 3, 7) if kdev.emulated else (None,)):  # 3 and 7 CTAs split items of 33, 45 and 64 tokens
        with _sms(kdev, sms):
            outs.append(_run(kdev, x, w_gu, w_dn, ids, w, None, True, layout, b_gu, b_dn))
            _assert_close_act(outs[-1], want)
            _reshuffle(kdev)
            _assert_close_act(_run(kdev, x, w_gu, w_dn, ids, w, None, False, layout, b_gu, b_dn), want)
    assert all(torch.equal(o, outs[0]) for o in outs), "deterministic bits changed with the grid"


@pytest.mark.parametrize("counts", [[130, 64, 65, 1], [64, 33, 31], [33, 32, 1]],
                         ids=["64+64+2", "exactly_64", "33"])
def test_wide_items_bits_independent_of_grid_and_schedule(kdev, counts, gen, monkeypatch):
    """Deterministic mode with items of up to 64 tokens (130 = 64 + 64 + 2, exactly 64, 65 = 64 + 1,
    33): the same bits for 1..13 CTAs and fresh block/thread orders, against the reference."""
    if not kdev.emulated:
        pytest.skip("the grid size is the GPU's SM count; the emulator varies it")
    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    E, k, H, I = len(counts), 2, 136, 200
    w_gu, w_dn, _, _ = _weights(gen, E, H, I, ExpertLayout(), torch.bfloat16, False, kdev.device)
    ids, w = _routing_counts(gen, counts, k)
    x = torch.randn(ids.shape[0], H, generator=gen).to(torch.bfloat16)
    want = reference.moe_experts(x, w_gu, w_dn, ids, w, None)
    _poison_workspaces(kdev, monkeypatch)
    with _sms(kdev, 1):
        base = _run(kdev, x, w_gu, w_dn, ids, w, None, True)
    _assert_close_act(base, want)
    for sms in (2, 5, 7, 13):
        with _sms(kdev, sms):
            _reshuffle(kdev)
            got = _run(kdev, x, w_gu, w_dn, ids, w, None, True)
            assert torch.equal(got, base), f"{sms} CTAs"


def test_wide_items_cover_the_paths():
    """The wide-item tests do run items of 33-64 tokens, of exactly 64, 64 + a tail and <= 32
    tokens, and wide items whose h goes through global memory (split over CTAs)."""
    toks = _item_tokens(WIDE_COUNTS, 200)
    assert max(toks) == ITEM and any(32 < t < ITEM for t in toks) and any(t <= 32 for t in toks)
    assert _item_tokens([130], 128) == [64, 64, 2]
    for counts, H, G in ((WIDE_COUNTS, 264, 3), (WIDE_COUNTS, 264, 7), ([130, 64, 65, 1], 136, 5),
                         ([130, 64, 65, 1], 136, 13), ([64, 33, 31], 136, 5), ([33, 32, 1], 136, 5)):
        pieces, items, _ = _pieces(counts, H, 200, G)
        toks = _item_tokens(counts, 200)
        assert len(toks) == len(items)
        assert any(len(own) > 1 and t > 32 for own, t in zip(pieces, toks)), (counts, G)


# ------------------------------------------------------------------ residency, bounded waits, combine


@contextlib.contextmanager
def _emu_state(resident=0, timeout_rate=0.0, image_arch=90):
    """Emulator knobs for one block: competing resident blocks (another kernel holds all but
    `resident` SMs; 0: none), random timeouts of bounded waits, the loaded image's architecture."""
    C = _cuda._C
    C.emu_set_resident_limit(resident)
    C.emu_set_wait_timeout_rate(timeout_rate)
    C.emu_set_image_arch(image_arch)
    C.emu_take_wait_timeouts()
    C.emu_take_launches()
    try:
        yield C
    finally:
        C.emu_set_resident_limit(0)
        C.emu_set_wait_timeout_rate(0.0)
        C.emu_set_image_arch(90)
        C.emu_take_wait_timeouts()
        C.emu_take_launches()


def _residency_case(gen, kdev):
    """4 active experts x 2 slices: 8 equal items, so 5 or 7 CTAs split some of them."""
    T, E, k, H, I = 6, 8, 2, 264, 200
    w_gu, w_dn, _, _ = _weights(gen, E, H, I, ExpertLayout(), torch.bfloat16, False, kdev.device)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    ids, w = _routing_counts(gen, [6, 3, 2, 1], k)
    return (T, E, k, H, I), (x, w_gu, w_dn, ids, w), reference.moe_experts(x, w_gu, w_dn, ids, w, None)


def test_fewer_resident_blocks_than_the_grid(kdev, gen, monkeypatch):
    """The persistent grid does not assume co-residency: with another kernel holding all but 1, 2 or
    3 of the SMs (the grid stays the SM count), every launch completes, matches the reference and
    gives the deterministic bits of the fully resident grid; the split items' row tiles whose
    producer is not resident time out and recompute its h. A resident grid never times out."""
    if not kdev.emulated:
        pytest.skip("the emulator sets the resident limit")
    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    (T, E, k, H, I), args, want = _residency_case(gen, kdev)
    _poison_workspaces(kdev, monkeypatch)
    counts = torch.bincount(args[3].flatten(), minlength=E)
    for sms in (5, 7):
        assert "h" in _split_kinds([c for c in counts.tolist() if c], H, I, sms)
        with _sms(kdev, sms), _emu_state() as C:
            base = _run(kdev, *args, None, True)
            _assert_close_act(base, want)
            _assert_close_act(_run(kdev, *args, None, False), want)
            assert C.emu_take_wait_timeouts() == 0, "a fully resident grid timed out"
        for resident in (1, 2, 3):
            with _sms(kdev, sms), _emu_state(resident=resident) as C:
                got = _run(kdev, *args, None, True)
                timeouts = C.emu_take_wait_timeouts()
                assert torch.equal(got, base), f"{sms} CTAs, {resident} resident: bits changed"
                _assert_close_act(_run(kdev, *args, None, False), want)
                timeouts += C.emu_take_wait_timeouts()
            if resident == 1:
                assert timeouts > 0, "one resident CTA at a time never reached the recompute"


def test_random_wait_timeouts_keep_the_bits(kdev, gen, monkeypatch):
    """Bounded waits that time out at random (a producer far behind) recompute the item's h locally:
    the same deterministic bits, atomic results within tolerance."""
    if not kdev.emulated:
        pytest.skip("the emulator times the waits out")
    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    _, args, want = _residency_case(gen, kdev)
    _poison_workspaces(kdev, monkeypatch)
    with _sms(kdev, 7):
        with _emu_state():
            base = _run(kdev, *args, None, True)
        total = 0
        for rate in (0.3, 1.0):
            with _emu_state(timeout_rate=rate) as C:
                _reshuffle(kdev)
                assert torch.equal(_run(kdev, *args, None, True), base), f"timeout rate {rate}"
                _assert_close_act(_run(kdev, *args, None, False), want)
                total += C.emu_take_wait_timeouts()
        assert total > 0


def test_launches_pdl_only_from_an_sm90_image(kdev, gen, monkeypatch):
    """The persistent kernel and its combine kernel launch as programmatic dependents only when the
    loaded image was built for sm_90+ (its griddepcontrol.wait is real); a compute_80 image on this
    sm_90 device (emu_set_image_arch(80)) gets plain launches, with the same bits."""
    if not kdev.emulated:
        pytest.skip("the emulator sets the image architecture")
    from moespec import kernels

    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    (T, E, k, H, I), (x, w_gu, w_dn, ids, w), want = _residency_case(gen, kdev)
    outs = []
    for arch in (90, 80):
        with _sms(kdev, 5), _emu_state(image_arch=arch) as C:
            plan = kernels.plan_from_routing(ids.int(), w, E)
            C.emu_take_launches()
            outs.append(kernels.moe_experts_planned(x, w_gu, w_dn, plan, deterministic=True))
            launches = C.emu_take_launches()
        assert launches == [("persistent_experts_kernel", arch >= 90), ("combine_v2_kernel", arch >= 90)], launches
        _assert_close_act(outs[-1], want)
    assert torch.equal(outs[0], outs[1])


# NS slices per expert: 2 (one combine thread per output), 18, 40 and 112 (Mixtral's I = 14336: 2, 4
# and 8 threads share an output's slices, then their chunks are added in chunk order).
@pytest.mark.parametrize("I", [200, 2248, 5064, 14336], ids=["ns2", "ns18", "ns40", "ns112"])
def test_combine_many_slices(kdev, gen, I, monkeypatch):
    """The combine kernel against the reference for few and many I-slices (its split of an output's
    slices over threads), deterministic bits independent of the expert grid, atomic within tolerance."""
    monkeypatch.setenv("MOESPEC_KERNELS", "v2")
    T, E, k, H = 3, 3, 2, 72
    w_gu, w_dn, _, _ = _weights(gen, E, H, I, ExpertLayout(), torch.bfloat16, False, kdev.device)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    ids = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
    w = torch.rand(T, k, generator=gen) + 0.05
    want = reference.moe_experts(x, w_gu, w_dn, ids, w, None)
    _poison_workspaces(kdev, monkeypatch)
    outs = []
    for sms in ((3, 8) if kdev.emulated else (None,)):
        with _sms(kdev, sms):
            outs.append(_run(kdev, x, w_gu, w_dn, ids, w, None, True))
            _assert_close_act(outs[-1], want)
            _assert_close_act(_run(kdev, x, w_gu, w_dn, ids, w, None, False), want)
    assert all(torch.equal(o, outs[0]) for o in outs)
