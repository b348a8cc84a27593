#!/usr/bin/env python3
"""GPU check of the vLLM plugin: vLLM's offline `LLM`, an MoE model with dummy weights, speculation on.

Writes a Qwen3-30B-A3B-shaped config (128 experts, top-8, H=2048, I=768; fewer layers by default) into
``--out``, then for each setting (plugin off, budget = E i.e. a cap never reached, budgets 16 and 32) runs a
fresh process: ``LLM(load_format="dummy", skip_tokenizer_init=True)`` with draft-model speculation (a
2-layer drafter of the same shapes, so every decode step verifies exactly K drafts) or ngram, greedy decoding,
FULL_AND_PIECEWISE CUDA graphs. Per setting it records: output tokens/s, the median engine step latency of
decode (verification) steps, moespec's per-layer counters (distinct experts of the union and actually read,
summed on the device inside the replayed graphs) and the output tokens. The report compares outputs with the
plugin-off run: identical for the never-reached cap is the pass criterion.

    python bench/vllm_gpu_check.py --out /tmp/vllm_check            # everything (about 8-10 min on an H200)
    python bench/vllm_gpu_check.py --out /tmp/vllm_check --dry-run  # write the config, print the plan

Needs vLLM 0.33.x or 0.34.x with its CUDA kernels (not installable without network on the GPU box unless
present); runs vLLM's default model runner (V2; 0.34 has no other).
Results: ``<out>/vllm_gpu_check.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}


def write_model(path: Path, layers: int) -> Path:
    """A local model folder holding only config.json (weights: vLLM's dummy loader)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(QWEN3_30B_A3B, num_hidden_layers=layers)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return path


def settings(budgets: list[int], num_experts: int) -> list[dict]:
    """The runs: plugin off, a cap that is never reached (= E), then each budget."""
    runs = [{"name": "off", "budget": None}, {"name": f"cap{num_experts}", "budget": num_experts}]
    runs += [{"name": f"budget{b}", "budget": b} for b in budgets]
    return runs


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts (no tokenizer offline): a random phrase repeated, so ngram lookup finds matches."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(100, vocab - 100) for _ in range(16)]
        out.append((phrase * (length // 16 + 1))[:length])
    return out


def run_one(args: argparse.Namespace, run: dict) -> dict:
    """One setting in this process (a fresh one per setting: the plugin reads its settings at layer build)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from moespec.integrations import vllm as mv

    target = str(Path(args.out) / "target")
    spec = ({"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
            if args.spec == "ngram" else
            {"method": "draft_model", "model": str(Path(args.out) / "drafter"), "num_speculative_tokens": args.k})
    llm = LLM(model=target, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              max_model_len=args.prompt_len + args.max_tokens + 64, max_num_seqs=args.batch,
              gpu_memory_utilization=0.85, speculative_config=spec,
              compilation_config={"cudagraph_mode": args.cudagraph_mode})
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    ps = [TokensPrompt(prompt_token_ids=p) for p in prompts(args.batch, args.prompt_len, QWEN3_30B_A3B["vocab_size"])]
    llm.generate(ps[:2], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, detokenize=False),
                 use_tqdm=False)  # warm-up
    if run["budget"] is not None:
        llm.collective_rpc(mv.worker_reset_stats)
    engine = llm.llm_engine
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    steps, outputs, t0 = [], {}, time.perf_counter()
    started = set()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        decode = len(started) == len(ps)  # every request past its prefill: a verification step
        steps.append((dt, decode))
        for o in outs:
            started.add(o.request_id)
            outputs[o.request_id] = list(o.outputs[0].token_ids)
    wall = time.perf_counter() - t0
    tokens = sum(len(v) for v in outputs.values())
    decode_steps = [dt for dt, d in steps if d]
    layer_stats = llm.collective_rpc(mv.worker_stats)[0] if run["budget"] is not None else {}
    return {
        **run,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "decode_steps": len(decode_steps),
        "verify_step_ms_median": 1e3 * statistics.median(decode_steps) if decode_steps else None,
        "layers": layer_stats,
        "outputs": [outputs[str(i)] for i in range(len(ps))],
    }


def report(args: argparse.Namespace, results: list[dict]) -> str:
    base = next((r for r in results if r["name"] == "off"), None)
    lines = [f"# vLLM plugin GPU check\n", f"command: `{' '.join(sys.argv)}`\n",
             "| setting | tokens/s | verify step ms (median) | mean union / layer | mean experts read / layer |"
             " outputs = off |", "|---|---|---|---|---|---|"]
    for r in results:
        ls = list(r["layers"].values())
        u = statistics.mean(s["mean_union"] for s in ls) if ls else float("nan")
        rd = statistics.mean(s["mean_read"] for s in ls) if ls else float("nan")
        same = "-" if base is None or r is base else f"{sum(a == b for a, b in zip(r['outputs'], base['outputs']))}/{len(base['outputs'])}"
        ms = r["verify_step_ms_median"]
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {ms if ms is None else f'{ms:.2f}'} | {u:.1f} | {rd:.1f} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the model configs and the results")
    ap.add_argument("--layers", type=int, default=16, help="target decoder layers (Qwen3-30B-A3B has 48)")
    ap.add_argument("--drafter-layers", type=int, default=2)
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--spec", choices=("draft", "ngram"), default="draft")
    ap.add_argument("--k", type=int, default=7, help="speculative tokens per step")
    ap.add_argument("--batch", type=int, default=8, help="requests decoded together")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--cudagraph-mode", default="FULL_AND_PIECEWISE",
                    choices=("FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "PIECEWISE", "NONE"))
    ap.add_argument("--dry-run", action="store_true", help="write the configs and print the plan only")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting (JSON) in this process
    args = ap.parse_args(argv)
    if args.layers < 1 or args.drafter_layers < 1 or args.k < 1 or args.batch < 1:
        ap.error("--layers, --drafter-layers, --k and --batch must be >= 1")
    E, k = QWEN3_30B_A3B["num_experts"], QWEN3_30B_A3B["num_experts_per_tok"]
    if any(b < k or b > E for b in args.budgets):
        ap.error(f"budgets must lie in [{k}, {E}] (top-k, experts)")
    out = Path(args.out)
    if args.one:
        run = json.loads(args.one)
        (out / f"run_{run['name']}.json").write_text(json.dumps(run_one(args, run)))
        return 0
    write_model(out / "target", args.layers)
    write_model(out / "drafter", args.drafter_layers)
    runs = settings(args.budgets, E)
    print(f"model: {out / 'target'} ({args.layers} layers, E={E}, top-{k}), drafter {args.drafter_layers} layers; "
          f"spec={args.spec} K={args.k}; batch {args.batch} x {args.max_tokens} tokens; {args.cudagraph_mode}")
    base_env = {k_: v for k_, v in os.environ.items() if not k_.startswith("MOESPEC_VLLM_")}
    base_env.update(VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # rpc of moespec's stats
    plan = []
    for run in runs:
        env = dict(base_env)
        if run["budget"] is not None:
            env["MOESPEC_VLLM_BUDGET"] = str(run["budget"])
        cmd = [sys.executable, __file__] + [a for a in (argv if argv is not None else sys.argv[1:])
                                            if a != "--dry-run"] + ["--one", json.dumps(run)]
        plan.append((run, env, cmd))
        print(f"  {run['name']}: MOESPEC_VLLM_BUDGET={env.get('MOESPEC_VLLM_BUDGET', '(unset)')}")
    if args.dry_run:
        return 0
    results = []
    for run, env, cmd in plan:
        t = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode
        print(f"{run['name']}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc != 0:
            continue
        results.append(json.loads((out / f"run_{run['name']}.json").read_text()))
    (out / "vllm_gpu_check.json").write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))
    md = report(args, results)
    (out / "vllm_gpu_check.md").write_text(md)
    print(md)
    cap = next((r for r in results if r["name"] == f"cap{E}"), None)
    base = next((r for r in results if r["name"] == "off"), None)
    if cap is None or base is None:
        print("FAIL: the plugin-off or never-reached-cap run did not finish", file=sys.stderr)
        return 1
    if cap["outputs"] != base["outputs"]:
        print("FAIL: greedy outputs differ with a cap that is never reached", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
