"""GPU timing of the routing plan, generation 1 vs 2 (docs/kernels-v2.md, "Routing plan v2").

    python bench/plan_timing.py [--out DIR] [--tokens 1,4,16,64] [--experts 128,256] [--budget 16]

For each (E, T): router logits [T, E] fp32, top-8, a budget, substitute, prob scores, CSR of the active
pairs (what `budgeted_moe_planned` asks for). Each generation's plan is captured 20 times in one CUDA graph
and the graph replayed; the time per plan (µs) is the replay time / 20, median of 7 replays. This is the
plan alone, back to back with itself (no expert kernel, so PDL plays no part). Prints a Markdown table and
writes it to DIR/plan_timing.md. Needs a GPU; exits 0 with a message without one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch


def time_plan(kernels, z, k, budget, generation, reps=20, replays=7):
    """Median µs per plan launch over `replays` replays of a graph of `reps` launches."""
    plan = kernels.plan_routing(z, k, budget, generation=generation)  # allocates, warms up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            kernels.plan_routing(z, k, budget, plan=plan, generation=generation)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / reps)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for plan_timing.md")
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--experts", default="128,256")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--budget", type=int, default=16)
    args = ap.parse_args(argv)
    from moespec import _cuda, kernels

    if not (torch.cuda.is_available() and _cuda.available()):
        print("plan_timing: no usable GPU or no CUDA kernels in this build; nothing timed")
        return 0
    rows = ["| E | T | v1 plan (µs) | v2 plan (µs) | v2 / v1 |", "|---:|---:|---:|---:|---:|"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for E in (int(e) for e in args.experts.split(",")):
        for T in (int(t) for t in args.tokens.split(",")):
            z = torch.randn(T, E, device="cuda", generator=gen) * 2
            t1 = time_plan(kernels, z, args.top_k, args.budget, "v1")
            t2 = time_plan(kernels, z, args.top_k, args.budget, "v2")
            rows.append(f"| {E} | {T} | {t1:.2f} | {t2:.2f} | {t2 / t1:.2f} |")
    table = "\n".join([f"Routing plan, top-{args.top_k}, budget {args.budget}, substitute, prob, CSR "
                       f"({torch.cuda.get_device_name()}):", "", *rows])
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "plan_timing.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
