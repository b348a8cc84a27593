"""Summarise recorded `moespec bench layer` CPU runs: moespec-cpu against the fastest baseline and the byte floor.

Usage: python tools/cpu_bench_summary.py bench/results/cpu/bench_layer_fp32_1t.json [...] > summary.md

For every case (model, T, budget) of every run: moespec-cpu's time (whole layer, routing included), the fastest
other implementation's time (reference, transformers eager / grouped_mm / batched_mm, F.grouped_mm; those time the
experts only), the speed-up, and moespec-cpu's time over the byte floor. Counts the cases where moespec-cpu is not
the fastest and where it is above 1.5x the floor at T >= 4.
"""
from __future__ import annotations

import json
import sys

BASELINES = ("reference", "hf-eager", "hf-grouped_mm", "hf-batched_mm", "torch-grouped_mm")


def summarise(path: str) -> tuple[list[str], dict]:
    data = json.load(open(path))
    meta, rows = data["meta"], data["rows"]
    cases: dict = {}
    for r in rows:
        if r.get("time_us") is None:
            continue
        key = (r["model"], r["T"], r["budget"])
        cases.setdefault(key, {})[r["impl"]] = r
    lines = [f"### {meta['dtype']}, {meta['device']}", "",
             f"`{meta['command']}` — {meta['date']}, commit {meta['git_commit'][:10]}, copy bandwidth "
             f"{meta['copy_bandwidth_gbps']:.1f} GB/s, {meta['timing_method']}", "",
             "| model | T | C | union | kept | floor µs | moespec-cpu µs (× floor) | experts only µs | fastest baseline µs | "
             "speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    stats = {"cases": 0, "not_fastest": [], "over_1.5_floor_T4": []}
    for (model, T, budget), impls in cases.items():
        ours = impls.get("moespec-cpu")
        if ours is None:
            continue
        base = [(impls[b]["time_us"], b) for b in BASELINES if b in impls]
        best_t, best = min(base) if base else (None, "-")
        exp = impls.get("moespec-cpu-experts")
        stats["cases"] += 1
        if best_t is not None and ours["time_us"] >= best_t:
            stats["not_fastest"].append(f"{model} T={T} C={budget}")
        if T >= 4 and ours["x_floor"] > 1.5:
            stats["over_1.5_floor_T4"].append(f"{model} T={T} C={budget} ({ours['x_floor']:.1f}x)")
        cells = [model, str(T), "-" if budget is None else str(budget), str(ours["union"]), str(ours["kept"]),
                 f"{ours['floor_us']:.1f}", f"{ours['time_us']:.1f} ({ours['x_floor']:.2f}×)",
                 f"{exp['time_us']:.1f}" if exp else "-",
                 f"{best_t:.0f} ({best})" if best_t else "-",
                 f"{best_t / ours['time_us']:.1f}×" if best_t else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{stats['cases']} cases; moespec-cpu not the fastest in {len(stats['not_fastest'])}"
              + (f" ({', '.join(stats['not_fastest'])})" if stats["not_fastest"] else "")
              + f"; above 1.5× the byte floor at T >= 4 in {len(stats['over_1.5_floor_T4'])}", ""]
    return lines, stats


def main(paths: list[str]) -> int:
    out = []
    for p in paths:
        lines, _ = summarise(p)
        out += lines
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
