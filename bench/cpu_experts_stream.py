"""How close the CPU experts stream their weights to the DRAM floor on widened fine-grained shapes.

The shapes of the memory-bound end-to-end target (issue 25): H = 128, E = 128 experts, top-8,
bf16 weights, experts widened to an intermediate size I; T tokens per call (decode and
verification). Every call routes its tokens to fresh random experts, so the weights it reads come
from DRAM (E experts of 3 H I bf16 weights are far larger than the last-level cache). The floor of
a call is the bytes of its distinct experts divided by `cpu_kernels.stream_read`'s bandwidth,
measured in the same process on the same threads.

    python bench/cpu_experts_stream.py --label new --I 2048 8192 --T 1 9 --threads 1 2

``--shared`` sends every token of a call to the same k experts (equal bytes for every T).

prints one JSON line per (I, T, threads): median and spread of the time per call, GB/s, floor GB/s
and time/floor. To compare two builds, run it alternately under each (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from moespec import cpu_kernels


def _floor_gbs(buf: torch.Tensor, threads: int, reps: int = 5) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        cpu_kernels.stream_read(buf, threads=threads)
        ts.append(time.perf_counter() - t0)
    return buf.numel() * buf.element_size() / statistics.median(ts) / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", default="")
    ap.add_argument("--H", type=int, default=128)
    ap.add_argument("--E", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--I", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--T", type=int, nargs="+", default=[1, 9])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", action="store_true",
                    help="route all T tokens of a call to the same k experts (what a tight budget does to a "
                         "verification: the bytes of one token, T times the token-expert pairs)")
    args = ap.parse_args(argv)
    H, E, k = args.H, args.E, args.k
    gen = torch.Generator().manual_seed(args.seed)
    for I in args.I:
        w_gu = torch.empty(E, 2 * I, H, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=gen)
        w_dn = torch.empty(E, H, I, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=gen)
        expert_bytes = 3 * H * I * 2
        for threads in args.threads:
            floor_before = _floor_gbs(w_gu, threads)
            for T in args.T:
                x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
                rows = []
                for c in range(args.calls + 3):
                    ids = torch.rand(1 if args.shared else T, E, generator=gen).topk(k, dim=-1).indices
                    ids = ids.expand(T, k).contiguous()
                    w = torch.rand(T, k, generator=gen)
                    union = int(torch.unique(ids).numel())
                    t0 = time.perf_counter()
                    cpu_kernels.moe_experts(x, w_gu, w_dn, ids, w, threads=threads)
                    dt = time.perf_counter() - t0
                    if c >= 3:  # the first calls grow the workspace
                        rows.append((dt, union * expert_bytes / dt / 1e9))
                floor = max(floor_before, _floor_gbs(w_gu, threads))
                gbs = sorted(r[1] for r in rows)
                dts = sorted(r[0] for r in rows)
                med = statistics.median(gbs)
                print(json.dumps(dict(
                    label=args.label, shared=args.shared, pairs=T * k, isa=cpu_kernels.isa(), H=H, E=E, k=k, I=I, T=T, threads=threads,
                    calls=len(rows), ms_median=round(statistics.median(dts) * 1e3, 3),
                    gbs_median=round(med, 2), gbs_p10=round(gbs[len(gbs) // 10], 2),
                    gbs_p90=round(gbs[(len(gbs) * 9) // 10], 2), floor_gbs=round(floor, 2),
                    x_floor=round(floor / med, 3))), flush=True)
        del w_gu, w_dn


if __name__ == "__main__":
    sys.exit(main())
