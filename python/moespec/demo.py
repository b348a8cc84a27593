"""A small CPU demonstration of verification-time expert budgets on one MoE layer.

It routes a batch of draft tokens through a Qwen3-30B-A3B-shaped router (E=128, top-8,
renormalised), applies budgets under both policies, and reports what each budget keeps, the
expert bytes a GPU would stream at the real model's size, and how far the layer output moves
(computed on a scaled-down layer so it runs in a second on a CPU).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from . import ops
from .types import ExpertLayout

# Qwen3-30B-A3B routed experts (docs/design.md §5).
E, TOP_K, H_REAL, I_REAL = 128, 8, 2048, 768
BYTES_PER_EXPERT = 3 * H_REAL * I_REAL * 2  # bf16 gate, up, down
# Scaled-down hidden and expert width for the CPU forward (multiples of 8, not of 64).
H_DEMO, I_DEMO = 136, 56


def synthetic_router_logits(tokens: int, zipf: float, generator: torch.Generator) -> torch.Tensor:
    """``[tokens, E]`` logits: a Zipf expert popularity shared by all tokens plus per-token noise."""
    ranks = torch.randperm(E, generator=generator).float() + 1.0
    popularity = -zipf * torch.log(ranks)
    return popularity + 1.5 * torch.randn(tokens, E, generator=generator)


def run_demo(tokens: int = 16, seed: int = 0, zipf: float = 1.0, out_json: Optional[str] = None) -> list[dict]:
    """Print a table of budgets x policies and return its rows; ``out_json`` also writes them (its folder is
    created if missing, an existing file is overwritten)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
    if isinstance(zipf, bool) or not isinstance(zipf, (int, float)) or not math.isfinite(zipf) or zipf < 0:
        raise ValueError(f"zipf must be a finite number >= 0, got {zipf!r}")
    if out_json:
        out = Path(out_json)
        if out.is_dir():
            raise ValueError(f"out_json {out_json} is a folder, not a file")
        out.parent.mkdir(parents=True, exist_ok=True)  # before the work, so a bad path fails first
    g = torch.Generator().manual_seed(seed)
    logits = synthetic_router_logits(tokens, zipf, g)
    x = torch.randn(tokens, H_DEMO, generator=g)
    w_gate_up = torch.randn(E, 2 * I_DEMO, H_DEMO, generator=g) / H_DEMO**0.5
    w_down = torch.randn(E, H_DEMO, I_DEMO, generator=g) / I_DEMO**0.5
    layout = ExpertLayout()

    y_ref, base = ops.budgeted_moe(x, logits, w_gate_up, w_down, TOP_K, None, renormalize=True, layout=layout)
    rows = []
    for budget in (None, 8, 16, 32, 64):
        for policy in (("substitute", "truncate") if budget is not None else ("-",)):
            y, r = ops.budgeted_moe(x, logits, w_gate_up, w_down, TOP_K, budget,
                                    policy="substitute" if policy == "-" else policy, renormalize=True)
            # A pair is re-routed when its expert is not among the token's natural top-k, or was zeroed.
            natural = (r.topk_ids.unsqueeze(-1) == base.topk_ids.unsqueeze(1)).any(-1)
            changed = ~natural | (r.topk_weights == 0)
            rel_err = float((y - y_ref).norm() / y_ref.norm())
            rows.append({
                "budget": budget, "policy": policy, "union": r.union_size, "kept": r.kept_size,
                "expert_MB": round(r.kept_size * BYTES_PER_EXPERT / 1e6, 1),
                "bytes_vs_1_token": round(r.kept_size / TOP_K, 2),
                "pairs_rerouted_pct": round(100.0 * float(changed.float().mean()), 1),
                "output_rel_err": round(rel_err, 4),
            })

    print(f"moespec demo: one Qwen3-30B-A3B-shaped MoE layer (E={E}, top-{TOP_K}), {tokens} draft tokens "
          f"verified at once, Zipf skew {zipf}, seed {seed}, CPU reference")
    print(f"expert MB at the real size (bf16, {BYTES_PER_EXPERT / 1e6:.1f} MB per expert); "
          f"output error measured on a scaled-down layer (H={H_DEMO}, I={I_DEMO})\n")
    print(demo_table(rows))
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"tokens": tokens, "seed": seed, "zipf": zipf, "rows": rows}, f, indent=2)
    return rows


#: (row key, column header) of the printed table; README's demo table is this table, as printed.
DEMO_COLUMNS = [("budget", "budget"), ("policy", "policy"), ("union", "union"), ("kept", "kept"),
                ("expert_MB", "expert MB"), ("bytes_vs_1_token", "x one token"),
                ("pairs_rerouted_pct", "pairs rerouted %"), ("output_rel_err", "output rel. err")]


def demo_table(rows: list[dict], markdown: bool = False) -> str:
    """The demo's rows as a terminal table (or Markdown), budget None shown as ``none``."""
    from .bench.report import markdown_table, terminal_table

    shown = [dict(r, budget="none" if r["budget"] is None else r["budget"]) for r in rows]
    return markdown_table(shown, DEMO_COLUMNS) if markdown else terminal_table(shown, DEMO_COLUMNS)
