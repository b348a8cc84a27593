"""The `moespec` command line: info, demo, bench layer, bench generate, generate, capture."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional, Sequence


def _cpu_isa() -> str:
    from . import cpu_kernels

    if not cpu_kernels.available():
        return f"unavailable ({cpu_kernels.unavailable_reason()})"
    try:
        return cpu_kernels.isa()
    except ValueError as exc:  # a bad MOESPEC_CPU_ISA
        return f"error: {exc}"


def _kernel_generation() -> str:
    from .kernels import kernel_generation

    try:
        return kernel_generation()
    except ValueError as exc:  # a bad MOESPEC_KERNELS
        return f"error: {exc}"


def _cpu_isas() -> list:
    from . import cpu_kernels

    return cpu_kernels.compiled_isas() if cpu_kernels.available() else []


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
        # Why no GPU is usable, told apart: no NVIDIA driver / GPU at all, a driver older than the
        # CUDA runtime moespec was built with, or the runtime's own error. None when a GPU is visible.
        "gpu_problem": None if (gpus or st["device_count"] > 0) else _cuda.device_problem(st),
        "kernels_usable": _cuda.available(),
        "why_not": _cuda.unavailable_reason(),
        # Expert-kernel generation the CUDA/emulated kernels use (MOESPEC_KERNELS=v1|v2, docs/kernels-v2.md).
        "expert_kernels": _kernel_generation(),
        # The C++ CPU kernels (every build): the ISA level in use (MOESPEC_CPU_ISA caps it) and the levels compiled.
        "cpu_kernels_isa": _cpu_isa(),
        "cpu_kernels_compiled_isas": _cpu_isas(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, val in info.items():
        if isinstance(val, list):
            val = ", ".join(val) if val else "-"
        if key == "cuda_driver_version" and not val:
            val = "- (no NVIDIA driver)"
        print(f"{key:<{width}}  {val if val is not None else '-'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(tokens=args.tokens, seed=args.seed, zipf=args.zipf, out_json=args.json)
    if args.json:
        print(f"wrote {args.json}")
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


def _fractions(text: str) -> list[float]:
    """argparse type: ``"0.9,0.95"`` -> [0.9, 0.95] (each in (0, 1], no repeats)."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected fractions in (0, 1], got {text!r}")
    if len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"a value is repeated in {text!r}")
    return vals


def budget_list_type(allow_none: bool = True):
    """argparse type for a comma-separated list of expert budgets C, shared by the commands.

    Each entry is an integer that `moespec.ops.validate_budget` accepts before the model is known
    (``>= 1``); with ``allow_none``, ``none`` / ``off`` / ``-`` also means "unbudgeted" (None).
    Repeated entries are refused. The model-dependent half of the rule (``C >= top_k``) is
    `check_budgets_for_top_k`, applied once the model's top-k is known.

    ``"none,8,16"`` -> ``[None, 8, 16]``.
    """
    from .ops import validate_budget

    def parse(text: str) -> list:
        out: list = []
        for v in (p.strip().lower() for p in text.split(",")):
            if not v:
                continue
            if v in ("none", "-", "off"):
                if not allow_none:
                    raise argparse.ArgumentTypeError(f"expected integer budgets (no 'none' here), got {text!r}")
                val = None
            else:
                try:
                    val = int(v)
                except ValueError:
                    raise argparse.ArgumentTypeError(
                        f"budgets are integers{' or none' if allow_none else ''}, got {v!r}") from None
                try:
                    validate_budget(val, 1)
                except ValueError as exc:
                    raise argparse.ArgumentTypeError(str(exc)) from None
            if val in out:
                raise argparse.ArgumentTypeError(f"budget {v!r} is listed twice in {text!r}")
            out.append(val)
        if not out:
            raise argparse.ArgumentTypeError("expected at least one budget")
        return out

    return parse


def check_budgets_for_top_k(budgets: Sequence[Optional[int]], top_k: int, what: str = "--budgets") -> None:
    """Raise `ValueError` for the first budget `moespec.ops.validate_budget` rejects for a top-``top_k``
    router (None = unbudgeted is always fine); the model-dependent half of `budget_list_type`."""
    from .ops import validate_budget

    for c in budgets:
        try:
            validate_budget(c, top_k)
        except ValueError as exc:
            raise ValueError(f"{what} {c}: {exc}") from None


_budgets = budget_list_type(allow_none=True)


def int_at_least(lo: int):
    """argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if val < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {val}")
        return val

    parse.__name__ = f"int >= {lo}"  # what argparse names in "invalid ... value"
    return parse


_pos_int = int_at_least(1)


def budget_or_auto(text: str):
    """argparse type for ``--budget``: an integer C >= 1, or ``auto`` (the measured default rule)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _pos_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer budget >= 1 or 'auto', got {text!r}") from None
nonneg_int = int_at_least(0)


def finite_nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0 (no nan, no inf)."""
    import math

    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(val) or val < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return val


def threads_type(text: str):
    """argparse type of ``--threads``: ``auto`` (None) or an integer >= 1."""
    if text.strip().lower() == "auto":
        return None
    try:
        val = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}") from None
    if val < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or 'auto'), got {val}")
    return val


# ----------------------------------------------------------------------------- output paths
#
# Every command that writes files checks its output paths before any work starts and creates
# missing folders; existing files of the same name are overwritten (re-running a command replaces
# its previous outputs). A file where a folder is expected, or a folder where a file is expected,
# is an error up front.


_OUTPUT_RULES = ("Output paths are checked before any work starts: missing folders are created, existing files "
                 "are overwritten, and a file where a folder is expected (or the reverse) is an error.")


def _nearest_existing(path):
    """``path`` or its nearest existing ancestor."""
    from pathlib import Path

    p = Path(path).absolute()
    for q in [p, *p.parents]:
        if q.exists():
            return q
    return Path("/")


def prepare_output_dir(path, what: str = "--out", create: bool = False):
    """Check, before any work, that ``path`` can be (or become) an output folder; `ValueError` if not.

    An existing file at ``path`` or at any of its ancestors, or a folder the user cannot write into, is an
    error. Missing folders are created by the writers when the outputs are written (with ``create``: now),
    so a command that fails leaves no empty folder behind."""
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {path}: is an existing file, but a folder is expected "
                         "(give a folder path; existing files inside it are overwritten)")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise ValueError(f"{what} {path}: cannot create the folder because {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {'the folder' if base == p.absolute() else base} is not writable")
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{what} {path}: cannot create the folder ({exc.strerror or exc})") from None
    return p


def prepare_output_file(path, what: str):
    """Check that ``path`` can be written as a file (creating its folder); `ValueError` if not.

    An existing file is overwritten later; an existing folder at ``path`` is an error."""
    from pathlib import Path

    text = str(path)
    p = Path(path)
    if p.is_dir() or text.endswith(("/", os.sep)):
        raise ValueError(f"{what} {path}: is a folder, but a file path is expected")
    prepare_output_dir(p.parent, f"{what} {path}: its folder")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{what} {path}: the existing file is not writable")
    return p


def _check_stem(stem: str, what: str = "--name") -> None:
    if not stem or stem in (".", "..") or "/" in stem or os.sep in stem:
        raise ValueError(f"{what} {stem!r}: must be a plain file stem (no folder; use --out for the folder)")


# Output paths of each command, checked (and folders created) by `main` before the command runs:
# handler name -> [(attribute, "dir" | "file" | "stem")].
_OUTPUTS = {
    "_demo": [("json", "file")],
    "_bench_layer": [("out", "dir"), ("name", "stem")],
    "_bench_generate": [("out", "dir"), ("name", "stem")],
    "_bench_quality": [("out", "dir")],
    "_generate": [("json", "file"), ("cascade_state", "file")],
    "_capture": [("out", "file")],
}


def _prepare_outputs(args: argparse.Namespace) -> None:
    if getattr(args, "list_models", False):
        return  # `bench layer --list-models` writes nothing
    for attr, kind in _OUTPUTS.get(getattr(args.func, "__name__", ""), []):
        val = getattr(args, attr, None)
        if val is None:
            continue
        flag = "--" + attr.replace("_", "-")
        if kind == "dir":
            prepare_output_dir(val, flag)
        elif kind == "file":
            prepare_output_file(val, flag)
        else:
            _check_stem(val, flag)


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
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: moespec runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device")
    return name


def _add_model_args(p: argparse.ArgumentParser, drafter: bool = True) -> None:
    p.add_argument("--target", default="default",
                   help="target model: 'default' (the shipped Qwen3-MoE, 32 experts top-4), 'fine' (the shipped "
                        "fine-grained one, 128 experts top-8), a Hugging Face id or local path, "
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
    p.add_argument("--threads", type=threads_type, default=None, metavar="N|auto",
                   help="torch CPU threads (default auto: 1 when the command runs on the CPU, torch's own choice "
                        "on a GPU). One thread is the fastest for the small CPU models and layers here, and "
                        "multi-threaded small matmuls on a busy machine are up to 10x slower; pass N to use N")


def _apply_threads(args: argparse.Namespace) -> Optional[int]:
    """Set torch's CPU threads for the command: ``--threads N``, or auto (1 on the CPU).

    Returns the thread count set, or None when torch's setting was left alone (auto on a GPU)."""
    if not hasattr(args, "threads"):
        return None
    import torch

    n = args.threads
    if n is None:
        try:
            on_cpu = torch.device(_device(getattr(args, "device", "cpu"))).type == "cpu"
        except ValueError:
            return None  # a bad --device is reported by the command itself
        if not on_cpu:
            return None
        n = 1
    elif hasattr(args, "drafter"):
        # The user chose the thread count: the speculative engine's small-model thread warning has nothing to add.
        from .speculative import engine

        engine._threads_warned = True
    torch.set_num_threads(n)
    return n


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
    _check_layer_budgets(layer, chosen, budgets, explicit=args.budgets is not None)
    impls = _runnable_impls(layer, parse_impls(args.impls), device, chosen, explicit=bool(args.impls))
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
    if not any(r.get("time_us") for r in result["rows"]):
        raise RuntimeError("no implementation produced a timing: "
                           + ("; ".join(skipped[:4]) or "every case failed") + " (details in the outputs above)")
    return 0


def _check_layer_budgets(layer, chosen, budgets, explicit: bool) -> None:
    """`bench layer` budgets against the chosen shapes, with the op's rule (`moespec.ops.validate_budget`).

    A budget no chosen shape can use is an error; one that only some shapes can use is skipped for the
    others with a note (the sweep mixes top-k 2 to 8); budgets >= E never bind and are skipped."""
    for s in chosen:
        if not layer.valid_budgets(s, budgets):
            why = "; ".join(f"{b}: {layer.budget_problem(s, b)}" for b in budgets if b is not None)
            raise ValueError(f"no budget in {budgets} is valid for {s.name} (need none or {s.k} <= C < {s.E}; {why})")
    for b in budgets:
        problems = [(s, layer.budget_problem(s, b)) for s in chosen]
        bad = [(s, p) for s, p in problems if p is not None]
        if not bad:
            continue
        if len(bad) == len(chosen) and explicit:
            raise ValueError(f"--budgets {b} applies to none of the chosen shapes: {bad[0][1]}")
        if explicit:
            names = ", ".join(s.name for s, _ in bad)
            print(f"NOTE: budget {b} skipped for {names}: {bad[0][1]}", file=sys.stderr)


def _runnable_impls(layer, impls: list, device: str, chosen, explicit: bool) -> list:
    """The implementations to run; an error when none of those asked for can run here.

    Without ``--impls`` the ones that cannot run (the CUDA ones on a CPU) are dropped with a note. With
    ``--impls`` each one that cannot run is named up front with its reason and kept (its rows say
    "n/a: why" in the outputs), and a run where none of them can run fails before any timing."""
    why = {name: layer.impl_unavailable(name, device, chosen) for name in impls}
    ok = [name for name in impls if why[name] is None]
    dropped = [name for name in impls if why[name] is not None]
    if not ok:
        raise ValueError("none of the requested implementations can run here: "
                         + "; ".join(f"{n}: {why[n]}" for n in dropped))
    if explicit:
        for name in dropped:
            print(f"NOTE: --impls {name} cannot run here (its rows will say n/a): {why[name]}", file=sys.stderr)
        return list(impls)
    if dropped:
        if all(n.startswith("moespec") for n in dropped) and _device_type(device) != "cuda":
            print("NOTE: no GPU: timing moespec's C++ CPU kernels (moespec-cpu), the reference and the baselines, "
                  "not the CUDA kernels", file=sys.stderr)
        else:
            print("NOTE: skipping " + "; ".join(f"{n}: {why[n]}" for n in dropped), file=sys.stderr)
    return ok


def _device_type(device: str) -> str:
    import torch

    return torch.device(device).type


# ----------------------------------------------------------------------------- bench generate


def _bench_generate(args: argparse.Namespace) -> int:
    from .bench import generate as g
    from .speculative import default_budget_choices

    prompts = g.load_prompts(args.prompts, args.num_prompts)  # before loading models: fail fast
    ks = args.ks or [2, 4, 8]
    families = args.modes or [f for f in g.MODE_FAMILIES if f != "tree" or args.trees]
    trees = args.trees or ([8, 16] if "tree" in families else [])
    g.check_mode_args(families, ks, args.budgets, policy=args.policy)
    if args.coverages and "budget" not in families:
        raise ValueError("--coverages adds budget modes, and --modes does not select the budget family")
    device = _device(args.device)
    model, codec, target_label = g.load_target(args.target, args.dtype, device)
    prepared = g.prepare_target(model, args.widen, args.experts, time_forwards=args.widen is not None,
                                forward_tokens=sorted({1, 1 + max(ks)}))
    require_tokenizer(codec, args.target)
    factory, drafter_label = g.make_drafter_factory(args.drafter, args.target, args.dtype, device)
    check_cli_drafter(model, codec, factory(), args.drafter, args.target)  # before any timed run
    choices = None
    budgets = args.budgets
    if "budget" in families or "cascade+budget" in families:
        choices = default_budget_choices(model)  # validates that the target is an MoE
        if budgets is None:
            budgets = [c for c in choices if c is not None][:2]
        # The rule of moespec.ops.validate_budget (ints >= the target's top-k).
        g.check_mode_args(families, ks, budgets, top_k=g.target_top_k(model), policy=args.policy)
        if args.budgets:
            choices = [None] + sorted(set(budgets), reverse=True)
    modes = g.build_modes(families, ks, budgets or [], args.budget_k or max(ks), args.k_max or max(ks), trees,
                          args.coverages or ())
    result = g.run_generate_bench(
        model, codec, factory, prompts, modes, max_new_tokens=args.max_new_tokens, policy=args.policy,
        candidates=args.candidates,
        budget_choices=choices, warmup=not args.no_warmup, progress=not args.quiet,
        keep_iterations=args.save_iterations, argv=args.argv, repeats=args.repeats, requests=args.requests,
        config={"target": target_label, "drafter": drafter_label, "target_spec": args.target,
                "drafter_spec": args.drafter, "dtype": args.dtype, "budget_choices": choices,
                "preset": args.preset, **prepared})
    print(g.generate_table(result, max_width=None if args.wide else g.report.TERMINAL_WIDTH))
    print(g.report.wrap_notes(g.generate_notes(result)))
    warning = g.spread_warning(result)
    if warning:
        print(f"moespec: warning: {warning}", file=sys.stderr)
    paths = g.write_generate_outputs(result, args.out, args.name, png=not args.no_png)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _bench_quality(args: argparse.Namespace) -> int:
    from .models import budget_sweep

    return budget_sweep.run(args, "moespec " + " ".join(args.argv))


# ----------------------------------------------------------------------------- generate


def _generate(args: argparse.Namespace) -> int:
    from .bench import generate as g
    from .bench.report import write_json

    device = _device(args.device)
    if args.controller != "static" and args.k < 1:
        raise ValueError(f"--controller {args.controller} needs --k >= 1 (its largest draft)")
    if args.prompt is not None and not args.prompt:
        raise ValueError("--prompt is empty")
    state = None
    if args.cascade_state:  # read before loading models: a bad file fails fast
        from pathlib import Path

        from .speculative import CascadeState

        if args.controller == "static":
            raise ValueError("--cascade-state needs --controller cascade or cascade+budget")
        state = CascadeState.load(args.cascade_state) if Path(args.cascade_state).exists() else CascadeState()
    model, codec, target_label = g.load_target(args.target, args.dtype, device)
    require_tokenizer(codec, args.target)
    if args.budget is not None and args.budget != "auto":
        check_budgets_for_top_k([args.budget], _top_k(model), "--budget")
    factory, drafter_label = g.make_drafter_factory(args.drafter, args.target, args.dtype, device)
    drafter = factory()
    check_cli_drafter(model, codec, drafter, args.drafter, args.target)
    prompt = args.prompt if args.prompt is not None else g.BUILTIN_PROMPTS[0]
    ids = codec.encode(prompt)
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to zero tokens with the target's tokenizer")
    kind = {"static": "static" if args.budget is None else "budget"}.get(args.controller, args.controller)
    mode = g.Mode("ar" if args.k == 0 and kind == "static" else kind, args.k, args.budget)
    # cascade_state None: the process-wide state (one request here, so cold).
    new, st = g.run_one(model, ids, drafter, mode, args.max_new_tokens, args.policy, codec.eos_token_id,
                        cascade_state=state, candidates=args.candidates)
    if state is not None:
        print(f"cascade state: {'warm' if st['controller'].get('warm') else 'cold'} start; saved to "
              f"{state.save(args.cascade_state)}")
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
        "expert_mb_per_token": summ["expert_bytes"] / len(new) / 1e6 if new else None,
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


def _top_k(model) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config
    return int(getattr(cfg, "num_experts_per_tok", 1) or 1)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def require_tokenizer(codec, spec: str, what: str = "--target") -> None:
    """Refuse a model whose tokenizer is missing (rather than encoding prompts to nothing).

    transformers builds an empty tokenizer from a model folder that has no tokenizer files; every prompt then
    encodes to zero tokens. Models without any tokenizer (``tiny:ARCH``) run on byte ids and pass."""
    tok = getattr(codec, "tokenizer", None)
    if tok is None:
        return
    try:
        regular = len(tok) - len(set(getattr(tok, "all_special_ids", []) or []))
    except TypeError:  # a tokenizer without __len__: judge by what it makes of text
        regular = len(tok("def f(x):\n    return x", add_special_tokens=False)["input_ids"])
    if regular > 0:
        return
    where = ""
    if os.path.isdir(spec):
        found = [f for f in _TOKENIZER_FILES if os.path.exists(os.path.join(spec, f))]
        where = f" in {spec} ({'only ' + ', '.join(found) if found else 'none of ' + ', '.join(_TOKENIZER_FILES[:3])})"
    raise ValueError(f"the tokenizer of {what} {spec} is missing: no usable tokenizer files{where}, so every prompt "
                     "would encode to zero tokens; copy the model's tokenizer files (e.g. tokenizer.json and "
                     "tokenizer_config.json) next to its weights")


def _drafter_tokenizer(drafter_spec: str, target_spec: str, target_codec):
    """The tokenizer a `--drafter` spec comes with, or None when it has none (tiny:ARCH) or none is found."""
    spec = drafter_spec
    if spec == "auto":
        spec = "default" if target_spec == "default" else "prompt-lookup"
    if spec == "default":
        if target_spec == "default":
            return target_codec.tokenizer  # the shipped pair shares one tokenizer
        from . import models

        try:
            return models.load_tokenizer()
        except Exception:  # noqa: BLE001 - then nothing is known about its ids
            return None
    if spec.startswith("tiny:") or spec in ("prompt-lookup", "pld"):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec)
    except Exception:  # noqa: BLE001
        return None
    try:
        return tok if len(tok) - len(set(tok.all_special_ids or [])) > 0 else None
    except TypeError:
        return tok


def check_cli_drafter(model, codec, drafter, drafter_spec: str, target_spec: str) -> None:
    """`check_drafter_vocab` for a CLI drafter: the target's and the drafter's tokenizers are compared where
    both are known, and vocabularies of different sizes need both (`require_tokenizers`)."""
    from .speculative import DraftModelDrafter, check_drafter_vocab

    if not isinstance(drafter, DraftModelDrafter):
        return
    try:
        check_drafter_vocab(model, drafter.model, codec.tokenizer,
                            _drafter_tokenizer(drafter_spec, target_spec, codec), require_tokenizers=True)
    except ValueError as exc:
        raise ValueError(f"--drafter {drafter_spec} does not fit --target {target_spec}: {exc}") from None


# ----------------------------------------------------------------------------- capture


def _capture(args: argparse.Namespace) -> int:
    from .bench import generate as g
    from .bench.capture import capture_routing, save_capture

    device = _device(args.device)
    if args.prompt is not None and not args.prompt:
        raise ValueError("--prompt is empty")
    prompts = [args.prompt] if args.prompt is not None else g.load_prompts(args.prompts, args.num_prompts)
    model, codec, label = g.load_target(args.target, args.dtype, device)
    require_tokenizer(codec, args.target)
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
    from . import __version__

    p = argparse.ArgumentParser(prog="moespec", description=__doc__,
                                epilog=_OUTPUT_RULES + " `moespec COMMAND --help` describes each command.")
    p.add_argument("--version", action="version", version=f"moespec {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pi = sub.add_parser("info", help="version, torch, compiled CUDA kernels and architectures, visible GPUs, CPU kernel ISA",
                        description="Report the moespec and torch versions, which kernel backend was built (cuda, "
                                    "emu or none) and for which GPU architectures, the CUDA runtime and driver, the "
                                    "visible GPUs, and why the CUDA kernels cannot run here if they cannot.")
    pi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pi.set_defaults(func=_info)

    pd = sub.add_parser("demo", help="CPU demonstration of verification-time expert budgets on one MoE layer",
                        description="Route a batch of draft tokens through one Qwen3-30B-A3B-shaped MoE layer "
                                    "(E=128, top-8) under budgets and both policies, and print what each budget "
                                    "keeps, the expert bytes at the real model's size and the output error "
                                    "(CPU, seconds).", epilog=_OUTPUT_RULES)
    pd.add_argument("--tokens", type=_pos_int, default=16, help="draft tokens verified at once (default 16)")
    pd.add_argument("--zipf", type=finite_nonneg_float, default=1.0,
                    help="router skew: Zipf exponent of expert popularity, a finite number >= 0 (0 = uniform; "
                         "default 1)")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--json", metavar="PATH", help="also write the results as JSON (folders are created, an "
                                                   "existing file is overwritten)")
    _add_threads(pd)
    pd.set_defaults(func=_demo, device="cpu")

    pb = sub.add_parser("bench", help="layer microbenchmarks and end-to-end evaluation",
                        description="Benchmarks: `bench layer` times one budgeted MoE layer against its byte floor "
                                    "and the baselines; `bench generate` compares autoregressive decoding, "
                                    "static-K speculation, budgets and Cascade end to end.")
    bsub = pb.add_subparsers(dest="bench_command", metavar="BENCH")
    bsub.required = True

    bl = bsub.add_parser("layer", help="time one budgeted MoE layer against its byte floor and the baselines",
                         description="Time one budgeted MoE layer (moespec CUDA or CPU kernels, reference, "
                                     "transformers experts, "
                                     "F.grouped_mm) against the byte floor. On CPU, presets run with H and I "
                                     "reduced (--reduce) and wall-clock timing, labelled as such.",
                         epilog=_OUTPUT_RULES)
    bl.add_argument("--models", help="comma-separated presets (see --list-models) or 'all'")
    bl.add_argument("--shape", help="custom shape H,I,E,k[,gpt_oss][,norenorm]")
    bl.add_argument("--list-models", action="store_true", help="print the presets and exit")
    bl.add_argument("--tokens", type=_ints, help="token counts T (default GPU 1,2,4,8,16,32,64; CPU 1,2,4,8,16,32)")
    bl.add_argument("--budgets", type=budget_list_type(allow_none=True),
                    help="budgets C, 'none' = unbudgeted (default GPU none,8,16,32,64; CPU none,16,32); integers "
                         ">= the shape's top-k as in moespec.ops; a budget a shape cannot use (C < k, or C >= E, "
                         "which never binds) is skipped for that shape with a note, and one no shape can use is "
                         "an error")
    bl.add_argument("--policies", type=_names(("substitute", "truncate")), help="substitute,truncate")
    bl.add_argument("--routing", default="iid",
                    help="iid | zipf[:S] | tree[:B[:RHO]] (draft-tree-correlated) | replay:FILE (from "
                         "`moespec capture`); several comma-separated, e.g. iid,zipf:1.2,tree:2")
    bl.add_argument("--impls", help="comma list or 'all' (default; on CPU all but the CUDA ones): moespec, "
                                    "moespec-v2, moespec-experts, moespec-experts-atomic, moespec-experts-v2, "
                                    "moespec-experts-v2-atomic, moespec-plan, moespec-cpu, "
                                    "moespec-cpu-experts, reference, hf-eager, hf-grouped_mm, hf-batched_mm, "
                                    "torch-grouped_mm. One that cannot run here is "
                                    "skipped with its reason; an error if none of those given can run")
    bl.add_argument("--device", default="auto", help="auto (cuda if visible), cpu, cuda, cuda:N")
    _add_threads(bl)
    bl.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="auto: bf16 on GPU, fp32 on CPU")
    bl.add_argument("--iters", type=_pos_int, help="timed calls per measurement (median; default GPU 30, CPU 10)")
    bl.add_argument("--warmup", type=nonneg_int, default=3, help="untimed calls before each measurement (>= 0; "
                                                                 "default 3)")
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--reduce", type=_pos_int, help="divide H and I of the presets (>= 1; default 1 on GPU, 16 on CPU)")
    bl.add_argument("--reference-max-t", type=nonneg_int, default=16,
                    help="on GPU, time the reference only up to this T (default 16)")
    bl.add_argument("--no-graphs", action="store_true", help="do not capture CUDA graphs")
    bl.add_argument("--out", default="moespec_results",
                    help="output folder (default ./moespec_results; created if missing, existing outputs of the "
                         "same --name are overwritten)")
    bl.add_argument("--name", default="bench_layer", help="file stem of the outputs: NAME.json, NAME.md, NAME.png")
    bl.add_argument("--no-png", action="store_true")
    bl.add_argument("--quiet", action="store_true", help="no per-case progress on stderr")
    bl.add_argument("--full-table", action="store_true", help="print every measurement, not the summary")
    bl.set_defaults(func=_bench_layer)

    bg = bsub.add_parser("generate", help="end-to-end speculative decoding: AR, static K, budgets, Cascade",
                         description="Compare autoregressive decoding, static-K speculation, budgeted "
                                     "speculation, Cascade and Cascade+budget on a set of prompts.")
    _add_model_args(bg)
    bg.add_argument("--prompts", help="JSONL file (strings or objects with 'prompt'/'text'); default: built-in set")
    from .bench.generate import DEFAULT_REPEATS, MODE_FAMILIES, PRESETS

    bg.add_argument("--num-prompts", type=_pos_int,
                    help="use only the first N prompts (an error when fewer are available)")
    bg.add_argument("--max-new-tokens", type=_pos_int, default=64)
    bg.add_argument("--repeats", type=_pos_int, default=DEFAULT_REPEATS,
                    help=f"run the whole prompt set N times per mode, interleaved across modes; tok/s and "
                         f"speed-up are reported as median and min-max, with a flag when the spread is too wide "
                         f"to rank the modes (default {DEFAULT_REPEATS})")
    bg.add_argument("--requests", type=_pos_int,
                    help="stream mode: N requests in sequence, taking the prompts in turn; each Cascade mode keeps "
                         "its learned state across the stream (fresh per repeat). Default: one request per prompt, "
                         "Cascade cold on each")
    bg.add_argument("--modes", type=_names(MODE_FAMILIES),
                    help=f"mode families (default all: {','.join(MODE_FAMILIES)}); ar is always run")
    bg.add_argument("--ks", type=_ints, help="static draft lengths K (default 2,4,8)")
    bg.add_argument("--trees", type=_ints,
                    help="node counts of the tree modes (dynamic draft trees, depth 6, 3 children per node; default "
                         "8,16 when --modes names tree; the tree family runs only when named or given here)")
    bg.add_argument("--coverages", type=_fractions,
                    help="coverage targets tau: one extra budget mode each (the fewest experts holding tau of the "
                         "score mass, at most the largest --budgets)")
    bg.add_argument("--widen", type=_pos_int,
                    help="give every routed expert N times its trained intermediate size (extra gate/up rows, zero "
                         "down-projection columns: the same outputs, the expert bytes of a larger model; see "
                         "docs/memory-bound.md)")
    bg.add_argument("--experts", choices=["moespec", "model"], default="moespec",
                    help="experts implementation of every forward: moespec (default: moespec.ops.moe_experts, the "
                         "C++ CPU kernels on the CPU, for every mode, autoregressive included) or model (the "
                         "model's own for unbudgeted forwards, moespec's for budgeted ones)")
    bg.add_argument("--preset", choices=sorted(PRESETS),
                    help="a named workload whose settings apply where no flag gives them: " + "; ".join(
                        f"{k}: {v['help']}" for k, v in sorted(PRESETS.items())))
    bg.add_argument("--budgets", type=budget_list_type(allow_none=False),
                    help="budgets C for the budget modes (default E/2,E/4); integers >= the target's top-k, as in "
                         "moespec.ops")
    bg.add_argument("--budget-k", type=_pos_int, help="draft length of the budget modes (default max of --ks)")
    bg.add_argument("--k-max", type=_pos_int, help="largest draft for Cascade (default max of --ks)")
    bg.add_argument("--policy", default="substitute", choices=["substitute", "truncate"])
    bg.add_argument("--candidates", choices=["all", "union"],
                    help="experts a budget's kept set is chosen from (default: union, chosen by measurement; see "
                         "docs/budget-rules.md)")
    bg.add_argument("--save-iterations", action="store_true", help="keep per-iteration records in the JSON")
    bg.add_argument("--no-warmup", action="store_true")
    bg.add_argument("--out", default="moespec_results")
    bg.add_argument("--name", default="bench_generate")
    bg.add_argument("--no-png", action="store_true")
    bg.add_argument("--quiet", action="store_true", help="no progress bar")
    bg.add_argument("--wide", action="store_true",
                    help="print every column (by default the table is cut to 120 columns; the Markdown file has all)")
    bg.set_defaults(func=_bench_generate)

    from .models import budget_sweep

    bq = bsub.add_parser("quality", help="price every budget rule on the shipped demo models (acceptance, "
                                         "agreement, perplexity, expert bytes) and recommend budget='auto'",
                         description=budget_sweep.__doc__.split("\n\n")[0].strip() + " Writes budget_sweep.json, "
                                     ".md and .png into --out. About 35 minutes on one CPU thread with the "
                                     "defaults.",
                         epilog=_OUTPUT_RULES)
    budget_sweep.build_parser(bq)
    bq.set_defaults(func=_bench_quality, out=budget_sweep.Path("moespec_results"))

    pg = sub.add_parser("generate", help="generate from one prompt with speculative decoding, print statistics",
                        description="Generate a continuation of one prompt with moespec.speculative.generate "
                                    "(greedy): a static draft of --k tokens, an expert budget at verification "
                                    "(--budget) or the Cascade controllers; print the text and the statistics "
                                    "(tokens/s, acceptance, experts per layer, expert bytes). The drafter must use "
                                    "the target's tokenizer (checked before generating).",
                        epilog=_OUTPUT_RULES)
    _add_model_args(pg)
    pg.add_argument("--prompt", help="prompt text (default: a built-in Python prompt)")
    pg.add_argument("--max-new-tokens", type=_pos_int, default=64)
    pg.add_argument("--k", type=nonneg_int, default=4, help="draft length (K_max for Cascade; 0 = autoregressive)")
    pg.add_argument("--budget", type=budget_or_auto,
                    help="expert budget at verification: C (>= the target's top-k, as in moespec.ops) or 'auto' "
                         "(the rule chosen by measurement, see docs/budget-rules.md; it sets policy and "
                         "candidates itself); default none")
    pg.add_argument("--policy", default="substitute", choices=["substitute", "truncate"])
    pg.add_argument("--candidates", choices=["all", "union"],
                    help="experts a kept set is chosen from: all (MoE-Spec's rule) or the union of the draft "
                         "tokens' top-k (default: union, chosen by measurement; see docs/budget-rules.md)")
    pg.add_argument("--controller", default="static", choices=["static", "cascade", "cascade+budget"])
    pg.add_argument("--cascade-state", metavar="PATH",
                    help="Cascade warm start: read what the controller learned from PATH (if it exists) and write "
                         "it back after the run (JSON, see moespec.speculative.CascadeState)")
    pg.add_argument("--json", metavar="PATH", help="also write text and statistics as JSON (folders are created, "
                                                   "an existing file is overwritten)")
    pg.set_defaults(func=_generate)

    pc = sub.add_parser("capture", help="record a model's per-layer routing for `bench layer --routing replay:FILE`",
                        description="Run a model over prompts and save every MoE layer's router logits and top-k "
                                    "experts to one file, for `moespec bench layer --routing replay:FILE` (the "
                                    "layer benchmark then times the model's real routing).",
                        epilog=_OUTPUT_RULES)
    _add_model_args(pc, drafter=False)
    pc.add_argument("--prompts", help="JSONL prompts (default: built-in set)")
    pc.add_argument("--prompt", help="a single prompt instead of --prompts")
    pc.add_argument("--num-prompts", type=_pos_int)
    pc.add_argument("--max-tokens", type=_pos_int, default=512, help="tokens per prompt at most")
    pc.add_argument("--out", required=True, help="capture file to write (.pt; its folder is created if missing, an "
                                                 "existing file is overwritten)")
    pc.set_defaults(func=_capture)
    _attach_parsers(p)
    return p


def _attach_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's namespace its own parser (``args._parser``), so that errors found after
    parsing print that subcommand's usage (``moespec bench layer: error: ...``), not the top-level one."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _attach_parsers(sp)


_POSITIVE = ("max_new_tokens", "num_prompts", "iters", "max_tokens", "budget_k", "k_max", "budget", "threads")

_PREFIX = "moespec: "


def error_message(exc: BaseException) -> str:
    """The text of ``exc`` for a ``moespec: error:`` line, without the ``moespec:`` prefix some library
    errors already carry (so the line is prefixed once)."""
    msg = str(exc).strip() or type(exc).__name__
    while msg.startswith(_PREFIX):
        msg = msg[len(_PREFIX):].lstrip()
    return msg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: parse, check outputs, run; user errors become one ``moespec: error:`` line (exit 2).

    Errors in the arguments (found by argparse, or here before the command starts: bounds, output
    paths) print the subcommand's usage and ``moespec SUBCOMMAND: error: ...``; errors while the
    command runs print ``moespec: error: ...`` once."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    sub = getattr(args, "_parser", parser)
    if getattr(args, "preset", None):
        from .bench.generate import apply_preset

        apply_preset(args)  # before the output checks: a preset names its own output files
    for name in _POSITIVE:
        val = getattr(args, name, None)
        if isinstance(val, int) and val < 1:
            sub.error(f"--{name.replace('_', '-')} must be >= 1, got {val}")
    try:
        _prepare_outputs(args)
    except ValueError as exc:
        sub.error(error_message(exc))
    try:
        _apply_threads(args)
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, and keep Python's exit-time flush from failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, RuntimeError, OSError, ImportError) as exc:
        if os.environ.get("MOESPEC_DEBUG"):
            raise
        hint = "" if isinstance(exc, (ValueError, OSError)) else " (set MOESPEC_DEBUG=1 for the traceback)"
        print(f"moespec: error: {error_message(exc)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moespec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
