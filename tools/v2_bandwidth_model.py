#!/usr/bin/env python3
"""Paper model of the generation-2 expert kernel's time per shape (docs/kernels-v2.md): an
ESTIMATE owed a GPU measurement, not one.

It lays out the kernel's stream-K work axis exactly as csrc/include/moespec/experts_v2.cuh does
(items of up to 64 tokens x 128 I-columns, sm_90; GEMM1 column units of 8 columns over all of H, GEMM2 row tiles
of 128 rows, interleaved; CTA c owns the units starting in [W*c/G, (c+1)*W/G)), runs the three
phases of every CTA (split GEMM1 units, whole items, split row tiles that wait for h) with every
CTA streaming at its fair share of the copy bandwidth, and adds what the axis does not hold:
re-streaming (an expert's weights once per item of up to 64 tokens), the deterministic fp32 partials
(written, then read by the reducing CTA), the split items' h tiles, launch + ring fill and the
reduction tail. One cp.async ring runs through all the pieces of a CTA, so a piece boundary costs no
refill (the count of pieces is shown for reference). Token counts: T*k pairs over the C kept experts (a budget re-routes a token's k
slots to kept experts), +-25 % popularity skew. Python stdlib only.

    python tools/v2_bandwidth_model.py            # the Markdown table of docs/kernels-v2.md
"""
from __future__ import annotations

import bisect

BW = 4.3e12  # H200 copy bandwidth, B/s (docs/design.md section 5 measures it per GPU)
G = 132  # SMs = persistent CTAs
ITEM = 64  # tokens per item at most (sm_90; sm_80 builds keep 32)
EIGHTH = 128 * 128 * 2 / 8  # the axis unit: an eighth of a 32 KB weight stage
LAUNCH_S = 3e-6  # launch + first ring fill
TAIL_S = 2e-6  # the last tokens' reductions


def units(nc: int, nr: int, kt1: int):
    out, c, r = [], 0, 0
    while c < nc or r < nr:
        if r == nr or (c < nc and (c + 1) * nr <= (r + 1) * nc):
            out.append(("c", kt1))
            c += 1
        else:
            out.append(("r", 8))
            r += 1
    return out


def simulate(counts, H, I):
    """(axis length W in eighths, busiest CTA's time in eighths, mean wait, split items, items,
    most pieces (ring restarts) of a CTA)."""
    kt1 = rt2 = -(-H // 128)
    ns = -(-I // 128)
    passes = [2 if min(128, I - z * 128) > 64 else 1 for z in range(ns)]
    items = [8 * passes[z] for cnt in counts for _ in range(-(-cnt // ITEM)) for z in range(ns)]
    W = sum(nc * kt1 + 8 * rt2 for nc in items)
    bounds = [W * c // G for c in range(G + 1)]
    own, P = [], 0
    for nc in items:
        d = {}
        for kind, w in units(nc, rt2, kt1):
            cta = bisect.bisect_right(bounds, P) - 1
            d.setdefault(cta, [0, 0])[0 if kind == "c" else 1] += w
            P += w
        own.append(d)
    per = [[] for _ in range(G)]
    for i, d in enumerate(own):
        for c, (a, b) in d.items():
            per[c].append((i, a, b, len(d) > 1))
    published, t0 = {}, [0.0] * G
    for c in range(G):  # phase 0: split items' GEMM1 units, h published at the end of each
        t = 0.0
        for i, a, _, split in per[c]:
            if split and a:
                t += a
                published[i] = max(published.get(i, 0.0), t)
        t0[c] = t
    end, waited = [0.0] * G, 0.0
    for c in range(G):
        t = t0[c] + sum(a + b for _, a, b, split in per[c] if not split)  # phase 1: whole items
        for i, _, b, split in per[c]:  # phase 2: split row tiles wait for every column's h
            if split and b:
                if published.get(i, 0.0) > t:
                    waited += published[i] - t
                    t = published[i]
                t += b
        end[c] = t
    pieces = max(sum(1 + (split and a > 0 and b > 0) for _, a, b, split in per[c]) for c in range(G))
    return W, max(end), waited / G, sum(1 for d in own if len(d) > 1), len(items), pieces


def estimate(H, I, E, k, T, budget):
    union = E * (1 - (1 - k / E) ** T)  # expected distinct experts among T*k uniform picks
    C = max(k, round(min(union, budget) if budget else union))
    avg = T * k / C
    counts = [max(1, round(avg * (0.75 if u % 2 else 1.25))) for u in range(C)]
    W, busiest, wait, splits, items, pieces = simulate(counts, H, I)
    expert_bytes = 3 * H * I * 2
    floor = C * expert_bytes / BW
    weights = W * EIGHTH
    partials = T * k * -(-I // 128) * H * 4 * 2  # deterministic mode: written, then read
    h_tiles = splits * min(ITEM, -(-max(counts) // 8) * 8) * 128 * 2 * 2  # a split item moves its token fragments' rows
    t_bytes = (weights + partials + h_tiles) / BW
    t_busiest = busiest * EIGHTH / (BW / G)  # one ring runs through a CTA's pieces: no refills
    t = LAUNCH_S + max(t_bytes, t_busiest) + TAIL_S
    return dict(C=C, tok=avg, items=items, W=W / 8, share=W / 8 / G, busiest=busiest / 8, wait=wait / 8,
                splits=splits, pieces=pieces, restream=weights / (C * expert_bytes), partials=partials / (C * expert_bytes),
                floor=floor * 1e6, t=t * 1e6, frac=floor / t)


def main() -> None:
    print("| model | T | budget | kept C (tokens each) | items | axis (stages) | per CTA | busiest CTA | mean wait | "
          "pieces | re-stream | partials | floor µs | est. µs | fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, H, I, E, k in (("Qwen3-30B-A3B", 2048, 768, 128, 8), ("Mixtral-8x7B", 4096, 14336, 8, 2)):
        for T in (1, 4, 16, 64):
            for budget in (None, 16):
                r = estimate(H, I, E, k, T, budget)
                print(f"| {name} | {T} | {budget or 'none'} | {r['C']} ({r['tok']:.0f}) | {r['items']} | {r['W']:.0f} | "
                      f"{r['share']:.1f} | {r['busiest']:.1f} | {r['wait']:.2f} | {r['pieces']} | {r['restream']:.2f}x | "
                      f"{100 * r['partials']:.0f} % | {r['floor']:.0f} | {r['t']:.0f} | {100 * r['frac']:.0f} % |")


if __name__ == "__main__":
    main()
