"""The `moespec` command line: info, demo, bench layer, bench generate, generate, capture."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional, Sequence


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _cuda

    st = _cuda.device_status()
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info = {
        "moespec": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": _cuda.extension_loaded(),
        # cuda: kernels for the GPU; emu: the same kernels built for the CPU emulator (MOESPEC_CUDA=EMU,
        # ops backend="emu" on CPU tensors); none: the PyTorch reference only.
        "kernel_backend": _cuda.backend(),
        "cuda_kernels_compiled": _cuda.cuda_compiled(),
        "cuda_archs": _cuda.compiled_archs(),
        "cutlass_headers": _cuda.cutlass_enabled(),
        "cuda_runtime_version": st["runtime_version"],
        "cuda_driver_version": st["driver_version"],
        "gpu_visible": bool(gpus) or st["device_count"] > 0,
        "gpus": gpus,
        "kernels_usable": _cuda.available(),
        "why_not": _cuda.unavailable_reason(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, val in info.items():
        if isinstance(val, list):
            val = ", ".join(val) if val else "-"
        print(f"{key:<{width}}  {val if val is not None else '-'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(tokens=args.tokens, seed=args.seed, zipf=args.zipf, out_json=args.json)
    return 0


def _ints(text: str) -> list[int]:
    """argparse type: ``"1,2,4"`` -> [1, 2, 4] (positive ints)."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _budgets(text: str) -> list:
    """argparse type: ``"none,8,16"`` -> [None, 8, 16]."""
    out = []
    for v in (p.strip().lower() for p in text.split(",") if p.strip()):
        if v in ("none", "-", "off"):
            out.append(None)
            continue
        try:
            out.append(int(v))
        except ValueError:
            raise argparse.ArgumentTypeError(f"budgets are integers or 'none', got {v!r}") from None
        if out[-1] < 1:
            raise argparse.ArgumentTypeError(f"budgets must be >= 1, got {v!r}")
    if not out:
        raise argparse.ArgumentTypeError("expected at least one budget")
    return out


def _names(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        vals = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return vals
    return parse


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    return name


def _add_model_args(p: argparse.ArgumentParser, drafter: bool = True) -> None:
    p.add_argument("--target", default="default",
                   help="target model: 'default' (the shipped Qwen3-MoE), a Hugging Face id or local path, "
                        "or tiny:ARCH (random tiny model: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss)")
    if drafter:
        p.add_argument("--drafter", default="auto",
                       help="'auto' (shipped draft model for the default target, else prompt lookup), "
                            "'prompt-lookup', 'default', tiny:ARCH, or a Hugging Face id/path of a small LM "
                            "sharing the target's tokenizer")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model dtype (default fp32)")
    p.add_argument("--device", default="auto", help="auto (cuda if visible), cpu, cuda, cuda:N")
    _add_threads(p)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; use 1 on a busy "
                                               "machine, where oversubscribed threads make CPU timings meaningless)")


# ----------------------------------------------------------------------------- bench layer


def _bench_layer(args: argparse.Namespace) -> int:
    import torch

    from .bench import layer, report, shapes
    from .bench.impls import parse_impls
    from .bench.routing_gen import parse_routing

    if args.list_models:
        rows = [dict(s.to_dict(), expert_MB=round(s.expert_bytes(2) / 1e6, 1)) for s in shapes.PRESETS.values()]
        cols = [("name", "preset"), ("H", "H"), ("I", "I"), ("E", "E"), ("k", "k"), ("renorm", "renorm"),
                ("layout", "layout"), ("moe_layers", "MoE layers"), ("expert_MB", "MB/expert bf16"), ("note", "note")]
        print(report.terminal_table(rows, cols))
        return 0
    device = _device(args.device)
    on_gpu = torch.device(device).type == "cuda"
    if args.reduce is not None and args.reduce < 1:
        raise ValueError("--reduce must be >= 1")
    routings = [r.strip() for r in args.routing.split(",") if r.strip()]
    if not routings:
        raise ValueError("--routing is empty")
    replays = [r for r in routings if r.startswith("replay:")]
    chosen = shapes.select_shapes(args.models, args.shape, on_gpu, args.reduce) \
        if (args.models or args.shape or not replays) else []
    if not chosen:  # replay with no shape given: the captured model's own shape
        from .bench.capture import load_capture, shape_from_capture

        chosen = [shape_from_capture(load_capture(replays[0].split(":", 1)[1]))]
    tokens = args.tokens or ([1, 2, 4, 8, 16, 32, 64] if on_gpu else [1, 2, 4, 8, 16, 32])
    budgets = args.budgets or ([None, 8, 16, 32, 64] if on_gpu else [None, 16, 32])
    for spec in routings:
        parse_routing(spec)  # bad specs fail here, before any timing
    for s in chosen:
        if not layer.valid_budgets(s, budgets):
            raise ValueError(f"no budget in {budgets} is valid for {s.name} (need none or {s.k} <= C < {s.E})")
    impls = parse_impls(args.impls)
    if not args.impls and not on_gpu:
        # The CUDA implementations cannot run here; the reference is moespec's CPU path.
        impls = [i for i in impls if not i.startswith("moespec")]
        print("NOTE: no GPU: timing moespec's reference (its CPU path) and the baselines, not the CUDA kernels",
              file=sys.stderr)
    cfg = layer.LayerBenchConfig(
        shapes=chosen, tokens=tokens, budgets=budgets, policies=args.policies or ["substitute"],
        routing=routings, impls=impls, device=device, dtype=args.dtype,
        iters=args.iters or (30 if on_gpu else 10), warmup=args.warmup, seed=args.seed,
        reference_max_t=args.reference_max_t, graphs=not args.no_graphs)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if not args.quiet else None
    result = layer.run_layer_bench(cfg, progress=say, argv=args.argv)
    if result["meta"].get("label"):
        print(f"NOTE: {result['meta']['label']}")
    if args.full_table:
        print(report.terminal_table(result["rows"], layer.COLUMNS))
    else:
        print(report.terminal_table(*layer.pivot(result["rows"])))
    skipped = sorted({f"{r['impl']}: {r['note']}" for r in result["rows"] if r.get("note")})
    for line in skipped[:8]:
        print(f"  ({line})")
    paths = layer.write_layer_outputs(result, args.out, args.name, png=not args.no_png)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ----------------------------------------------------------------------------- bench generate


def _bench_generate(args: argparse.Namespace) -> int:
    from .bench import generate as g
    from .speculative import default_budget_choices

    device = _device(args.device)
    model, codec, target_label = g.load_target(args.target, args.dtype, device)
    factory, drafter_label = g.make_drafter_factory(args.drafter, args.target, args.dtype, device)
    prompts = g.load_prompts(args.prompts, args.num_prompts)
    ks = args.ks or [2, 4, 8]
    families = args.modes or list(g.MODE_FAMILIES)
    choices = None
    budgets = args.budgets
    if "budget" in families or "cascade+budget" in families:
        choices = default_budget_choices(model)  # validates that the target is an MoE
        if budgets is None:
            budgets = [c for c in choices if c is not None][:2]
        k = int(getattr(getattr(model.config, "text_config", None) or model.config, "num_experts_per_tok", 1))
        bad = [c for c in budgets if c is None or c < k]
        if bad:
            raise ValueError(f"--budgets must be integers >= top-k ({k}) of the target, got {budgets}")
        if args.budgets:
            choices = [None] + sorted(set(budgets), reverse=True)
    modes = g.build_modes(families, ks, budgets or [], args.budget_k or max(ks), args.k_max or max(ks))
    result = g.run_generate_bench(
        model, codec, factory, prompts, modes, max_new_tokens=args.max_new_tokens, policy=args.policy,
        budget_choices=choices, warmup=not args.no_warmup, progress=not args.quiet,
        keep_iterations=args.save_iterations, argv=args.argv,
        config={"target": target_label, "drafter": drafter_label, "target_spec": args.target,
                "drafter_spec": args.drafter, "dtype": args.dtype, "budget_choices": choices})
    print(g.generate_table(result))
    paths = g.write_generate_outputs(result, args.out, args.name, png=not args.no_png)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ----------------------------------------------------------------------------- generate


def _generate(args: argparse.Namespace) -> int:
    from .bench import generate as g
    from .bench.report import write_json

    device = _device(args.device)
    if args.k < 0:
        raise ValueError("--k must be >= 0")
    if args.controller != "static" and args.k < 1:
        raise ValueError(f"--controller {args.controller} needs --k >= 1 (its largest draft)")
    model, codec, target_label = g.load_target(args.target, args.dtype, device)
    factory, drafter_label = g.make_drafter_factory(args.drafter, args.target, args.dtype, device)
    prompt = args.prompt if args.prompt is not None else g.BUILTIN_PROMPTS[0]
    ids = codec.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    kind = {"static": "static" if args.budget is None else "budget"}.get(args.controller, args.controller)
    mode = g.Mode("ar" if args.k == 0 and kind == "static" else kind, args.k, args.budget)
    new, st = g.run_one(model, ids, factory(), mode, args.max_new_tokens, args.policy, codec.eos_token_id)
    summ = st["summary"]
    drafted = [it for it in st["iterations"] if it.get("draft_size", 0) > 0]
    union, kept = g._layer_means(drafted or st["iterations"])
    stats = {
        "target": target_label, "drafter": drafter_label, "mode": mode.name, "prompt_tokens": len(ids),
        "new_tokens": len(new), "wall_time_s": summ["wall_time_s"],
        "tokens_per_s": len(new) / summ["wall_time_s"] if summ["wall_time_s"] > 0 else None,
        "iterations": summ["iterations"], "mean_accepted": summ["mean_accepted"],
        "tokens_per_iteration": summ["tokens_per_iteration"], "mean_union_per_layer": union,
        "mean_kept_per_layer": kept,
        "expert_bytes_per_token": summ["expert_bytes"] / len(new) if new else None,
    }
    print(prompt + codec.decode(new) if codec.tokenizer is not None else f"{prompt!r} -> {codec.decode(new)}")
    print("\n---")
    from .bench.report import fmt

    for key, val in stats.items():
        print(f"{key:<22} {fmt(val)}")
    if args.json:
        from .bench.report import run_meta
        import torch

        write_json(args.json, {"meta": run_meta(torch.device(device), args.argv), "stats": stats,
                               "prompt": prompt, "text": codec.decode(new), "tokens": new, "spec_stats": st})
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------- capture


def _capture(args: argparse.Namespace) -> int:
    from .bench import generate as g
    from .bench.capture import capture_routing, save_capture

    device = _device(args.device)
    model, codec, label = g.load_target(args.target, args.dtype, device)
    prompts = [args.prompt] if args.prompt is not None else g.load_prompts(args.prompts, args.num_prompts)
    seqs = []
    for p in prompts:
        ids = codec.encode(p)[: args.max_tokens]
        if ids:
            seqs.append(ids)
    if not seqs:
        raise ValueError("no prompt has any token")
    cap = capture_routing(model, seqs, name=args.target)
    path = save_capture(cap, args.out)
    print(f"captured {cap['tokens']} tokens x {cap['num_layers']} MoE layers (E={cap['num_experts']}, "
          f"top-{cap['top_k']}) from {label} -> {path}")
    print(f"replay with: moespec bench layer --routing replay:{path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `moespec` argument parser (subcommands info, demo, bench layer, bench generate, generate, capture)."""
    p = argparse.ArgumentParser(prog="moespec", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pi = sub.add_parser("info", help="version, torch, compiled CUDA kernels and architectures, visible GPUs")
    pi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pi.set_defaults(func=_info)

    pd = sub.add_parser("demo", help="CPU demonstration of verification-time expert budgets on one MoE layer")
    pd.add_argument("--tokens", type=int, default=16, help="draft tokens verified at once (default 16)")
    pd.add_argument("--zipf", type=float, default=1.0, help="router skew: Zipf exponent of expert popularity")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    pd.set_defaults(func=_demo)

    pb = sub.add_parser("bench", help="layer microbenchmarks and end-to-end evaluation")
    bsub = pb.add_subparsers(dest="bench_command", metavar="BENCH")
    bsub.required = True

    bl = bsub.add_parser("layer", help="time one budgeted MoE layer against its byte floor and the baselines",
                         description="Time one budgeted MoE layer (moespec CUDA, reference, transformers experts, "
                                     "F.grouped_mm) against the byte floor. On CPU, presets run with H and I "
                                     "reduced (--reduce) and wall-clock timing, labelled as such.")
    bl.add_argument("--models", help="comma-separated presets (see --list-models) or 'all'")
    bl.add_argument("--shape", help="custom shape H,I,E,k[,gpt_oss][,norenorm]")
    bl.add_argument("--list-models", action="store_true", help="print the presets and exit")
    bl.add_argument("--tokens", type=_ints, help="token counts T (default GPU 1,2,4,8,16,32,64; CPU 1,2,4,8,16,32)")
    bl.add_argument("--budgets", type=_budgets, help="budgets C, 'none' = unbudgeted (default GPU none,8,16,32,64; "
                                                     "CPU none,16,32); C >= E or < k are skipped")
    bl.add_argument("--policies", type=_names(("substitute", "truncate")), help="substitute,truncate")
    bl.add_argument("--routing", default="iid",
                    help="iid | zipf[:S] | tree[:B[:RHO]] (draft-tree-correlated) | replay:FILE (from "
                         "`moespec capture`); several comma-separated, e.g. iid,zipf:1.2,tree:2")
    bl.add_argument("--impls", help="comma list or 'all' (default; on CPU all but the CUDA ones): moespec, "
                                    "moespec-experts, moespec-experts-atomic, moespec-plan, reference, hf-eager, "
                                    "hf-grouped_mm, hf-batched_mm, torch-grouped_mm")
    bl.add_argument("--device", default="auto", help="auto, cpu, cuda")
    _add_threads(bl)
    bl.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="auto: bf16 on GPU, fp32 on CPU")
    bl.add_argument("--iters", type=int, help="timed calls per measurement (median; default GPU 30, CPU 10)")
    bl.add_argument("--warmup", type=int, default=3)
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--reduce", type=int, help="divide H and I of the presets (default 1 on GPU, 16 on CPU)")
    bl.add_argument("--reference-max-t", type=int, default=16, help="on GPU, time the reference only up to this T")
    bl.add_argument("--no-graphs", action="store_true", help="do not capture CUDA graphs")
    bl.add_argument("--out", default="moespec_results", help="output folder (default ./moespec_results)")
    bl.add_argument("--name", default="bench_layer", help="file stem of the outputs")
    bl.add_argument("--no-png", action="store_true")
    bl.add_argument("--quiet", action="store_true", help="no per-case progress on stderr")
    bl.add_argument("--full-table", action="store_true", help="print every measurement, not the summary")
    bl.set_defaults(func=_bench_layer)

    bg = bsub.add_parser("generate", help="end-to-end speculative decoding: AR, static K, budgets, Cascade",
                         description="Compare autoregressive decoding, static-K speculation, budgeted "
                                     "speculation, Cascade and Cascade+budget on a set of prompts.")
    _add_model_args(bg)
    bg.add_argument("--prompts", help="JSONL file (strings or objects with 'prompt'/'text'); default: built-in set")
    bg.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    bg.add_argument("--max-new-tokens", type=int, default=64)
    from .bench.generate import MODE_FAMILIES

    bg.add_argument("--modes", type=_names(MODE_FAMILIES),
                    help=f"mode families (default all: {','.join(MODE_FAMILIES)}); ar is always run")
    bg.add_argument("--ks", type=_ints, help="static draft lengths K (default 2,4,8)")
    bg.add_argument("--budgets", type=_ints, help="budgets C for the budget modes (default E/2,E/4)")
    bg.add_argument("--budget-k", type=int, help="draft length of the budget modes (default max of --ks)")
    bg.add_argument("--k-max", type=int, help="largest draft for Cascade (default max of --ks)")
    bg.add_argument("--policy", default="substitute", choices=["substitute", "truncate"])
    bg.add_argument("--save-iterations", action="store_true", help="keep per-iteration records in the JSON")
    bg.add_argument("--no-warmup", action="store_true")
    bg.add_argument("--out", default="moespec_results")
    bg.add_argument("--name", default="bench_generate")
    bg.add_argument("--no-png", action="store_true")
    bg.add_argument("--quiet", action="store_true", help="no progress bar")
    bg.set_defaults(func=_bench_generate)

    pg = sub.add_parser("generate", help="generate from one prompt with speculative decoding, print statistics")
    _add_model_args(pg)
    pg.add_argument("--prompt", help="prompt text (default: a built-in Python prompt)")
    pg.add_argument("--max-new-tokens", type=int, default=64)
    pg.add_argument("--k", type=int, default=4, help="draft length (K_max for Cascade; 0 = autoregressive)")
    pg.add_argument("--budget", type=int, help="expert budget C at verification (default none)")
    pg.add_argument("--policy", default="substitute", choices=["substitute", "truncate"])
    pg.add_argument("--controller", default="static", choices=["static", "cascade", "cascade+budget"])
    pg.add_argument("--json", metavar="PATH", help="also write text and statistics as JSON")
    pg.set_defaults(func=_generate)

    pc = sub.add_parser("capture", help="record a model's per-layer routing for `bench layer --routing replay:FILE`")
    _add_model_args(pc, drafter=False)
    pc.add_argument("--prompts", help="JSONL prompts (default: built-in set)")
    pc.add_argument("--prompt", help="a single prompt instead of --prompts")
    pc.add_argument("--num-prompts", type=int)
    pc.add_argument("--max-tokens", type=int, default=512, help="tokens per prompt at most")
    pc.add_argument("--out", required=True, help="capture file to write (.pt)")
    pc.set_defaults(func=_capture)
    return p


_POSITIVE = ("max_new_tokens", "num_prompts", "iters", "max_tokens", "budget_k", "k_max", "budget", "threads")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: parse, run, and turn user errors into one ``moespec: error:`` line (exit 2)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    for name in _POSITIVE:
        val = getattr(args, name, None)
        if val is not None and val < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {val}")
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        if os.environ.get("MOESPEC_DEBUG"):
            raise
        hint = "" if isinstance(exc, (ValueError, FileNotFoundError)) else " (set MOESPEC_DEBUG=1 for the traceback)"
        print(f"moespec: error: {exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moespec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, and keep Python's exit-time flush from failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
