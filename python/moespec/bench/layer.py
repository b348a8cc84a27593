"""``moespec bench layer``: one budgeted MoE layer against its byte floor and the baselines.

For each shape, token count T, budget C and policy, every implementation runs on the same
inputs and the same budgeted routing (see `impls`). Reported per (case, implementation): time,
achieved GB/s, time over the byte floor, CUDA-graph use and the output's relative error
against `moespec.reference`. The floor is (bytes of the experts actually read + activations) /
measured copy bandwidth (docs/design.md §5).

`run_layer_bench` is the programmatic entry point (``bench/bench_layer.py`` can wrap it);
`write_layer_outputs` writes JSON, Markdown and PNG.
"""
from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import ops
from ..types import ExpertLayout
from . import report
from .impls import BUILDERS, INCLUDES_ROUTING, LayerCase, Unavailable
from .routing_gen import RoutingGenerator, parse_routing
from .shapes import LayerShape
from .timing import Timer, copy_bandwidth_gbps, graphed

COLUMNS = [("model", "model"), ("routing", "routing"), ("T", "T"), ("budget", "C"), ("policy", "policy"),
           ("union", "union"),
           ("kept", "kept"), ("active", "read"), ("impl", "impl"), ("time_us", "time µs"),
           ("floor_us", "floor µs"), ("x_floor", "× floor"), ("gbps", "GB/s"), ("rel_err", "rel err"),
           ("note", "note")]


@dataclass
class LayerBenchConfig:
    """What `run_layer_bench` sweeps (defaults: a small CPU run).

    budgets: None = unbudgeted; budgets >= E or < k are skipped for a shape (never binding / invalid).
    reference_max_t: on CUDA the (slow, eager) reference is timed only up to this T.
    """

    shapes: Sequence[LayerShape]
    tokens: Sequence[int] = (1, 4, 16)
    budgets: Sequence[Optional[int]] = (None, 16, 32)
    policies: Sequence[str] = ("substitute",)
    routing: str | Sequence[str] = "iid"  # one spec or several (each case runs under each)
    impls: Sequence[str] = ("moespec", "moespec-v2", "moespec-cpu", "reference", "hf-eager", "hf-grouped_mm",
                            "hf-batched_mm", "torch-grouped_mm")
    device: str = "cpu"
    dtype: str = "auto"
    iters: int = 20
    warmup: int = 3
    seed: int = 0
    reference_max_t: int = 16
    graphs: bool = True
    extra: dict = field(default_factory=dict)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPU, fp32 on CPU (CPU bf16 GEMMs are not representative)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def make_weights(shape: LayerShape, dtype: torch.dtype, device: torch.device, seed: int):
    """Random (never zero) expert weights of ``shape`` on ``device``, scaled like trained ones."""
    g = torch.Generator(device=device).manual_seed(seed)
    H, I, E = shape.H, shape.I, shape.E  # noqa: E741
    transposed = shape.layout == "gpt_oss"
    gu = (E, H, 2 * I) if transposed else (E, 2 * I, H)
    dn = (E, I, H) if transposed else (E, H, I)
    w_gu = torch.empty(gu, dtype=dtype, device=device).normal_(0, H ** -0.5, generator=g)
    w_dn = torch.empty(dn, dtype=dtype, device=device).normal_(0, I ** -0.5, generator=g)
    b_gu = b_dn = None
    if shape.bias:
        b_gu = torch.empty(E, 2 * I, dtype=dtype, device=device).normal_(0, 0.02, generator=g)
        b_dn = torch.empty(E, H, dtype=dtype, device=device).normal_(0, 0.02, generator=g)
    return w_gu, w_dn, b_gu, b_dn


def budget_problem(shape: LayerShape, budget: Optional[int]) -> Optional[str]:
    """Why ``budget`` is skipped for ``shape``, or None when it is run.

    A budget is run when `moespec.ops.validate_budget` accepts it for the shape's top-k (C >= k) and it
    can bind (C < E; a cap >= E is valid but never changes the routing, so it would only repeat the
    unbudgeted row)."""
    if budget is None:
        return None
    try:
        ops.validate_budget(budget, shape.k)
    except ValueError as exc:
        return str(exc)
    if budget >= shape.E:
        return f"C={budget} >= E={shape.E} never binds (same as unbudgeted)"
    return None


def valid_budgets(shape: LayerShape, budgets: Sequence[Optional[int]]) -> list[Optional[int]]:
    """The budgets that mean something for ``shape``: None, and k <= C < E (see `budget_problem`)."""
    return [b for b in budgets if budget_problem(shape, b) is None]


def impl_unavailable(name: str, device, shapes: Sequence[LayerShape] = ()) -> Optional[str]:
    """Why implementation ``name`` cannot run at all on ``device`` for ``shapes``, or None if it can
    (for at least one shape). Checked before any timing; per-case limits are still reported per row."""
    from .. import _cuda

    dev = torch.device(device)
    if name.startswith("moespec-cpu"):
        from .. import cpu_kernels

        if dev.type != "cpu":
            return f"the C++ CPU kernels run on CPU tensors (this run is on {dev.type})"
        return cpu_kernels.unavailable_reason()
    if name.startswith("moespec"):
        if dev.type != "cuda":
            return f"needs a CUDA device (this run is on {dev.type}; moespec's CPU kernels are 'moespec-cpu')"
        reason = _cuda.unavailable_reason()
        if reason:
            return f"the moespec CUDA kernels cannot run here: {reason}"
    if name.startswith("hf-") or name == "torch-grouped_mm":
        if name == "torch-grouped_mm" and not hasattr(torch.nn.functional, "grouped_mm"):
            return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
        if shapes and all(s.layout != "v5" for s in shapes):
            return "timed for the transformers v5 expert layout only (every chosen shape is gpt_oss)"
    return None


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def run_layer_bench(cfg: LayerBenchConfig, progress: Optional[Callable[[str], None]] = None,
                    argv: Optional[Sequence[str]] = None) -> dict:
    """Run the sweep; returns ``{"meta": {...}, "rows": [...]}`` (one row per case and implementation).

    Row fields: model, H, I, E, k, scale (1 = real shape), T, budget (None = unbudgeted), policy,
    routing, union, kept, active (experts whose weights are read), bytes, floor_us, impl,
    routing_included, time_us, gbps, x_floor, graph, rel_err (vs the reference, None when it was
    not run), note (why an implementation was skipped or failed).
    """
    for name, val, low in (("iters", cfg.iters, 1), ("warmup", cfg.warmup, 0),
                           ("reference_max_t", cfg.reference_max_t, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
    device = torch.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    specs = [cfg.routing] if isinstance(cfg.routing, str) else list(cfg.routing)
    generators: list[RoutingGenerator] = [parse_routing(s) for s in specs]
    routing_label = ", ".join(g.label for g in generators)
    say = progress or (lambda msg: None)
    bw = copy_bandwidth_gbps(device)
    timer = Timer(device, iters=cfg.iters, warmup=cfg.warmup)
    on_cpu = device.type != "cuda"
    meta = report.run_meta(device, argv)
    meta.update({
        "copy_bandwidth_gbps": bw, "timing": "wall-clock" if on_cpu else "cuda-events",
        "timing_method": timer.method, "dtype": str(dtype).replace("torch.", ""), "routing": routing_label,
        "cpu_reduced": on_cpu and any(s.scale > 1 for s in cfg.shapes),
        "graphs": bool(cfg.graphs and not on_cpu), "iters": cfg.iters, "seed": cfg.seed,
        "shapes": [s.to_dict() for s in cfg.shapes], "tokens": list(cfg.tokens),
        "budgets": list(cfg.budgets), "policies": list(cfg.policies), "impls": list(cfg.impls),
        **cfg.extra,
    })
    if meta["cpu_reduced"]:
        meta["label"] = ("CPU run, reduced shapes: H and I divided by the 'scale' of each shape; "
                         "wall-clock timing; not comparable with GPU results")
    elif on_cpu:
        meta["label"] = "CPU run: wall-clock timing; not comparable with GPU results"
    say(f"device {meta['device']}; copy bandwidth {bw:.1f} GB/s; dtype {meta['dtype']}; "
        f"routing {routing_label}{'; REDUCED CPU SHAPES' if meta['cpu_reduced'] else ''}")

    rows: list[dict] = []
    for shape in cfg.shapes:
        layout = ExpertLayout.gpt_oss() if shape.layout == "gpt_oss" else ExpertLayout()
        weights = make_weights(shape, dtype, device, cfg.seed)
        w_gu, w_dn, b_gu, b_dn = weights
        per_expert = shape.expert_bytes(w_gu.element_size())
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        budgets = valid_budgets(shape, cfg.budgets)
        for gen_routing, T in ((g, t) for g in generators for t in cfg.tokens):
            logits = gen_routing.logits(T, shape.E, gen).to(device)
            x = torch.randn(T, shape.H, generator=gen).to(dtype).to(device)
            for budget in budgets:
                for policy in (cfg.policies if budget is not None else ("substitute",)):
                    base = dict(model=shape.name, H=shape.H, I=shape.I, E=shape.E, k=shape.k, scale=shape.scale,
                                T=T, budget=budget, policy=policy if budget is not None else "-",
                                routing=gen_routing.label)
                    try:
                        rows += _run_case(shape, layout, weights, x, logits, budget, policy, base, cfg, timer, bw,
                                          per_expert, say)
                    except Exception as exc:  # noqa: BLE001 - record the failure, keep sweeping
                        traceback.print_exc(file=sys.stderr)
                        rows.append(dict(base, impl="-", note=f"error: {type(exc).__name__}: {exc}"[:300]))
        del weights, w_gu, w_dn, b_gu, b_dn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"meta": meta, "rows": rows}


def _run_case(shape, layout, weights, x, logits, budget, policy, base, cfg, timer, bw, per_expert, say):
    w_gu, w_dn, b_gu, b_dn = weights
    T = x.shape[0]
    r = ops.budget_routing(logits, shape.k, budget, policy, shape.renorm, backend="reference")
    nonzero = r.topk_weights != 0
    active = int(torch.unique(r.topk_ids[nonzero]).numel())
    # Zero-weight pairs (truncate) point at a kept expert, so baselines read only kept experts.
    baseline_ids = torch.where(nonzero, r.topk_ids, r.kept_experts[0].to(r.topk_ids.dtype))
    case = LayerCase(x, logits, w_gu, w_dn, b_gu, b_dn, shape.k, budget, policy, shape.renorm, layout,
                     r.topk_ids, r.topk_weights, r.kept_experts, baseline_ids)
    act_bytes = 2 * T * shape.H * x.element_size() + logits.numel() * logits.element_size()
    nbytes = active * per_expert + act_bytes
    floor_us = nbytes / (bw * 1e9) * 1e6
    base = dict(base, union=r.union_size, kept=r.kept_size, active=active, bytes=nbytes, floor_us=floor_us)
    ref_out = ops.budgeted_moe(x, logits, w_gu, w_dn, shape.k, budget, policy, shape.renorm, layout=layout,
                               b_gate_up=b_gu, b_down=b_dn, backend="reference")[0]
    rows = []
    for name in cfg.impls:
        row = dict(base, impl=name, routing_included=INCLUDES_ROUTING.get(name, False), time_us=None, gbps=None,
                   x_floor=None, graph=False, rel_err=None, note="")
        if name == "reference" and x.is_cuda and T > cfg.reference_max_t:
            row["note"] = f"skipped: T > --reference-max-t {cfg.reference_max_t}"
            rows.append(row)
            continue
        try:
            fn = BUILDERS[name](case)
            y = fn()
            row["rel_err"] = _rel_err(y, ref_out) if y is not None else None
            timed, row["graph"] = graphed(fn, x.device) if cfg.graphs else (fn, False)
            us = timer.time_us(timed)
            row.update(time_us=us, gbps=nbytes / (us * 1e-6) / 1e9, x_floor=us / floor_us)
        except Unavailable as why:
            row["note"] = f"n/a: {why}"
        except Exception as exc:  # noqa: BLE001 - a baseline failing must not end the run
            row["note"] = f"error: {type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        say(f"{shape.name} T={T} C={budget if budget is not None else 'none'} {base['policy']} {name}: "
            + (f"{row['time_us']:.1f} us ({row['x_floor']:.2f}x floor)" if row["time_us"] else row["note"]))
    return rows


def pivot(rows: Sequence[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """One row per case with each implementation's time (and × floor) side by side.

    Returns ``(rows, columns)`` for `report.terminal_table` / `report.markdown_table`."""
    impls = list(dict.fromkeys(r["impl"] for r in rows if r.get("time_us")))
    cases: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r.get("routing"), r["T"], r["budget"], r["policy"])
        case = cases.setdefault(key, {k: r.get(k) for k in ("model", "routing", "T", "budget", "policy", "union",
                                                             "kept", "floor_us")})
        if r.get("time_us"):
            case[r["impl"]] = f"{report.fmt(r['time_us'])} ({report.fmt(r['x_floor'], 2)}×)"
    cols = [("model", "model"), ("routing", "routing"), ("T", "T"), ("budget", "C"), ("policy", "policy"),
            ("union", "union"),
            ("kept", "kept"), ("floor_us", "floor µs")] + [(i, f"{i} µs (×floor)") for i in impls]
    return list(cases.values()), cols


# Column names used by bench/bench_layer.py for each implementation's time.
WIDE_KEYS = {"moespec": "ours_us", "moespec-plan": "plan_us", "moespec-experts": "ours_experts_us",
             "moespec-cpu": "ours_cpu_us", "moespec-cpu-experts": "ours_cpu_experts_us",
             "moespec-experts-atomic": "ours_experts_atomic_us", "hf-eager": "hf_eager_us",
             "hf-grouped_mm": "hf_grouped_mm_us", "hf-batched_mm": "hf_batched_mm_us",
             "torch-grouped_mm": "torch_grouped_mm_us", "reference": "reference_us"}


def wide_rows(rows: Sequence[dict]) -> list[dict]:
    """One dict per case in ``bench/bench_layer.py``'s flat format (``ours_us``, ``plan_us``, ...,
    ``ours_gbps``, ``ours_over_floor``), so that script can become a thin wrapper of `run_layer_bench`."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r.get("routing"), r["T"], r["budget"], r["policy"])
        case = out.setdefault(key, dict(model=r["model"], T=r["T"], routing=r.get("routing"), policy=r["policy"],
                                         budget=r["budget"] if r["budget"] is not None else "none",
                                         union=r.get("union"), kept=r.get("kept"), active=r.get("active"),
                                         bytes=r.get("bytes"), floor_us=r.get("floor_us")))
        name = WIDE_KEYS.get(r["impl"])
        if name is None:
            continue
        case[name] = r["time_us"] if r.get("time_us") is not None else (r.get("note") or None)
        if r["impl"] == "moespec" and r.get("time_us"):
            case.update(ours_graph=r["graph"], ours_gbps=r["gbps"], ours_over_floor=r["x_floor"])
        if r.get("rel_err") is not None and r["impl"] != "reference":
            case[f"max_rel_err_{name[:-3]}_vs_reference"] = r["rel_err"]
    return list(out.values())


def primary_impl(rows: Sequence[dict]) -> Optional[str]:
    """The implementation the plot follows: moespec (CUDA, else CPU kernels) where it ran, else the reference,
    else the first timed."""
    timed = [r["impl"] for r in rows if r.get("time_us")]
    for name in ("moespec", "moespec-cpu", "reference"):
        if name in timed:
            return name
    return timed[0] if timed else None


def plot_layer(result: dict, path: Path) -> Optional[Path]:
    """PNG: time against T per budget (solid) with the byte floor (dashed), one panel per shape."""
    plt = report.matplotlib_pyplot()
    rows = [r for r in result["rows"] if r.get("time_us")]
    if plt is None or not rows:
        return None
    impl = primary_impl(rows)
    models = list(dict.fromkeys((r["model"], r.get("routing")) for r in rows))
    ncols = min(3, len(models))
    nrows = -(-len(models) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, (model, routing) in zip(axes.flat, models):
        mine = [r for r in rows if r["model"] == model and r.get("routing") == routing and r["impl"] == impl
                and r["policy"] in ("-", result["meta"]["policies"][0])]
        budgets = list(dict.fromkeys(r["budget"] for r in mine))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, b in enumerate(budgets):
            pts = sorted((r["T"], r["time_us"], r["floor_us"]) for r in mine if r["budget"] == b)
            c = colors[i % len(colors)]
            label = "no budget" if b is None else f"C={b}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=f"{label}")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "--", color=c, alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens verified at once (T)")
        ax.set_ylabel("time per layer (µs)")
        ax.set_title(f"{model} — {routing} routing", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title=f"{impl} (dashed: byte floor)", title_fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"moespec bench layer — {meta['device']}"
                 + (" — reduced CPU shapes" if meta.get("cpu_reduced") else ""), fontsize=10)
    return report.save_figure(fig, path)


def layer_markdown(result: dict) -> str:
    """The Markdown report: run description and the full table."""
    meta = result["meta"]
    extra = [f"copy bandwidth {meta['copy_bandwidth_gbps']:.1f} GB/s (read + write); dtype {meta['dtype']}; "
             f"routing {meta['routing']}", f"timing: {meta['timing_method']}; CUDA graphs: {meta['graphs']}",
             "floor = (bytes of experts read + activations) / copy bandwidth; `moespec`, `moespec-cpu` and "
             "`reference` include the routing/budget step, the other baselines time the experts only over the "
             "same routing"]
    if meta.get("label"):
        extra.insert(0, f"**{meta['label']}**")
    lines = [f"# moespec bench layer — {meta['device']}", ""] + report.meta_markdown(meta, extra) + [""]
    prow, pcols = pivot(result["rows"])
    lines += ["## Time per implementation", "", report.markdown_table(prow, pcols), "",
              "## All measurements", "", report.markdown_table(result["rows"], COLUMNS)]
    return "\n".join(lines) + "\n"


def write_layer_outputs(result: dict, out_dir: Path, stem: str = "bench_layer", png: bool = True) -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>.png``; returns their paths."""
    return report.write_outputs(result, out_dir, stem, layer_markdown, plot_layer, png)


__all__ = ["LayerBenchConfig", "run_layer_bench", "pivot", "wide_rows", "write_layer_outputs", "plot_layer",
           "layer_markdown",
           "make_weights", "valid_budgets", "budget_problem", "impl_unavailable", "COLUMNS"]
