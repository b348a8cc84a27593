"""Benchmark one budgeted MoE layer against the byte floor and the ecosystem's baselines (DESIGN §5).

For each model shape, token count T and budget C it reports:

- ``ours``: the whole layer with moespec's kernels (routing plan from router logits + GEMM1/SwiGLU
  + GEMM2/combine), captured in a CUDA graph;
- ``ours_experts``: the expert kernels alone over a precomputed plan;
- baselines over the *same* budgeted routing (ids/weights produced by the plan, so they read the
  same kept experts): transformers' ``grouped_mm`` and ``batched_mm`` experts functions,
  ``torch.nn.functional.grouped_mm`` called directly, and ``moespec.reference`` (eager).
  Baselines are timed for the experts only (routing excluded), which favours them.

The floor is (bytes of the kept experts' weights + activations) / measured device-to-device copy
bandwidth (read + write bytes of a large ``copy_``). Times are medians of CUDA-event timings
after warm-up, with L2 flushed before every timed call; graphs are used where capture works.

Usage::

    python bench/bench_layer.py --out bench/results/<device> [--models qwen3-30b-a3b,...]
        [--tokens 1,2,4,8,16,32,64] [--budgets none,8,16,32,64] [--iters 30] [--routing iid]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from moespec import _cuda, kernels, reference
from moespec.types import ExpertLayout

MODELS = {
    # name: H, I, E, k, renormalize, layout, biases. Routing is softmax top-k for all of them
    # (DeepSeek-V3's sigmoid + group-limited router changes which experts win, not the bytes).
    # Ordered by priority (the bandwidth goal is stated for Qwen3 and Mixtral), so that a run
    # cut short by a time limit still covers them.
    "qwen3-30b-a3b": dict(H=2048, I=768, E=128, k=8, renorm=True, layout="v5", bias=False),
    "mixtral-8x7b": dict(H=4096, I=14336, E=8, k=2, renorm=True, layout="v5", bias=False),
    "olmoe-1b-7b": dict(H=2048, I=1024, E=64, k=8, renorm=False, layout="v5", bias=False),
    "gpt-oss-120b": dict(H=2880, I=2880, E=128, k=4, renorm=True, layout="gpt_oss", bias=True),
    "deepseek-v3": dict(H=7168, I=2048, E=256, k=8, renorm=False, layout="v5", bias=False),
}
BATCHED_MM_MAX_BYTES = 16 << 30  # batched_mm gathers one weight copy per pair; skip beyond this


# ----------------------------------------------------------------------------- timing


class Timer:
    """Median CUDA-event time of a callable, L2 flushed before every timed call."""

    def __init__(self, iters: int, warmup: int = 3):
        self.iters, self.warmup = iters, warmup
        l2 = torch.cuda.get_device_properties(0).L2_cache_size or (50 << 20)
        self.flush_buf = torch.empty(4 * l2 // 4, dtype=torch.int32, device="cuda")

    def time_us(self, fn, iters: int | None = None) -> float:
        iters = iters or self.iters
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        events = []
        for _ in range(iters):
            self.flush_buf.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1000.0 for s, e in events)


def graphed(fn):
    """Capture ``fn`` in a CUDA graph and return its replay, or ``fn`` itself when capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        return g.replay, True
    except Exception:  # noqa: BLE001 - some baselines are not capturable; time them eagerly
        torch.cuda.synchronize()
        return fn, False


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = Timer(iters=20, warmup=3)
    us = t.time_us(lambda: b.copy_(a))
    return 2 * nbytes / (us * 1e-6) / 1e9


# ----------------------------------------------------------------------------- routing inputs


def make_logits(kind: str, T: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """Router logits: ``iid`` Gaussian, ``zipf`` (skewed expert popularity), or ``tree``
    (draft-tree-correlated: tokens in groups of 4 share most of their logits)."""
    z = torch.randn(T, E, generator=gen)
    if kind == "zipf":
        z = z + torch.log(1.0 / torch.arange(1, E + 1, dtype=torch.float32))[torch.randperm(E, generator=gen)] * 2
    elif kind == "tree":
        base = torch.randn((T + 3) // 4, E, generator=gen).repeat_interleave(4, dim=0)[:T]
        z = base * 2 + 0.5 * z
    return z.cuda()


# ----------------------------------------------------------------------------- baselines


class _HFExperts(torch.nn.Module):
    """The attributes transformers' experts functions read from their ``self``."""

    def __init__(self, w_gu, w_dn, b_gu, b_dn, transposed, act):
        super().__init__()
        self.gate_up_proj, self.down_proj = w_gu, w_dn
        self.gate_up_proj_bias, self.down_proj_bias = b_gu, b_dn
        self.num_experts = w_gu.shape[0]
        self.has_gate, self.has_bias = True, b_gu is not None
        self.is_transposed, self.is_concatenated = transposed, True
        self._is_expert_parallel, self.has_post_expert_norm = False, False
        self.hidden_dim = w_gu.shape[1] if transposed else w_gu.shape[2]
        self.intermediate_dim = w_dn.shape[1] if transposed else w_dn.shape[2]
        self.act_fn = act
        self.config = None

    def _apply_gate(self, gate_up_out):
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def torch_grouped_mm_experts(x, w_gu, w_dn, ids, weights):
    """A lean experts forward on ``torch.nn.functional.grouped_mm`` (transformers v5 layout)."""
    T, k = ids.shape
    flat = ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat)
    xs = x[perm // k]
    counts = torch.bincount(sorted_ids, minlength=w_gu.shape[0])
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gu = F.grouped_mm(xs, w_gu.transpose(-2, -1), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    h = F.silu(gate) * up
    y = F.grouped_mm(h, w_dn.transpose(-2, -1), offs=offs)
    y = y.float() * weights.reshape(-1)[perm].unsqueeze(-1)
    out = torch.zeros(T * k, y.shape[-1], dtype=torch.float32, device=x.device)
    out[perm] = y
    return out.view(T, k, -1).sum(1).to(x.dtype)


# ----------------------------------------------------------------------------- one case


def run_case(spec, T, budget, args, timer, weights, gen, bw_gbps):
    H, I, E, k = spec["H"], spec["I"], spec["E"], spec["k"]
    layout = ExpertLayout.gpt_oss() if spec["layout"] == "gpt_oss" else ExpertLayout()
    w_gu, w_dn, b_gu, b_dn = weights
    dtype = w_gu.dtype
    x = torch.randn(T, H, generator=gen).to(dtype).cuda()
    z = make_logits(args.routing, T, E, gen)
    row = dict(model=spec["name"], T=T, budget=budget if budget is not None else "none", routing=args.routing)

    plan = kernels.RoutingPlan.empty(T, E, k, "cuda")
    out = torch.empty(T, H, dtype=dtype, device="cuda")

    def layer():
        kernels.budgeted_moe_planned(x, z, w_gu, w_dn, k, budget, "substitute", spec["renorm"], layout=layout,
                                     b_gate_up=b_gu, b_down=b_dn, plan=plan, out=out)

    layer()
    torch.cuda.synchronize()
    c = plan.counts()
    row.update(union=c["union"], kept=c["kept"], active=c["active"])
    ids = plan.ids.long().clone()
    w = plan.weights.clone()
    expert_bytes = c["active"] * 3 * H * I * w_gu.element_size()
    if b_gu is not None:
        expert_bytes += c["active"] * 3 * I * b_gu.element_size()
    act_bytes = 2 * T * H * x.element_size() + z.numel() * z.element_size()
    floor_us = (expert_bytes + act_bytes) / (bw_gbps * 1e9) * 1e6
    row.update(bytes=expert_bytes + act_bytes, floor_us=floor_us)

    fn, g = graphed(layer)
    us = timer.time_us(fn)
    row.update(ours_us=us, ours_graph=g, ours_gbps=row["bytes"] / (us * 1e-6) / 1e9, ours_over_floor=us / floor_us)
    ours_out = out.clone()

    fn, _ = graphed(lambda: kernels.plan_routing(z, k, budget, "substitute", spec["renorm"], plan=plan))
    row["plan_us"] = timer.time_us(fn)  # the routing plan alone (target: <= 5 us for T <= 64, E <= 256)

    exp_plan = kernels.plan_from_routing(ids, w, E)
    exp_out = torch.empty_like(out)
    fn, _ = graphed(lambda: kernels.moe_experts_planned(x, w_gu, w_dn, exp_plan, layout, b_gu, b_dn, True, exp_out))
    row["ours_experts_us"] = timer.time_us(fn)
    fn, _ = graphed(lambda: kernels.moe_experts_planned(x, w_gu, w_dn, exp_plan, layout, b_gu, b_dn, False, exp_out))
    row["ours_experts_atomic_us"] = timer.time_us(fn)

    # Baselines over the same routing.
    try:
        from transformers.integrations import moe as hf_moe

        hf = _HFExperts(w_gu, w_dn, b_gu, b_dn, layout.transposed, torch.nn.SiLU())
        if layout.activation != "silu" or layout.gate_up != "gate_up":
            row["hf_grouped_mm_us"] = row["hf_batched_mm_us"] = "n/a (layout)"
        else:
            fn, g = graphed(lambda: hf_moe.grouped_mm_experts_forward(hf, x, ids, w.to(dtype)))
            row["hf_grouped_mm_us"] = timer.time_us(fn)
            if T * k * 3 * H * I * w_gu.element_size() <= BATCHED_MM_MAX_BYTES:
                fn, g = graphed(lambda: hf_moe.batched_mm_experts_forward(hf, x, ids, w.to(dtype)))
                row["hf_batched_mm_us"] = timer.time_us(fn, iters=max(5, args.iters // 3))
            else:
                row["hf_batched_mm_us"] = "skipped (memory)"
    except Exception as exc:  # noqa: BLE001 - record, keep benchmarking
        row["hf_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if layout == ExpertLayout() and b_gu is None:
        try:
            fn, _ = graphed(lambda: torch_grouped_mm_experts(x, w_gu, w_dn, ids, w))
            row["torch_grouped_mm_us"] = timer.time_us(fn)
            ref = torch_grouped_mm_experts(x, w_gu, w_dn, ids, w).float()
            row["max_rel_err_vs_grouped_mm"] = ((ours_out.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        except Exception as exc:  # noqa: BLE001
            row["torch_grouped_mm_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if T <= args.reference_max_t:
        fn = lambda: reference.moe_experts(x, w_gu, w_dn, ids, w, b_gate_up=b_gu, b_down=b_dn, layout=layout)  # noqa: E731
        row["reference_us"] = timer.time_us(fn, iters=3)
        ref = fn().float()
        row["max_rel_err_vs_reference"] = ((ours_out.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    return row


def make_weights(spec, dtype, gen_seed):
    torch.manual_seed(gen_seed)
    H, I, E = spec["H"], spec["I"], spec["E"]
    transposed = spec["layout"] == "gpt_oss"
    gu_shape = (E, H, 2 * I) if transposed else (E, 2 * I, H)
    dn_shape = (E, I, H) if transposed else (E, H, I)
    w_gu = torch.empty(gu_shape, dtype=dtype, device="cuda").normal_(0, H ** -0.5)
    w_dn = torch.empty(dn_shape, dtype=dtype, device="cuda").normal_(0, I ** -0.5)
    b_gu = torch.empty(E, 2 * I, dtype=dtype, device="cuda").normal_(0, 0.02) if spec["bias"] else None
    b_dn = torch.empty(E, H, dtype=dtype, device="cuda").normal_(0, 0.02) if spec["bias"] else None
    return w_gu, w_dn, b_gu, b_dn


# ----------------------------------------------------------------------------- report


def _fmt(v, nd=1):
    if isinstance(v, float):
        return f"{v:.{nd}f}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    cols = [("model", "model"), ("T", "T"), ("budget", "C"), ("union", "U"), ("active", "kept"),
            ("floor_us", "floor µs"), ("ours_us", "ours µs"), ("ours_gbps", "GB/s"), ("ours_over_floor", "×floor"),
            ("plan_us", "plan µs"), ("ours_experts_us", "experts µs"), ("ours_experts_atomic_us", "atomic µs"),
            ("hf_grouped_mm_us", "hf grouped_mm µs"), ("hf_batched_mm_us", "hf batched_mm µs"),
            ("torch_grouped_mm_us", "F.grouped_mm µs"), ("reference_us", "reference µs")]
    lines = [f"# moespec layer benchmark — {meta['device']}", "",
             f"- date: {meta['date']}", f"- commit: {meta['git_commit']}", f"- command: `{meta['command']}`",
             f"- copy bandwidth: {meta['copy_bandwidth_gbps']:.0f} GB/s (read + write, 1 GiB copy_)",
             f"- routing: {meta['routing']}; dtype {meta['dtype']}; L2 flushed before each call; median of "
             f"{meta['iters']} CUDA-event timings; `ours` includes the routing plan, baselines time experts only.",
             "", "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('model')} | {r.get('T')} | {r.get('budget')} | error: {r['error'][:80]} |")
            continue
        lines.append("| " + " | ".join(_fmt(r.get(key), 2 if key == "ours_over_floor" else 1) for key, _ in cols) + " |")
    path.write_text("\n".join(lines) + "\n")


def git_commit() -> str:
    if os.environ.get("MOESPEC_GIT_COMMIT"):
        return os.environ["MOESPEC_GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:  # noqa: BLE001 - e.g. a copied tree without .git
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64")
    ap.add_argument("--budgets", default="none,8,16,32,64")
    ap.add_argument("--routing", default="iid", choices=["iid", "zipf", "tree"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--reference-max-t", type=int, default=4, help="time the (slow) reference up to this T")
    args = ap.parse_args(argv)

    reason = _cuda.unavailable_reason()
    if reason or not torch.cuda.is_available():
        print(f"bench_layer: CUDA kernels unavailable: {reason or 'torch sees no GPU'}", file=sys.stderr)
        return 2
    dev_name = torch.cuda.get_device_name(0)
    out_dir = Path(args.out or Path(__file__).parent / "results" / re.sub(r"[^A-Za-z0-9_.-]+", "-", dev_name))
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    tokens = [int(t) for t in args.tokens.split(",")]
    budgets = [None if b == "none" else int(b) for b in args.budgets.split(",")]

    bw = copy_bandwidth_gbps()
    timer = Timer(args.iters)
    meta = dict(command=" ".join([sys.executable] + sys.argv), date=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                device=dev_name, git_commit=git_commit(), torch=torch.__version__, copy_bandwidth_gbps=bw,
                routing=args.routing, dtype=args.dtype, iters=args.iters)
    print(f"device {dev_name}, copy bandwidth {bw:.0f} GB/s", flush=True)
    rows: list[dict] = []
    for name in args.models.split(","):
        spec = dict(MODELS[name], name=name)
        try:
            weights = make_weights(spec, dtype, 0)
        except torch.cuda.OutOfMemoryError as exc:
            rows.append(dict(model=name, T="-", budget="-", error=f"OOM allocating weights: {exc}"[:200]))
            continue
        gen = torch.Generator().manual_seed(1234)
        for T in tokens:
            for budget in budgets:
                if budget is not None and (budget >= spec["E"] or budget < spec["k"]):
                    continue  # a cap at or above E never binds; below k is invalid
                try:
                    row = run_case(spec, T, budget, args, timer, weights, gen, bw)
                except Exception as exc:  # noqa: BLE001 - record and continue
                    traceback.print_exc()
                    row = dict(model=name, T=T, budget=budget or "none", error=f"{type(exc).__name__}: {exc}"[:300])
                rows.append(row)
                print(json.dumps(row), flush=True)
                # Written after every case, so a run cut short by a time limit still leaves results.
                (out_dir / "bench_layer.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
                write_markdown(out_dir / "bench_layer.md", meta, rows)
        del weights
        torch.cuda.empty_cache()
    write_markdown(out_dir / "bench_layer.md", meta, rows)
    (out_dir / "bench_layer.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    print(f"wrote {out_dir / 'bench_layer.json'} and {out_dir / 'bench_layer.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
