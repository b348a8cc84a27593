"""Measure the shipped demo models: perplexity, routing skew, acceptance, quality against budget.

    python -m moespec.models.evaluate --out bench/results/cpu

Writes ``model_quality.json`` and ``model_quality.md``. Everything runs on the CPU in a few
minutes; prompts and held-out text come from the held-out split of the stdlib corpus.

Quality against budget (C in {k, 2k, 4k, E}, both policies):
- agreement: greedy speculative output under the budget against the unbudgeted greedy output
  (token match rate over the generated positions, and the first divergence);
- acceptance: mean tokens emitted per verification under the budget;
- perplexity: held-out text fed in verification-sized chunks (a prefix of 32 tokens prefilled
  unbudgeted, then chunks of ``chunk`` tokens, each one budgeted forward over the KV cache).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..integrations.hf_compat import forward_kwargs
from . import corpus, load_draft, load_target, load_tokenizer, training_report
from .routing_stats import routing_skew

CHAIN_KS = (1, 2, 3, 4, 6, 8)
TREES = ((3, 2, 6), (4, 2, 8), (4, 3, 16), (6, 4, 32))  # depth, branching, nodes


def heldout_ids(tok, max_tokens: int) -> torch.Tensor:
    _, test_files = corpus.split_corpus()
    ids: list[int] = []
    for f in test_files:
        ids.extend(tok(corpus.read_text(f))["input_ids"])
        ids.append(tok.eos_token_id)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def make_prompts(stream: torch.Tensor, n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length - 1, (n,), generator=g).tolist()
    return [stream[s:s + length] for s in starts]


def _spec_run(target, draft_model, prompt, max_new, draft, budget=None, policy="substitute"):
    from moespec import speculative as spec

    tokens, stats = spec.generate(target, prompt, drafter=spec.DraftModelDrafter(draft_model),
                                  max_new_tokens=max_new, draft=draft, budget=budget, policy=policy,
                                  routing_stats=True)
    return tokens[0, prompt.numel():].tolist(), stats


def acceptance(target, draft_model, prompts, max_new) -> list[dict]:
    from moespec.speculative import DraftConfig

    rows = []
    shapes = [("chain", DraftConfig.chain(k)) for k in CHAIN_KS]
    shapes += [("tree", DraftConfig.tree(d, b, n)) for d, b, n in TREES]
    for kind, cfg in shapes:
        emitted, iters, accepted, unions = 0, 0, 0, []
        for p in prompts:
            _, st = _spec_run(target, draft_model, p, max_new, cfg)
            for r in st.iterations:
                if r.draft_size > 0:
                    iters += 1
                    emitted += r.emitted
                    accepted += r.accepted
        rows.append({"draft": kind, "shape": cfg.to_dict(), "nodes": cfg.size,
                     "mean_accepted": round(accepted / max(iters, 1), 3),
                     "tokens_per_verification": round(emitted / max(iters, 1), 3)})
    return rows


@torch.no_grad()
def chunked_perplexity(target, ids: torch.Tensor, chunk: int, budget, policy: str, windows: int,
                       seq_len: int = 256, prefix: int = 32) -> float:
    """Perplexity of held-out text fed as verification-sized chunks under an expert budget.

    ``budget``: a cap (with ``policy``), None, or a whole rule (`moespec.integrations.BudgetConfig`)."""
    from transformers import DynamicCache

    import moespec
    from moespec.integrations import BudgetConfig

    if isinstance(budget, BudgetConfig):
        rule = {"policy": budget.policy, "score": budget.score, "coverage": budget.coverage,
                "min_budget": budget.min_budget, "candidates": budget.candidates}
        budget = budget.budget
    else:
        rule = {"policy": policy}

    total, count = 0.0, 0
    for w in range(windows):
        x = ids[w * seq_len:(w + 1) * seq_len + 1].unsqueeze(0)
        cache = DynamicCache(config=target.config)
        with moespec.expert_budget(target, None):
            out = target(input_ids=x[:, :prefix], **forward_kwargs(target, cache, use_cache=True))
        logits = [out.logits[:, -1:]]
        for s in range(prefix, seq_len, chunk):
            with moespec.expert_budget(target, budget, **rule):
                out = target(input_ids=x[:, s:min(s + chunk, seq_len)], **forward_kwargs(target, cache, use_cache=True))
            logits.append(out.logits)
        lg = torch.cat(logits, dim=1)[0, :-1].float()  # predictions for tokens prefix .. seq_len-1
        tgt = x[0, prefix:seq_len]
        total += float(torch.nn.functional.cross_entropy(lg, tgt, reduction="sum"))
        count += tgt.numel()
    return math.exp(total / count)


def budget_quality(target, draft_model, prompts, stream, max_new, chunk, windows) -> list[dict]:
    from moespec.speculative import DraftConfig

    cfg = target.config
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    draft = DraftConfig.tree(4, 2, 8)
    base = [_spec_run(target, draft_model, p, max_new, draft)[0] for p in prompts]
    rows = []
    for C in (None, k, 2 * k, 4 * k, E):
        for policy in (("substitute", "truncate") if C is not None else ("-",)):
            pol = "substitute" if policy == "-" else policy
            match, first_div, emitted, iters, kept, union = 0, [], 0, 0, [], []
            for p, ref in zip(prompts, base):
                out, st = _spec_run(target, draft_model, p, max_new, draft, C, pol)
                same = [a == b for a, b in zip(out, ref)]
                match += sum(same)
                first_div.append(same.index(False) if False in same else len(same))
                for r in st.iterations:
                    if r.draft_size > 0:
                        iters += 1
                        emitted += r.emitted
                        for layer in r.layers or []:
                            kept.append(layer["kept_size"])
                            union.append(layer["union_size"])
            ppl = chunked_perplexity(target, stream, chunk, C, pol, windows)
            rows.append({
                "budget": C, "policy": policy,
                "token_match_rate": round(match / (len(prompts) * max_new), 4),
                "mean_first_divergence": round(sum(first_div) / len(first_div), 2),
                "tokens_per_verification": round(emitted / max(iters, 1), 3),
                "mean_union": round(sum(union) / len(union), 2) if union else None,
                "mean_kept": round(sum(kept) / len(kept), 2) if kept else None,
                f"chunk{chunk}_heldout_ppl": round(ppl, 3),
            })
            print(f"budget {C} {policy}: {rows[-1]}", file=sys.stderr)
    return rows


def to_markdown(rep: dict) -> str:
    which = {"coarse": "32 experts, top-4", "fine": "128 experts, top-8"}.get(rep.get("target", "coarse"))
    lines = [f"# Shipped demo models: quality report (target: {which})", "",
             f"`{rep['command']}` on {rep['device']}, {rep['date']}, commit `{rep['git_commit']}`.", "",
             "| model | parameters | held-out perplexity | random-init perplexity |", "|---|---|---|---|"]
    for name, m in rep["perplexity"].items():
        lines.append(f"| {name} | {m['parameters']:,} | {m['heldout_ppl']} | {m['heldout_ppl_random_init']} |")
    sk = rep["routing_skew"]
    ts = list(sk["iid_union"])
    lines += ["", f"Routing skew ({sk['tokens']} held-out tokens; union = distinct experts over T consecutive tokens):", "",
              "| layer | load Gini | " + " | ".join(f"union T={t}" for t in ts) + " |",
              "|---|---|" + "---|" * len(ts)]
    for layer in sk["layers"]:
        lines.append(f"| {layer['layer']} | {layer['gini']} | " + " | ".join(str(layer["union"][t]) for t in ts) + " |")
    lines.append("| i.i.d. | 0 | " + " | ".join(str(sk["iid_union"][t]) for t in ts) + " |")
    lines += ["", "Acceptance (greedy, draft model drafter):", "",
              "| draft | shape | mean accepted | tokens per verification |", "|---|---|---|---|"]
    for r in rep["acceptance"]:
        lines.append(f"| {r['draft']} | {r['shape']} | {r['mean_accepted']} | {r['tokens_per_verification']} |")
    q = rep["budget_quality"]
    ppl_key = [k for k in q[0] if k.endswith("_heldout_ppl")][0]
    lines += ["", f"Quality against budget (tree depth 4, branching 2, 8 nodes; {ppl_key}):", "",
              "| budget C | policy | token match | mean first divergence | tokens/verification | union | kept | "
              "held-out ppl |", "|---|---|---|---|---|---|---|---|"]
    for r in q:
        lines.append(f"| {r['budget'] if r['budget'] is not None else 'none'} | {r['policy']} | "
                     f"{r['token_match_rate']} | {r['mean_first_divergence']} | {r['tokens_per_verification']} | "
                     f"{r['mean_union']} | {r['mean_kept']} | {r[ppl_key]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results/cpu"),
                   help="output folder for model_quality.json/.md (default bench/results/cpu, relative to the "
                        "working directory; created if missing, existing files are overwritten)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--chunk", type=int, default=8, help="verification chunk size for the budgeted perplexity")
    p.add_argument("--windows", type=int, default=8, help="256-token held-out windows for perplexities")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", type=Path, default=None, help="model folder (default: the shipped assets)")
    p.add_argument("--target", choices=["coarse", "fine"], default="coarse",
                   help="which shipped target: coarse (32 experts top-4; writes model_quality.*) or fine (128 "
                        "experts top-8; writes model_quality_fine.*)")
    args = p.parse_args(argv)
    for name in ("prompts", "prompt_len", "max_new", "chunk", "windows", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from ..cli import prepare_output_dir

    try:  # before the (minutes-long) evaluation: a file in the way fails now
        prepare_output_dir(args.out)
    except ValueError as exc:
        p.error(str(exc))
    torch.set_num_threads(args.threads)
    t0 = time.time()
    target, draft_model = load_target(root=args.models, name=args.target), load_draft(root=args.models)
    tok = load_tokenizer(root=args.models)
    stream = heldout_ids(tok, 64 * 256 + 1)
    prompts = make_prompts(stream, args.prompts, args.prompt_len)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    tr = training_report(args.models, name=args.target)
    if "draft" not in tr["models"]:  # the fine target's run trains no draft: it shares the coarse run's
        tr["models"]["draft"] = training_report(args.models)["models"]["draft"]
    rep = {
        "command": "python -m moespec.models.evaluate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s))",
        "git_commit": commit or "unknown",
        "perplexity": {n: {k: m[k] for k in ("parameters", "heldout_ppl", "heldout_ppl_random_init")}
                       for n, m in tr["models"].items()},
        "routing_skew": routing_skew(target, stream[: args.windows * 256]),
        "acceptance": acceptance(target, draft_model, prompts, args.max_new),
        "budget_quality": budget_quality(target, draft_model, prompts, stream, args.max_new, args.chunk, args.windows),
    }
    rep["seconds"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "model_quality" if args.target == "coarse" else "model_quality_fine"
    rep["target"] = args.target
    (args.out / f"{stem}.json").write_text(json.dumps(rep, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(rep))
    print(to_markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
