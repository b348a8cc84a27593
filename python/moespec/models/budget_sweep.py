"""What an expert budget costs: a fine sweep of budget rules on the shipped demo models.

    moespec bench quality --out bench/results/cpu          # or: python -m moespec.models.budget_sweep

For every draft shape (a chain and a tree) and every budget rule -- a fixed cap C from k to the
largest union seen, a coverage target tau, each under both policies and both candidate sets --
greedy speculative decoding with the shipped draft model is compared with the same run without a
budget:

- acceptance: tokens emitted per verification;
- agreement: greedy token match with the unbudgeted output, and the first divergence;
- perplexity: held-out text fed in chunks of the draft size, each chunk one budgeted forward over
  the KV cache (as verification sees it);
- expert bytes per emitted token (routed experts actually read, over the decode loop);
- per MoE layer: how often the budget binds, and the share of the unbudgeted routing weight that
  sat on dropped experts, per verification.

The rule recommended for ``budget="auto"`` is the cheapest (fewest expert bytes per token) that
keeps acceptance within 2 % of unbudgeted and greedy agreement >= 95 % on every shape
(`recommend`). Writes ``budget_sweep.json``, ``budget_sweep.md`` and ``budget_sweep.png``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["Rule", "sweep_rules", "run_sweep", "recommend", "compare_candidates", "merge_reports", "to_markdown", "plot_sweep",
           "write_report", "main"]

COVERAGES = (0.8, 0.9, 0.95, 0.98, 0.99)
POLICIES = ("substitute", "truncate")
CANDIDATE_SETS = ("all", "union")
# Acceptance within this share of unbudgeted, and at least this greedy agreement (issue 13's bar).
ACCEPTANCE_TOLERANCE = 0.02
MIN_AGREEMENT = 0.95


@dataclass(frozen=True)
class Rule:
    """One budget rule: a fixed cap, or a coverage target (clamped to ``[k, cap]``), with its policy
    and candidate set. ``kind="none"`` is the unbudgeted baseline."""

    kind: str  # "none" | "fixed" | "coverage"
    budget: Optional[int] = None
    coverage: Optional[float] = None
    policy: str = "substitute"
    candidates: str = "all"

    @property
    def name(self) -> str:
        if self.kind == "none":
            return "none"
        what = f"C={self.budget}" if self.kind == "fixed" else f"tau={self.coverage}"
        return f"{what} {self.policy}/{self.candidates}"

    @property
    def family(self) -> str:
        """The line a rule belongs to in the plot (all values of one rule kind, policy, candidates)."""
        return family(self.to_dict())

    def config(self):
        """The `moespec.integrations.BudgetConfig` that runs this rule (None for the baseline)."""
        if self.kind == "none":
            return None
        from ..integrations import BudgetConfig

        return BudgetConfig(self.budget, self.policy, "prob", self.coverage, None, "auto", self.candidates)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "budget": self.budget, "coverage": self.coverage,
                "policy": self.policy, "candidates": self.candidates}


def family(rule: dict) -> str:
    """The family of a rule given as `Rule.to_dict` (as recorded in the JSON): kind, policy, candidates."""
    if rule["kind"] == "none":
        return "none"
    return f"{'fixed C' if rule['kind'] == 'fixed' else 'coverage'} {rule['policy']}/{rule['candidates']}"


def sweep_rules(top_k: int, max_union: int, coverages: Sequence[float] = COVERAGES,
                caps: Optional[Sequence[int]] = None) -> list[Rule]:
    """The baseline, every fixed C in ``[top_k, max_union - 1]`` (C >= the largest union never binds;
    ``caps`` replaces that range) and every coverage target, each under both policies and both
    candidate sets."""
    caps = list(range(top_k, max_union)) if caps is None else [int(c) for c in caps]
    rules = [Rule("none")]
    for policy in POLICIES:
        for cand in CANDIDATE_SETS:
            rules += [Rule("fixed", budget=c, policy=policy, candidates=cand) for c in caps]
            rules += [Rule("coverage", coverage=t, policy=policy, candidates=cand) for t in coverages]
    return rules


def _run_shape(target, draft_model, prompts, max_new, shape, rule: Rule, base_out=None):
    from moespec import speculative as spec

    outs, emitted, iters, accepted, nbytes, tokens = [], 0, 0, 0, 0, 0
    per_layer: dict[int, dict] = {}
    unions = []
    for p in prompts:
        toks, st = spec.generate(target, p, drafter=spec.DraftModelDrafter(draft_model), max_new_tokens=max_new,
                                 draft=shape, budget=rule.config(), routing_stats=True,
                                 threads=torch.get_num_threads())
        outs.append(toks[0, p.numel():].tolist())
        for r in st.iterations:
            nbytes += int(r.expert_bytes or 0)
            tokens += r.emitted
            if r.draft_size == 0:
                continue
            iters += 1
            emitted += r.emitted
            accepted += r.accepted
            for layer in r.layers or []:
                d = per_layer.setdefault(layer["layer"], {"calls": 0, "binds": 0, "dropped_mass": 0.0, "union": 0,
                                                          "kept": 0, "read": 0})
                d["calls"] += 1
                d["binds"] += int(layer["budgeted"] and layer["kept_size"] < layer["union_size"])
                d["dropped_mass"] += float(layer.get("dropped_mass") or 0.0)
                d["union"] += layer["union_size"]
                d["kept"] += layer["kept_size"]
                d["read"] += layer.get("read_size", layer["kept_size"])
                unions.append(layer["union_size"])
    row = {
        "tokens_per_verification": round(emitted / max(iters, 1), 4),
        "mean_accepted": round(accepted / max(iters, 1), 4),
        "expert_bytes_per_token": round(nbytes / max(tokens, 1), 1),
        "max_union": max(unions) if unions else 0,
        "layers": [{"layer": i, "bind_rate": round(d["binds"] / d["calls"], 4),
                    "dropped_mass": round(d["dropped_mass"] / d["calls"], 5),
                    "mean_union": round(d["union"] / d["calls"], 2), "mean_kept": round(d["kept"] / d["calls"], 2),
                    "mean_read": round(d["read"] / d["calls"], 2)}
                   for i, d in sorted(per_layer.items())],
    }
    if base_out is not None:
        match, first, total = 0, [], 0
        for out, ref in zip(outs, base_out):
            same = [a == b for a, b in zip(out, ref)]
            match += sum(same)
            total += len(ref)
            first.append(same.index(False) if False in same else len(same))
        row["token_match_rate"] = round(match / max(total, 1), 4)
        row["mean_first_divergence"] = round(sum(first) / len(first), 2)
    return row, outs


def _perplexity(target, stream, chunk: int, rule: Rule, windows: int) -> float:
    from .evaluate import chunked_perplexity

    cfg = rule.config()
    if cfg is None:
        return chunked_perplexity(target, stream, chunk, None, "substitute", windows)
    return chunked_perplexity(target, stream, chunk, cfg, cfg.policy, windows)


def run_sweep(target, draft_model, prompts, stream, shapes, max_new: int, windows: int,
              coverages: Sequence[float] = COVERAGES, progress=None, caps: Optional[Sequence[int]] = None) -> dict:
    """Every rule of `sweep_rules` on every shape; returns ``{"shapes": [...], "rows": [...]}``.

    Args:
        target, draft_model: transformers causal LMs (the target an MoE); prompts: ``[S]`` id tensors;
        stream: held-out ids for the perplexity; shapes: ``(name, DraftConfig)`` pairs; caps: fixed
        caps to try (default every C from top-k to the shape's largest unbudgeted union - 1)."""
    cfg = target.config
    k = int(cfg.num_experts_per_tok)
    shapes_out, rows = [], []
    for name, shape in shapes:
        base_row, base_out = _run_shape(target, draft_model, prompts, max_new, shape, Rule("none"))
        base_row.update(token_match_rate=1.0, mean_first_divergence=float(max_new))
        chunk = shape.size
        base_row["heldout_ppl"] = round(_perplexity(target, stream, chunk, Rule("none"), windows), 4)
        max_union = base_row["max_union"]
        shapes_out.append({"name": name, "shape": shape.to_dict(), "nodes": shape.size, "chunk": chunk,
                           "max_union": max_union})
        rules = sweep_rules(k, max_union, coverages, caps)
        for i, rule in enumerate(rules):
            if rule.kind == "none":
                row = dict(base_row)
            else:
                row, _ = _run_shape(target, draft_model, prompts, max_new, shape, rule, base_out)
                row["heldout_ppl"] = round(_perplexity(target, stream, chunk, rule, windows), 4)
            row.update(shape=name, rule=rule.to_dict())
            rows.append(row)
            if progress is not None:
                progress(f"[{name} {i + 1}/{len(rules)}] {rule.name}: tpv {row['tokens_per_verification']} "
                         f"match {row['token_match_rate']} bytes/token {row['expert_bytes_per_token']} "
                         f"ppl {row['heldout_ppl']}")
    return {"shapes": shapes_out, "rows": rows}


def _rule_key(rule: dict) -> tuple:
    return (rule["kind"], rule["budget"], rule["coverage"], rule["policy"], rule["candidates"])


def recommend(result: dict, acceptance_tolerance: float = ACCEPTANCE_TOLERANCE,
              min_agreement: float = MIN_AGREEMENT) -> dict:
    """The cheapest rule that passes on every shape.

    A rule passes a shape when its tokens per verification are at least ``1 - acceptance_tolerance``
    of the unbudgeted run's and its greedy token match is at least ``min_agreement``. Cost: expert
    bytes per token relative to unbudgeted, averaged over the shapes; among rules of equal cost (to
    0.1 %) the most conservative wins (coverage before a fixed cap, then the highest tau or C, then
    the union, then substitute). Returns the rule, its cost and per-shape numbers, plus the cheapest
    passing rule of each family (for the report).
    """
    base = {r["shape"]: r for r in result["rows"] if r["rule"]["kind"] == "none"}
    by_rule: dict[tuple, list] = {}
    for r in result["rows"]:
        if r["rule"]["kind"] != "none":
            by_rule.setdefault(_rule_key(r["rule"]), []).append(r)
    passing, per_shape_best = [], {}
    for key, rows in by_rule.items():
        for r in rows:  # the cheapest rule that passes each shape on its own (a near miss overall)
            b = base[r["shape"]]
            rel = r["expert_bytes_per_token"] / b["expert_bytes_per_token"]
            if (r["tokens_per_verification"] >= (1 - acceptance_tolerance) * b["tokens_per_verification"]
                    and r["token_match_rate"] >= min_agreement
                    and rel < per_shape_best.get(r["shape"], {}).get("relative_bytes", float("inf"))):
                per_shape_best[r["shape"]] = {"rule": r["rule"], "relative_bytes": round(rel, 4)}
        if len(rows) != len(base):
            continue
        ok = all(r["tokens_per_verification"] >= (1 - acceptance_tolerance) * base[r["shape"]]["tokens_per_verification"]
                 and r["token_match_rate"] >= min_agreement for r in rows)
        if ok:
            cost = sum(r["expert_bytes_per_token"] / base[r["shape"]]["expert_bytes_per_token"] for r in rows) / len(rows)
            passing.append((round(cost, 4), key, rows))
    if not passing:
        return {"rule": None, "reason": "no budgeted rule met the bar on every shape", "per_shape_best": per_shape_best}
    # Equal cost (to 0.1 %): the most conservative rule, i.e. a coverage target (it adapts per layer
    # and call) with the highest tau, else the largest C; then the default candidates, then substitute.
    def order(p):
        kind, budget, coverage, policy, cand = p[1]
        loose = -(coverage or 0.0) if kind == "coverage" else -(budget or 0)
        return (round(p[0], 3), kind != "coverage", loose, cand != "union", policy != "substitute")

    passing.sort(key=order)
    best = passing[0]
    families: dict[str, dict] = {}
    for cost, key, rows in passing:
        rule = rows[0]["rule"]
        fam = family(rule)
        if fam not in families:
            families[fam] = {"rule": rule, "relative_bytes": cost}
    return {
        "rule": best[2][0]["rule"], "relative_bytes": best[0],
        "per_shape": {r["shape"]: {k: r[k] for k in ("tokens_per_verification", "token_match_rate",
                                                      "expert_bytes_per_token", "heldout_ppl")} for r in best[2]},
        "criteria": {"acceptance_within": acceptance_tolerance, "min_token_match": min_agreement},
        "cheapest_per_family": families,
        "per_shape_best": per_shape_best,
    }


def compare_candidates(result: dict) -> dict:
    """MoE-Spec's candidate set ("all") against the union, per policy and shape, over the fixed caps
    that bind (the rows where both sets were run): mean greedy token match, tokens per verification,
    held-out perplexity and expert bytes per token, and how often "all" has the higher token match."""
    out: dict = {}
    for policy in POLICIES:
        for sh in result["shapes"]:
            pairs = {}
            for r in result["rows"]:
                rule = r["rule"]
                if r["shape"] == sh["name"] and rule["kind"] == "fixed" and rule["policy"] == policy:
                    pairs.setdefault(rule["budget"], {})[rule["candidates"]] = r
            both = [p for c, p in sorted(pairs.items()) if len(p) == 2]
            if not both:
                continue
            entry = {"caps": len(both)}
            for cand in CANDIDATE_SETS:
                for key in ("token_match_rate", "tokens_per_verification", "heldout_ppl", "expert_bytes_per_token"):
                    entry[f"{cand}_{key}"] = round(sum(p[cand][key] for p in both) / len(both), 4)
            entry["all_wins_match"] = sum(p["all"]["token_match_rate"] > p["union"]["token_match_rate"] for p in both)
            entry["union_wins_match"] = sum(p["union"]["token_match_rate"] > p["all"]["token_match_rate"] for p in both)
            out[f"{policy} / {sh['name']}"] = entry
    return out


def to_markdown(rep: dict) -> str:
    res = rep["result"]
    lines = ["# What an expert budget costs (shipped demo models, CPU)", "",
             f"`{rep['command']}` on {rep['device']}, {rep['date']}, commit `{rep['git_commit']}`; "
             f"{rep['config']['prompts']} held-out prompts x {rep['config']['max_new']} new tokens, greedy; "
             f"perplexity over {rep['config']['windows']} held-out windows in chunks of the draft size."
             + (f" Merged by `{rep['merged_by']}`." if rep.get("merged_by") else ""), ""]
    rec = rep["recommendation"]
    if rec.get("rule"):
        r = rec["rule"]
        lines += [f"**Recommended (`budget=\"auto\"`): {r['name']}**: {rec['relative_bytes']:.1%} of the unbudgeted "
                  f"expert bytes per token, acceptance within {rec['criteria']['acceptance_within']:.0%} and greedy "
                  f"agreement >= {rec['criteria']['min_token_match']:.0%} on every shape.", "",
                  "Cheapest passing rule per family:", "", "| family | rule | expert bytes vs unbudgeted |",
                  "|---|---|---|"]
        for fam, d in rec["cheapest_per_family"].items():
            lines.append(f"| {fam} | {d['rule']['name']} | {d['relative_bytes']:.1%} |")
        lines.append("")
    if rec.get("per_shape_best"):
        lines += ["Cheapest rule meeting the bar on one shape alone:", "", "| shape | rule | expert bytes vs unbudgeted |",
                  "|---|---|---|"]
        for shape, d in rec["per_shape_best"].items():
            lines.append(f"| {shape} | {d['rule']['name']} | {d['relative_bytes']:.1%} |")
        lines.append("")
    else:
        lines += [f"No recommendation: {rec.get('reason')}", ""]
    cmp_ = compare_candidates(res)
    if cmp_:
        lines += ["Candidate sets at equal fixed C (means over every C both were run with; wins = caps where one set "
                  "has the higher token match):", "",
                  "| policy / shape | caps | token match all / union | tokens per verification all / union | "
                  "held-out ppl all / union | expert MB/token all / union | wins all / union |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in cmp_.items():
            lines.append(f"| {name} | {e['caps']} | {e['all_token_match_rate']} / {e['union_token_match_rate']} | "
                         f"{e['all_tokens_per_verification']} / {e['union_tokens_per_verification']} | "
                         f"{e['all_heldout_ppl']} / {e['union_heldout_ppl']} | "
                         f"{e['all_expert_bytes_per_token'] / 1e6:.3f} / {e['union_expert_bytes_per_token'] / 1e6:.3f} | "
                         f"{e['all_wins_match']} / {e['union_wins_match']} |")
        lines.append("")
    for sh in res["shapes"]:
        rows = [r for r in res["rows"] if r["shape"] == sh["name"]]
        base = rows[0]
        lines += [f"## {sh['name']} ({sh['nodes']} draft nodes; largest union {sh['max_union']} experts)", "",
                  "| rule | tokens/verification | token match | first divergence | held-out ppl | "
                  "expert MB/token | vs none |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            rel = r["expert_bytes_per_token"] / base["expert_bytes_per_token"]
            lines.append(f"| {r['rule']['name']} | {r['tokens_per_verification']} | {r['token_match_rate']} | "
                         f"{r['mean_first_divergence']} | {r['heldout_ppl']} | "
                         f"{r['expert_bytes_per_token'] / 1e6:.3f} | {rel:.1%} |")
        lines.append("")
        if rec.get("rule"):
            rr = next((r for r in rows if r["rule"]["name"] == rec["rule"]["name"]), None)
            if rr is not None:
                lines += [f"Per layer under {rr['rule']['name']}:", "",
                          "| layer | cap binds (share of verifications) | routing weight dropped per verification | "
                          "union | kept | read |", "|---|---|---|---|---|---|"]
                for L in rr["layers"]:
                    lines.append(f"| {L['layer']} | {L['bind_rate']:.1%} | {L['dropped_mass']:.2%} | "
                                 f"{L['mean_union']} | {L['mean_kept']} | {L['mean_read']} |")
                lines.append("")
    return "\n".join(lines) + "\n"


def plot_sweep(rep: dict, path: Path) -> Optional[Path]:
    """Acceptance and agreement against expert bytes per token, one line per rule family and shape."""
    from ..bench import report

    plt = report.matplotlib_pyplot()
    if plt is None:
        return None
    res = rep["result"]
    shapes = [s["name"] for s in res["shapes"]]
    fig, axes = plt.subplots(2, len(shapes), figsize=(6.5 * len(shapes), 8.5), squeeze=False)
    for j, shape in enumerate(shapes):
        rows = [r for r in res["rows"] if r["shape"] == shape]
        base = rows[0]
        fams: dict[str, list] = {}
        for r in rows[1:]:
            rule = r["rule"]
            fams.setdefault(family(rule), []).append(r)
        for i, (metric, label) in enumerate((("tokens_per_verification", "tokens per verification"),
                                             ("token_match_rate", "greedy agreement (token match)"))):
            ax = axes[i][j]
            for fam, rs in sorted(fams.items()):
                # In the order of the rule's own knob (C, or tau), from tight to loose.
                rs = sorted(rs, key=lambda r: r["rule"]["budget"] or r["rule"]["coverage"] or 0)
                ax.plot([r["expert_bytes_per_token"] / 1e6 for r in rs], [r[metric] for r in rs],
                        marker="o" if fam.startswith("fixed") else "s", markersize=3, linewidth=1, label=fam)
            ax.scatter([base["expert_bytes_per_token"] / 1e6], [base[metric]], color="black", zorder=5,
                       label="no budget")
            if metric == "tokens_per_verification":
                ax.axhline((1 - ACCEPTANCE_TOLERANCE) * base[metric], color="grey", linestyle=":", linewidth=1)
            else:
                ax.axhline(MIN_AGREEMENT, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("expert MB read per emitted token")
            ax.set_ylabel(label)
            ax.set_title(f"{shape}: {label}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Budget rules on the shipped demo models (dotted: the bar for budget=\"auto\")")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_shapes():
    from moespec.speculative import DraftConfig

    return [("chain K=8", DraftConfig.chain(8)), ("tree 16 nodes", DraftConfig.tree(4, 3, 16))]


def build_parser(p: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m moespec.models.budget_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results/cpu"),
                   help="output folder for budget_sweep.json/.md/.png (default: bench/results/cpu for "
                        "`python -m moespec.models.budget_sweep`, ./moespec_results for `moespec bench quality`)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (default 8)")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--max-new", type=int, default=48, help="new tokens per prompt (default 48)")
    p.add_argument("--windows", type=int, default=4, help="256-token held-out windows for perplexity (default 4)")
    p.add_argument("--shapes", default="chain,tree", help="comma list of chain, tree (default both)")
    p.add_argument("--coverages", default=",".join(str(c) for c in COVERAGES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", type=Path, default=None, help="model folder (default: the shipped assets)")
    p.add_argument("--target", choices=["coarse", "fine"], default="coarse",
                   help="which shipped target: coarse (32 experts top-4) or fine (128 experts top-8)")
    p.add_argument("--caps", default=None,
                   help="comma list of fixed caps C to sweep (default every C from top-k to the largest union; "
                        "on the fine target a sampled list keeps the run within the hour)")
    p.add_argument("--name", default="budget_sweep", help="file stem of the outputs (default budget_sweep)")
    return p


def run(args, argv_text: str) -> int:
    from . import load_draft, load_target, load_tokenizer
    from .evaluate import heldout_ids, make_prompts

    for name in ("prompts", "prompt_len", "max_new", "windows", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    kinds = [s.strip() for s in args.shapes.split(",") if s.strip()]
    shapes = [s for s in default_shapes() if s[0].split()[0] in kinds]
    if not shapes or len(shapes) != len(kinds):
        raise ValueError(f"--shapes takes a comma list of chain, tree; got {args.shapes!r}")
    try:
        coverages = tuple(float(c) for c in args.coverages.split(",") if c.strip())
    except ValueError:
        raise ValueError(f"--coverages takes a comma list of numbers in (0, 1], got {args.coverages!r}") from None
    if not all(0 < c <= 1 for c in coverages):
        raise ValueError(f"--coverages must lie in (0, 1], got {args.coverages!r}")
    from ..cli import prepare_output_dir

    prepare_output_dir(args.out)
    from ..bench.report import git_commit

    commit = git_commit()  # the code that runs: HEAD may move during a long sweep
    torch.set_num_threads(args.threads)
    t0 = time.time()
    caps = None
    if args.caps:
        try:
            caps = sorted({int(c) for c in args.caps.split(",") if c.strip()})
        except ValueError:
            raise ValueError(f"--caps takes a comma list of integers, got {args.caps!r}") from None
    target = load_target(root=args.models, name=getattr(args, "target", "coarse"))
    draft_model = load_draft(root=args.models)
    if caps and min(caps) < int(target.config.num_experts_per_tok):
        raise ValueError(f"--caps must be >= the target's top-k ({target.config.num_experts_per_tok}), got {caps}")
    tok = load_tokenizer(root=args.models)
    stream = heldout_ids(tok, 64 * 256 + 1)
    prompts = make_prompts(stream, args.prompts, args.prompt_len)
    result = run_sweep(target, draft_model, prompts, stream, shapes, args.max_new, args.windows, coverages,
                       progress=lambda m: print(m, file=sys.stderr, flush=True), caps=caps)
    rep = {
        "command": argv_text,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s))",
        "git_commit": commit,
        "config": {"prompts": args.prompts, "prompt_len": args.prompt_len, "max_new": args.max_new,
                   "windows": args.windows, "coverages": list(coverages), "caps": caps,
                   "target": getattr(args, "target", "coarse"),
                   "model": {"experts": int(target.config.num_experts), "top_k": int(target.config.num_experts_per_tok),
                             "moe_layers": int(target.config.num_hidden_layers)}},
        "result": result,
    }
    rep["recommendation"] = recommend(result)
    rep["candidates_comparison"] = compare_candidates(result)
    rep["seconds"] = round(time.time() - t0, 1)
    write_report(rep, args.out, getattr(args, "name", "budget_sweep"))
    print(to_markdown(rep))
    return 0


def merge_reports(reports: Sequence[dict]) -> dict:
    """One report from sweeps run separately per shape (e.g. in parallel processes) with the same
    settings; the recommendation is recomputed over all shapes."""
    if not reports:
        raise ValueError("nothing to merge")
    keys = ("prompts", "prompt_len", "max_new", "windows", "coverages", "model")
    first = reports[0]
    for rep in reports[1:]:
        if any(rep["config"].get(k) != first["config"].get(k) for k in keys):
            raise ValueError("the reports were run with different settings; merge only sweeps of one configuration")
    names = [sh["name"] for rep in reports for sh in rep["result"]["shapes"]]
    if len(set(names)) != len(names):
        raise ValueError(f"a shape appears in more than one report: {names}")
    result = {"shapes": [sh for rep in reports for sh in rep["result"]["shapes"]],
              "rows": [r for rep in reports for r in rep["result"]["rows"]]}
    merged = dict(first, result=result, command=" ; ".join(rep["command"] for rep in reports),
                  git_commit=",".join(sorted({rep["git_commit"] for rep in reports})),
                  seconds=round(sum(rep.get("seconds", 0) for rep in reports), 1))
    merged["recommendation"] = recommend(result)
    merged["candidates_comparison"] = compare_candidates(result)
    return merged


def write_report(rep: dict, out: Path, stem: str = "budget_sweep") -> None:
    """``<stem>.json``, ``.md`` and ``.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=1) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(rep))
    plot_sweep(rep, out / f"{stem}.png")


def main(argv=None) -> int:
    p = build_parser()
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="instead of sweeping, merge budget_sweep.json files of separate per-shape runs into --out")
    args = p.parse_args(argv)
    if args.merge:
        try:
            rep = merge_reports([json.loads(f.read_text()) for f in args.merge])
        except (OSError, ValueError, KeyError) as exc:
            p.error(f"cannot merge: {exc}")
        rep["merged_by"] = "python -m moespec.models.budget_sweep " + " ".join(
            argv if argv is not None else sys.argv[1:])
        write_report(rep, args.out, args.name)
        print(to_markdown(rep))
        return 0
    try:
        return run(args, "python -m moespec.models.budget_sweep " + " ".join(argv if argv is not None else sys.argv[1:]))
    except ValueError as exc:
        p.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
