#!/usr/bin/env python3
"""Performance model of the expert kernels from what they execute (docs/kernels-v2.md, "Expected
time"): an ESTIMATE owed a GPU measurement, not one.

The kernels run on the CPU emulator (an emulation build, MOESPEC_CUDA=EMU) with the performance
trace on, in count-only mode (copies and MMAs are skipped: the counts do not depend on the data),
at the real shapes, with the device's SM count and its grid. The trace gives, per CTA: the bytes
its cp.async ring streams and when each byte is issued, every pipeline stage with its token
fragments, every flag it publishes or waits for, every chain of dependent global round trips
(reductions, fences, counter atomics; csrc/include/moespec/common.cuh, `perf_event`) and the other
global bytes it reads or writes. This script turns that into time:

- each CTA's ring is a FIFO at the CTA's share of the copy bandwidth (BW / CTAs streaming at once),
  issued when the compute cursor issues it and landing one DRAM latency later; a stage computes when
  its bytes have landed, for max(its issue-bound compute time, 0);
- a chain of n dependent round trips stalls the compute cursor n x L2 latency (the ring keeps
  streaming what was issued, so up to kStages-1 stages of it are hidden);
- a flag wait ends one L2 latency after the last producer published (producers publish before any
  wait, so their times are known first);
- blocks beyond the resident capacity (SMs x occupancy) start when a slot frees (list scheduling);
- a kernel boundary costs KERNEL_GAP_S, or PDL_GAP_S for a programmatic dependent launch;
- a kernel takes at least all its bytes / BW.

    python tools/kernel_perf_model.py                       # the table of docs/kernels-v2.md
    python tools/kernel_perf_model.py --models qwen3-30b-a3b --tokens 64 --budgets 16 --gpus h200
"""
from __future__ import annotations

import argparse
import heapq
import math
import sys
from dataclasses import dataclass

# ---------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Gpu:
    name: str
    bw: float  # copy bandwidth, B/s: 90 % of the datasheet peak until docs/design.md's measurement exists
    peak: float  # datasheet HBM peak, B/s
    sms: int
    clock: float  # sustained SM clock under load, Hz (assumed)
    smem_per_sm: int = 233472  # 228 KiB (sm_90)


# H100 SXM5: 3.35 TB/s HBM3, 132 SMs; H200: 4.8 TB/s HBM3e, 132 SMs (NVIDIA datasheets).
GPUS = {"h100": Gpu("H100", 3.0e12, 3.35e12, 132, 1.75e9), "h200": Gpu("H200", 4.3e12, 4.8e12, 132, 1.75e9)}
L2_RT_S = 0.3e-6  # one dependent global round trip under load (L2 hit + queueing); 0.15-0.6 us bounds
DRAM_LAT_S = 0.6e-6  # issue to landing of a streamed cp.async under load
KERNEL_GAP_S = 2.0e-6  # a kernel boundary without PDL (drain, launch, ramp), assumed
KERNEL_START_S = 0.0  # the ring's fill is in the timeline (DRAM_LAT_S before the first stage lands)
PDL_GAP_S = 1.0e-6  # the same with PDL (the dependent is resident and released by griddepcontrol.wait), assumed
IPC = 0.7  # instructions per cycle of a scheduler with one warp (the v2 CTA has one warp per scheduler)
CHUNK_INSTR = 25  # instructions per 16-byte cp.async chunk (address math + predicate + issue), from the PTX
V2_STAGES, V1_STAGES = 4, 3


def stage_instr(nf: int, kind: int) -> float:
    """Instructions per warp for one pipeline stage of `nf` token fragments: per 16-k step 8 A-fragment
    loads and ~16 integer ops, per fragment 2 B loads, 2 MMAs and ~4 integer ops (the PTX of the MMA
    step: ~90 instructions at 8 fragments), plus the stage's cp.async chunks (weights + tokens)."""
    ksteps, a_chunks, b_chunks = (8, 16, nf) if kind & 3 else (4, 8, nf / 2)
    return ksteps * (24 + 8.25 * nf) + CHUNK_INSTR * (a_chunks + b_chunks)


# ---------------------------------------------------------------------------------- shapes
MODELS = {  # H, I, E, k (docs/design.md section 5)
    "qwen3-30b-a3b": ("Qwen3-30B-A3B", 2048, 768, 128, 8),
    "olmoe-1b-7b": ("OLMoE-1B-7B", 2048, 1024, 64, 8),
    "mixtral-8x7b": ("Mixtral-8x7B", 4096, 14336, 8, 2),
}


def routing(T, E, k, budget, seed):
    """topk ids [T, k] (k distinct experts per token, uniform among E, or among the C kept ones
    when a budget C < E re-routes every slot to kept experts), weights, kept ids or None."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(E, generator=g)[:budget] if budget and budget < E else torch.arange(E)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    w = torch.rand(T, k, generator=g) + 0.05
    return ids.int(), w, (pool.clone().int() if budget and budget < E else None)


def trace(model, T, budget, generation, deterministic, sms, seed=0):
    """Run the experts of one layer on the emulator in count-only mode; returns (the traced expert
    launches, kept experts)."""
    import torch

    from moespec import _cuda, kernels
    from moespec.types import ExpertLayout

    C = _cuda._C
    _, H, I, E, k = MODELS[model]
    ids, w, kept = routing(T, E, k, budget, seed)
    old = C.emu_sms()
    C.emu_set_sms(sms)
    try:
        plan = kernels.plan_from_routing(ids, w, E, kept, generation=generation)
        nkept = int(torch.unique(ids if kept is None else ids[torch.isin(ids, kept)]).numel())
        x = torch.zeros(T, H, dtype=torch.bfloat16)
        base = torch.zeros(64, dtype=torch.bfloat16)  # count-only: the weights are never read
        w_gu = base.as_strided((E, 2 * I, H), (0, 0, 0))
        w_dn = base.as_strided((E, H, I), (0, 0, 0))
        C.emu_set_perf(True, True)
        try:
            kernels.moe_experts_planned(x, w_gu, w_dn, plan, ExpertLayout(), deterministic=deterministic,
                                        generation=generation)
            launches = C.emu_take_perf()
        finally:
            C.emu_set_perf(False)
    finally:
        C.emu_set_sms(old)
    return launches, nkept, (H, I, E, k)


# ---------------------------------------------------------------------------------- time
def occupancy(gpu: Gpu, threads: int, smem: int) -> int:
    by_threads = 2048 // (-(-threads // 32) * 32)
    by_smem = gpu.smem_per_sm // (smem + 1024)
    return max(1, min(32, by_threads, by_smem))


KIND_STAGE, KIND_PUBLISH, KIND_WAIT, KIND_RT, KIND_BYTES, KIND_RECOMPUTE = 1, 2, 3, 4, 5, 6


def block_timeline(events, cp_total, mem_bytes, rate, start, gpu, stages, need_time=None):
    """Compute-cursor clock of one CTA over thread 0's events. Returns (end, publishes, stats).

    A stage event comes right after the stage's barrier and before the load it then issues, so the
    cp.async bytes that appear between two stage events are one stage's load (issued at the first
    of them), and a stage finds its own load kStages-1 loads back; the bytes before a stage event
    that finds no load in flight are a prologue of kStages-1 stages (the kernel's start, v1's next
    token block, v2's ring restart after a recompute, which kPerfRecompute marks)."""
    r = rate
    clock = issue_t = land = start
    pending = []  # landing times of the stage loads in flight, oldest first
    acc = 0  # cp.async bytes issued since the last stage event
    prev_stamp = 0
    pubs = []
    stats = dict(stages=0, rt=0, rt_s=0.0, wait_s=0.0, compute_s=0.0, stream_s=0.0)

    def issue(nbytes, at):
        nonlocal land
        land = max(land, at + DRAM_LAT_S - nbytes / r) + nbytes / r
        pending.append(land)

    for kind, a, b, stamp in events:
        acc += stamp - prev_stamp
        prev_stamp = stamp
        if kind == KIND_STAGE:
            if acc > 0:
                if not pending:
                    for _ in range(stages - 1):
                        issue(acc / (stages - 1), issue_t)
                else:
                    issue(acc, issue_t)
                acc = 0
            ready = pending.pop(0) if pending else clock
            if ready > clock:
                stats["stream_s"] += ready - clock
                clock = ready
            issue_t = clock
            c = stage_instr(a, b) / IPC / gpu.clock
            stats["compute_s"] += c
            clock += c
            stats["stages"] += 1
        elif kind == KIND_RT:
            clock += a * L2_RT_S
            stats["rt"] += a
            stats["rt_s"] += a * L2_RT_S
        elif kind == KIND_PUBLISH:
            pubs.append((a, b, clock))
        elif kind == KIND_RECOMPUTE:
            pending.clear()
            acc = 0
            issue_t = clock
        elif kind == KIND_WAIT and need_time is not None:
            t = need_time(a, b)
            if t is not None and t + L2_RT_S > clock:
                stats["wait_s"] += t + L2_RT_S - clock
                clock = t + L2_RT_S
    if acc > 0:
        issue(acc, issue_t)
    clock = max(clock, land)
    return clock, pubs, stats


def launch_time(launch, gpu: Gpu, gap: float):
    """(time of the launch in s incl. its boundary, stats of the critical CTA, total bytes)."""
    blocks = launch["blocks"]
    B = len(blocks)
    R = gpu.sms * occupancy(gpu, launch["threads"], launch["smem"])
    active = min(B, R)
    cp_all = sum(b[1] for b in blocks)
    total = sum(b[1] + b[2] for b in blocks)
    # A CTA streams its share of the bandwidth the kernel's other traffic (partials, reads) leaves.
    rate = gpu.bw / active * (cp_all / total if cp_all else 1.0)
    persistent = "persistent" in launch["name"]
    stages = V2_STAGES if persistent else V1_STAGES
    need_time = None
    if persistent:  # producers first: every publish precedes every wait in a CTA
        pubs = {}
        for idx, cp, mem, chain, ev in blocks:
            cut = next((i for i, e in enumerate(ev) if e[0] == KIND_WAIT), len(ev))
            _, p, _ = block_timeline(ev[:cut], cp, mem, rate, KERNEL_START_S, gpu, stages)
            for slot, units, t in p:
                pubs.setdefault(slot, []).append((t, units))

        def need_time(slot, units):  # when the published units of the slot reach `units`
            got = 0
            for t, u in sorted(pubs.get(slot, [])):
                got += u
                if got >= units:
                    return t
            return None
    slots = [0.0] * active
    heapq.heapify(slots)
    worst, worst_stats = 0.0, None
    for idx, cp, mem, chain, ev in blocks:
        start = heapq.heappop(slots) + KERNEL_START_S
        if ev:
            end, _, st = block_timeline(ev, cp, mem, rate, start, gpu, stages, need_time=need_time)
        else:  # no events from thread 0: bytes and its chain
            end = start + mem / (gpu.bw / active) + chain * L2_RT_S
            st = dict(stages=0, rt=chain, rt_s=chain * L2_RT_S, wait_s=0.0, compute_s=0.0, stream_s=mem / rate)
        heapq.heappush(slots, end)
        if end > worst:
            worst, worst_stats = end, st
    t = max(worst, total / gpu.bw)
    return gap + t, worst_stats or {}, total


def model_time(launches, gpu: Gpu):
    """Sum over the launches of their time; returns (seconds, per-launch rows)."""
    rows, t = [], 0.0
    for i, l in enumerate(launches):
        gap = PDL_GAP_S if l["pdl"] else KERNEL_GAP_S
        dt, st, total = launch_time(l, gpu, gap)
        rows.append((l["name"], dt, st, total))
        t += dt
    return t, rows


def estimate(model, T, budget, generation, deterministic, gpu: Gpu, seed=0):
    launches, nkept, (H, I, E, k) = trace(model, T, budget, generation, deterministic, gpu.sms, seed)
    t, rows = model_time(launches, gpu)
    if generation == "v1" and not deterministic:  # the accumulator memset (a captured memset node)
        t += KERNEL_GAP_S + T * H * 4 / gpu.bw
    floor = nkept * 3 * H * I * 2 / gpu.peak
    persistent = [r for r in rows if "persistent" in r[0]]
    crit = persistent[0][2] if persistent else {}
    return dict(t=t, floor=floor, frac=floor / t, kept=nkept, rows=rows, crit=crit)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--budgets", default="none,16")
    ap.add_argument("--gpus", default="h100,h200")
    ap.add_argument("--generations", default="v1,v2")
    ap.add_argument("--modes", default="det,atomic")
    ap.add_argument("--detail", action="store_true", help="per launch: time, critical CTA's terms")
    args = ap.parse_args(argv)
    from moespec import _cuda

    if not _cuda.emu_compiled():
        print("needs an emulation build (MOESPEC_CUDA=EMU pip install -e .)", file=sys.stderr)
        return 2
    budgets = [None if b == "none" else int(b) for b in args.budgets.split(",")]
    gens, modes = args.generations.split(","), args.modes.split(",")
    cols = [f"{g} {m}" for g in gens for m in modes]
    print(f"Estimates (not measurements): L2 round trip {L2_RT_S * 1e6:.2f} us, kernel gap {KERNEL_GAP_S * 1e6:.1f} us, "
          f"PDL gap {PDL_GAP_S * 1e6:.1f} us, IPC {IPC}; fraction = kept weights at the datasheet peak / estimate.\n")
    print("| GPU | model | T | budget | kept | floor µs | " + " | ".join(cols) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(cols))
    for gname in args.gpus.split(","):
        gpu = GPUS[gname]
        for m in args.models.split(","):
            E = MODELS[m][3]
            for T in [int(t) for t in args.tokens.split(",")]:
                for b in budgets:
                    if b is not None and b >= E:
                        continue
                    cells, r = [], None
                    for g in gens:
                        for mode in modes:
                            r = estimate(m, T, b, g, mode == "det", gpu)
                            cells.append(f"{r['t'] * 1e6:.0f} ({100 * r['frac']:.0f} %)")
                            if args.detail:
                                for name, dt, st, total in r["rows"]:
                                    print(f"  {g} {mode} {name}: {dt * 1e6:.1f} us, {total / 1e6:.2f} MB, critical CTA "
                                          + ", ".join(f"{kk}={vv * 1e6:.1f}us" if kk.endswith("_s") else f"{kk}={vv}"
                                                      for kk, vv in st.items()), file=sys.stderr)
                    print(f"| {gpu.name} | {MODELS[m][0]} | {T} | {b or 'none'} | {r['kept']} | {r['floor'] * 1e6:.0f} | "
                          + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
