"""``moespec bench generate`` / ``moespec generate``: end-to-end speculative decoding evaluation.

Modes (each run on every prompt, greedy):

- ``ar``: autoregressive (the engine with K=0), the speed and agreement baseline;
- ``static`` K: a chain of K draft tokens every iteration, unbudgeted (lossless);
- ``budget`` C: static K (``budget_k``) with expert budget C at verification (lossy by design);
- ``cascade``: utility-driven K (docs/design.md §4), unbudgeted;
- ``cascade+budget``: Cascade choosing K and the budget C together.

Stream mode (``requests``): a stream of N short requests (the prompts in turn), the serving case; each
Cascade mode keeps one `moespec.speculative.CascadeState` across the requests of a stream (fresh per
repeat, so the cold start is paid and measured). Without it every prompt is an independent request and
Cascade starts cold on each.

Per mode: tokens/s and speed-up over ``ar`` (median and min-max over interleaved repeats, with a flag
when the spread is too wide to rank the modes: `moespec.bench.timing.rank_check`), mean acceptance
length, tokens per iteration, mean union and kept experts per MoE layer per verification forward,
expert MB per generated token, and agreement with the ``ar`` output (token match rate and first
divergence).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import report, timing

BUILTIN_PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\nimport sys\n\n\ndef main(argv=None):\n",
    "class Stack:\n    \"\"\"A last-in first-out container.\"\"\"\n\n    def __init__(self):\n",
    "def read_lines(path):\n    with open(path) as f:\n",
    "    for key, value in sorted(items.items()):\n        if value is None:\n",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(description=__doc__)\n",
    "try:\n    import json\nexcept ImportError:\n",
    "    def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__,",
)

MODE_FAMILIES = ("ar", "static", "tree", "budget", "cascade", "cascade+budget")

#: Dynamic draft trees of the ``tree`` family: depth and branching; ``--trees`` gives the node counts.
TREE_DEPTH, TREE_BRANCHING = 6, 3

#: Repeats of the whole prompt set per mode. Three keep the default run (8 prompts x 64 tokens x 8
#: modes) around two minutes on a 2-core CPU with one thread and give a min-max interval per mode.
DEFAULT_REPEATS = 3


@dataclass(frozen=True)
class Mode:
    """One evaluated configuration: ``kind`` in `MODE_FAMILIES`, draft size ``k`` (K_max for
    Cascade; the node count of a ``tree``), ``budget`` (None = unbudgeted; ignored by
    ``cascade+budget``, which picks it) and, for ``budget`` modes, an adaptive ``coverage`` rule
    (keep the fewest experts holding that share of the score mass, at most ``budget``)."""

    kind: str
    k: int = 0
    budget: Optional[int] = None
    coverage: Optional[float] = None

    @property
    def name(self) -> str:
        if self.kind == "ar":
            return "ar"
        if self.kind == "static":
            return f"static K={self.k}"
        if self.kind == "tree":
            return f"tree {self.k} nodes"
        if self.kind == "budget":
            if self.coverage is not None:
                return f"budget K={self.k} cov={self.coverage:g} C<={self.budget}"
            return f"budget K={self.k} C={self.budget}"
        return f"{self.kind} Kmax={self.k}"

    @property
    def draft(self):
        """The `generate` ``draft`` argument: a chain of ``k``, or a dynamic tree of ``k`` nodes."""
        if self.kind == "tree":
            from ..speculative import DraftConfig

            return DraftConfig.tree(TREE_DEPTH, TREE_BRANCHING, self.k)
        return self.k

    @property
    def controller(self) -> str:
        return {"cascade": "cascade", "cascade+budget": "cascade+budget"}.get(self.kind, "static")


def build_modes(families: Sequence[str], ks: Sequence[int], budgets: Sequence[int], budget_k: int,
                k_max: int, trees: Sequence[int] = (), coverages: Sequence[float] = ()) -> list[Mode]:
    """The list of modes to run, ``ar`` always first (it is the reference). ``coverages`` add one
    ``budget`` mode per coverage target, capped at the largest of ``budgets``."""
    bad = [f for f in families if f not in MODE_FAMILIES]
    if bad:
        raise ValueError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODE_FAMILIES)}")
    modes = [Mode("ar")]
    if "static" in families:
        modes += [Mode("static", k) for k in ks]
    if "tree" in families:
        modes += [Mode("tree", n) for n in trees]
    if "budget" in families:
        modes += [Mode("budget", budget_k, c) for c in budgets]
        if coverages and budgets:
            modes += [Mode("budget", budget_k, max(budgets), tau) for tau in coverages]
    if "cascade" in families:
        modes.append(Mode("cascade", k_max))
    if "cascade+budget" in families:
        modes.append(Mode("cascade+budget", k_max))
    return modes


#: Widening of the fine-grained target in the memory-bound presets (docs/memory-bound.md): every expert
#: gets this many times its trained intermediate size, so expert bytes dominate a forward.
MEMORY_BOUND_WIDEN = 128

#: Named workloads of `moespec bench generate --preset`: argparse ``dest`` -> value, applied where the
#: command line does not give the flag.
PRESETS = {
    "memory-bound": {
        "help": "the short main job: the fine-grained target widened to real expert bytes (bf16, moespec's "
                "CPU kernels for every mode), autoregressive vs static chains, budgets and Cascade, 4 prompts x "
                "48 tokens, 2 repeats (a few minutes on a 2-core CPU)",
        "settings": dict(target="fine", widen=MEMORY_BOUND_WIDEN, dtype="bf16", experts="moespec",
                         modes=["ar", "static", "budget", "cascade", "cascade+budget"], ks=[2, 4, 8],
                         budgets=[16, 24], budget_k=8, num_prompts=4, max_new_tokens=48, repeats=2,
                         name="bench_generate_memory_bound"),
    },
    "memory-bound-full": {
        "help": "the full table of the memory-bound regime: static chains K=1,2,4,8, trees of 8 and 16 nodes, a "
                "budget sweep with coverage rules, Cascade and Cascade+budget, 8 prompts x 64 tokens, 3 repeats",
        "settings": dict(target="fine", widen=MEMORY_BOUND_WIDEN, dtype="bf16", experts="moespec",
                         modes=["ar", "static", "tree", "budget", "cascade", "cascade+budget"], ks=[1, 2, 4, 8],
                         trees=[8, 16], budgets=[8, 12, 16, 24, 32], coverages=[0.9, 0.95], budget_k=8,
                         num_prompts=8, max_new_tokens=64, repeats=3, name="bench_generate_memory_bound_full"),
    },
}


def apply_preset(args) -> None:
    """Fill ``args`` from ``args.preset`` wherever the command line (``args.argv``) did not give the flag."""
    name = getattr(args, "preset", None)
    if not name:
        return
    given = {a.split("=", 1)[0] for a in (getattr(args, "argv", None) or []) if a.startswith("--")}
    for dest, value in PRESETS[name]["settings"].items():
        if "--" + dest.replace("_", "-") not in given:
            setattr(args, dest, value)


# ----------------------------------------------------------------------------- models


class TokenCodec:
    """Text <-> ids: the model's tokenizer, or bytes modulo the vocabulary for tokenizer-less
    (tiny random) models, so the pipeline runs end to end without any download."""

    def __init__(self, tokenizer=None, vocab_size: int = 256):
        self.tokenizer, self.vocab_size = tokenizer, int(vocab_size)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(list(ids))
        return " ".join(str(int(i)) for i in ids)

    @property
    def eos_token_id(self):
        return getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


BUILTIN_TARGETS = {"default": ("coarse", "moespec built-in Qwen3-MoE target (32 experts, top-4)"),
                   "fine": ("fine", "moespec built-in fine-grained Qwen3-MoE target (128 experts, top-8)")}


def load_target(spec: str, dtype: str = "fp32", device: str = "cpu"):
    """``(model, TokenCodec, label)`` for ``default`` / ``fine`` (the shipped targets), ``tiny:ARCH`` or an
    HF id/path."""
    if spec in BUILTIN_TARGETS:
        from .. import models

        name, label = BUILTIN_TARGETS[spec]
        try:
            m = models.load_target(dtype=_dtype(dtype), device=device, name=name)
            tok = models.load_tokenizer()
        except FileNotFoundError as exc:
            raise ValueError(f"the built-in target model is not available ({exc}); pass --target with a "
                             "Hugging Face id or path, or tiny:qwen3_moe for a random tiny model") from None
        return m, TokenCodec(tok, m.config.vocab_size), label
    if spec.startswith("tiny:"):
        from ..integrations.tiny import TINY_ARCHITECTURES, tiny_model

        arch = spec.split(":", 1)[1]
        if arch not in TINY_ARCHITECTURES:
            raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_ARCHITECTURES)}")
        m = tiny_model(arch, seed=0, dtype=_dtype(dtype)).to(device)
        return m, TokenCodec(None, m.config.vocab_size), f"tiny random {arch} (seed 0)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        m = AutoModelForCausalLM.from_pretrained(spec, dtype=_dtype(dtype)).to(device).eval()
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load target {spec!r}: {str(exc).splitlines()[0]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception:  # noqa: BLE001 - a model without a tokenizer still runs on byte ids
        tok = None
    return m, TokenCodec(tok, m.config.vocab_size), spec


def make_drafter_factory(spec: str, target_spec: str, dtype: str = "fp32",
                         device: str = "cpu") -> tuple[Callable[[], object], str]:
    """``(factory, label)``; the factory returns a fresh drafter per run.

    ``auto``: the built-in draft model for the built-in target, else prompt lookup;
    ``prompt-lookup``; ``default`` (built-in draft); ``tiny:ARCH`` (random, seed 1); an HF id/path.
    """
    from ..speculative import DraftModelDrafter, PromptLookupDrafter

    if spec == "auto":
        spec = "default" if target_spec in BUILTIN_TARGETS else "prompt-lookup"
    if spec in ("prompt-lookup", "pld"):
        return PromptLookupDrafter, "prompt lookup (n-gram)"
    if spec == "default":
        from .. import models

        try:
            small = models.load_draft(dtype=_dtype(dtype), device=device)
        except FileNotFoundError as exc:
            raise ValueError(f"the built-in draft model is not available ({exc}); use --drafter prompt-lookup") \
                from None
        return (lambda: DraftModelDrafter(small)), "moespec built-in dense draft model"
    if spec.startswith("tiny:"):
        from ..integrations.tiny import TINY_ARCHITECTURES, tiny_model

        arch = spec.split(":", 1)[1]
        if arch not in TINY_ARCHITECTURES:
            raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_ARCHITECTURES)}")
        small = tiny_model(arch, seed=1, dtype=_dtype(dtype)).to(device)
        return (lambda: DraftModelDrafter(small)), f"tiny random {arch} (seed 1)"
    from transformers import AutoModelForCausalLM

    try:
        small = AutoModelForCausalLM.from_pretrained(spec, dtype=_dtype(dtype)).to(device).eval()
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load drafter {spec!r}: {str(exc).splitlines()[0]}") from None
    return (lambda: DraftModelDrafter(small)), spec


def prepare_target(model, widen: Optional[int] = None, experts: str = "moespec", seed: int = 0,
                   time_forwards: bool = False, forward_tokens: Sequence[int] = (1, 9)) -> dict:
    """Make ``model`` ready for a benchmark and return what was done (for the record).

    ``widen``: give every routed expert ``widen`` times its trained intermediate size
    (`moespec.integrations.widen.widen_experts`: the same outputs, the bytes of a larger model).
    ``experts``: ``"moespec"`` patches the model so that every forward, unbudgeted ones included,
    runs `moespec.ops.moe_experts` (on CPU tensors the C++ CPU kernels), so that all modes share one
    experts implementation; ``"model"`` leaves unbudgeted forwards on the model's own implementation
    (each mode then patches it only for its statistics and budgets). ``time_forwards``: with ``widen``,
    time forwards of ``forward_tokens`` tokens (`forward_times`) before and after widening, and record
    the share of a forward that streaming the widened experts takes.
    """
    from ..integrations import patch

    info: dict = {"experts": experts}
    cfg = getattr(model.config, "text_config", None) or model.config
    info["model_experts_implementation"] = getattr(cfg, "_experts_implementation", None) or "eager"
    if experts not in ("moespec", "model"):
        raise ValueError(f"experts must be 'moespec' or 'model', got {experts!r}")
    if widen is not None and (isinstance(widen, bool) or not isinstance(widen, int) or widen < 1):
        raise ValueError(f"--widen must be an integer >= 1, got {widen!r}")
    handle = patch(model, budget=None, experts="moespec") if experts == "moespec" else None
    if experts == "moespec":
        info["experts_backend"] = experts_backend_label(next(model.parameters()).device)
    if widen is not None and widen > 1:
        from ..integrations.widen import widen_experts

        width = int(getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size"))
        if time_forwards:
            info["forward_ms_trained_width"] = forward_times(model, forward_tokens)
        if handle is not None:
            handle.unpatch()  # the patch reads the weights' layout and bytes: re-patch after widening
        info["widen"] = widen_experts(model, width * widen, seed=seed).to_dict()
        if handle is not None:
            patch(model, budget=None, experts="moespec")
        if time_forwards:
            info["forward_ms_widened"] = forward_times(model, forward_tokens)
            # What a forward's time is made of: the widening adds only expert bytes, so the difference
            # is (almost all) streaming the experts, the trained-width time the fixed costs.
            info["expert_share_of_forward"] = {
                t: round(1 - info["forward_ms_trained_width"][t] / info["forward_ms_widened"][t], 3)
                for t in forward_tokens}
    elif widen is not None:
        info["widen"] = None
    return info


@torch.no_grad()
def forward_times(model, tokens: Sequence[int] = (1, 9), reps: int = 7, past: int = 64, seed: int = 0) -> dict:
    """Median wall time in ms of one forward of T new tokens on a ``past``-token KV cache, per T.

    Inputs are random ids (the routing is the model's own on them); the cache is cropped back after
    every timed forward, so each sees the same past. Used to state what a forward's time is made of:
    `prepare_target` times the model before and after widening its experts."""
    from transformers import DynamicCache

    from ..integrations.hf_compat import forward_kwargs
    from ..speculative.verify import crop_cache

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.randint(0, vocab, (1, past), generator=gen).to(device),
          **forward_kwargs(model, cache, use_cache=True))
    out = {}
    for t in tokens:
        ts = []
        for _ in range(reps + 1):  # the first of each size warms up
            ids = torch.randint(0, vocab, (1, t), generator=gen).to(device)
            t0 = time.perf_counter()
            model(input_ids=ids, **forward_kwargs(model, cache, use_cache=True))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ts.append(time.perf_counter() - t0)
            crop_cache(cache, past)
        out[int(t)] = round(1e3 * sorted(ts[1:])[len(ts[1:]) // 2], 3)
    return out


def experts_backend_label(device) -> str:
    """What `moespec.ops.moe_experts` runs on ``device`` with ``backend="auto"`` (for the record)."""
    from .. import _cuda, cpu_kernels

    if torch.device(device).type == "cpu":
        return f"cpu (C++ CPU kernels, {cpu_kernels.isa()})" if cpu_kernels.available() else "reference (PyTorch)"
    return f"cuda ({_cuda.expert_generation()} kernels)" if hasattr(_cuda, "expert_generation") else "cuda"


def load_prompts(path: Optional[str], limit: Optional[int] = None) -> list[str]:
    """Prompts from a JSONL file (objects with ``prompt`` or ``text``, or bare strings), else the built-in set."""
    if not path:
        prompts = list(BUILTIN_PROMPTS)
    else:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"prompts file {path} does not exist")
        prompts = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            text = obj if isinstance(obj, str) else (obj.get("prompt") or obj.get("text")) if isinstance(obj, dict) \
                else None
            if not isinstance(text, str) or not text:
                raise ValueError(f"{path}:{n}: expected a string or an object with a 'prompt' or 'text' string")
            prompts.append(text)
        if not prompts:
            raise ValueError(f"prompts file {path} holds no prompts")
    if limit is None:
        return prompts
    if limit < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {limit}")
    if limit > len(prompts):
        # Refused rather than cycled: greedy decoding of a repeated prompt repeats the same tokens, so
        # cycling would only pretend to a larger sample (timing repeats are what --repeats is for).
        src = f"prompts file {path}" if path else "the built-in prompt set"
        raise ValueError(f"{limit} prompts requested but {src} holds {len(prompts)}; pass a --prompts JSONL "
                         f"file with at least {limit} prompts, or ask for at most {len(prompts)}")
    return prompts[:limit]


def target_top_k(model) -> int:
    """Experts per token (top-k) of a transformers MoE config (1 when the config names none)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    return int(getattr(cfg, "num_experts_per_tok", 1) or 1)


def check_mode_args(families: Sequence[str], ks: Sequence[int], budgets: Optional[Sequence[int]],
                    top_k: Optional[int] = None, policy: str = "substitute") -> None:
    """Reject `bench generate` mode arguments that would be ignored or run something else than asked.

    ``budgets`` are the ones the user gave (None: the defaults). Raises `ValueError` for unknown
    families, repeated or non-positive K, repeated budgets, budgets without a mode that uses them,
    and budgets that `moespec.ops.validate_budget` rejects for a top-``top_k`` router (checked
    only when ``top_k`` is given).
    """
    from ..ops import validate_budget

    bad = [f for f in families if f not in MODE_FAMILIES]
    if bad:
        raise ValueError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODE_FAMILIES)}")
    for flag, vals in (("--ks", ks), ("--budgets", budgets or [])):
        small = [v for v in vals if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if small:
            raise ValueError(f"{flag} must be positive integers, got {list(vals)}")
        dup = sorted({v for v in vals if list(vals).count(v) > 1})
        if dup:
            raise ValueError(f"{flag} lists {', '.join(map(str, dup))} more than once")
    if budgets and not ({"budget", "cascade+budget"} & set(families)):
        raise ValueError("--budgets applies to the budget and cascade+budget modes, and --modes selects neither")
    if budgets and top_k is not None:
        for c in budgets:
            try:
                validate_budget(c, top_k, policy)
            except ValueError as exc:
                raise ValueError(f"--budgets {c} rejected for this target (top-k = {top_k}): {exc}") from None


# ----------------------------------------------------------------------------- running


def _agreement(tokens: Sequence[int], ref: Sequence[int]) -> tuple[float, Optional[int]]:
    """(match rate over the reference's positions, first differing position or None)."""
    n = max(len(ref), len(tokens))
    if n == 0:
        return 1.0, None
    same = [i < len(tokens) and i < len(ref) and tokens[i] == ref[i] for i in range(n)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return sum(same) / n, first


def _layer_means(iterations: Sequence[dict]) -> tuple[Optional[float], Optional[float]]:
    unions, kept = [], []
    for it in iterations:
        for layer in it.get("layers") or []:
            if layer.get("union_size") is not None:
                unions.append(layer["union_size"])
                kept.append(layer["kept_size"])
    if not unions:
        return None, None
    return sum(unions) / len(unions), sum(kept) / len(kept)


def run_one(model, prompt_ids: Sequence[int], drafter, mode: Mode, max_new_tokens: int, policy: str = "substitute",
            eos_token_id=None, budget_choices=None, cascade_state=False,
            candidates: Optional[str] = None) -> tuple[list[int], dict]:
    """One greedy `moespec.speculative.generate` call for ``mode``; returns (new token ids, stats dict).

    ``cascade_state``: passed to `generate` (default False: a Cascade mode starts cold);
    ``candidates``: the budget's candidate set (None: the policy's default).
    """
    from ..speculative import generate

    kw = dict(drafter=drafter, max_new_tokens=max_new_tokens, draft=mode.draft, policy=policy,
              controller=mode.controller, do_sample=False, eos_token_id=eos_token_id, routing_stats=True,
              cascade_state=cascade_state, candidates=candidates)
    if mode.kind == "budget":
        kw["budget"] = mode.budget
        if mode.coverage is not None:
            from ..integrations import BudgetConfig

            kw["budget"] = BudgetConfig(mode.budget, policy, coverage=mode.coverage, candidates=candidates)
    if mode.kind == "cascade+budget" and budget_choices:
        kw["budget_choices"] = budget_choices
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    tokens, stats = generate(model, ids, **kw)
    return tokens[0, ids.shape[1]:].tolist(), stats.to_dict()


def summarise(mode: Mode, runs: Sequence[dict]) -> dict:
    """Aggregate the per-prompt runs of one mode into one table row."""
    new = sum(r["new_tokens"] for r in runs)
    wall = sum(r["wall_time_s"] for r in runs)
    its = [it for r in runs for it in r["iterations"]]
    drafted = [it for it in its if it.get("draft_size", 0) > 0]
    # Expert counts of verification forwards where there were any (plain decode otherwise).
    union, kept = _layer_means(drafted or its)
    ebytes = sum(int(it.get("expert_bytes") or 0) for it in its)
    firsts = [r["first_divergence"] for r in runs if r["first_divergence"] is not None]
    by_prompt: dict = {}
    for r in runs:
        by_prompt.setdefault(r.get("prompt_index", id(r)), []).append(r["first_divergence"] is None)
    return {
        "mode": mode.name, "kind": mode.kind, "k": mode.k, "budget": mode.budget,
        "prompts": len(by_prompt), "new_tokens": new, "wall_time_s": wall,
        "tokens_per_s": new / wall if wall > 0 else None,
        "mean_accepted": (sum(it["accepted"] for it in drafted) / len(drafted)) if drafted else 0.0,
        "tokens_per_iteration": new / len(its) if its else None,
        "mean_union_per_layer": union, "mean_kept_per_layer": kept,
        "expert_bytes_per_token": ebytes / new if new else None,
        "match_rate": sum(r["match_rate"] for r in runs) / len(runs) if runs else None,
        "expert_mb_per_token": ebytes / new / 1e6 if new else None,
        "identical_prompts": sum(all(v) for v in by_prompt.values()),  # identical in every repeat
        "first_divergence_min": min(firsts) if firsts else None,
        "first_divergence_mean": sum(firsts) / len(firsts) if firsts else None,
        "budgets_used": sorted({str(it.get("budget")) for it in drafted}),
        "speculating_share": len(drafted) / len(its) if its else None,  # iterations with a draft
        # Where an iteration's time goes (ms, mean over iterations): drafting, the target forward with
        # acceptance, and the rest (cache compaction, drafter commit, bookkeeping).
        **_time_split(its),
    }


def _time_split(its: Sequence[dict]) -> dict:
    if not its:
        return {"draft_ms": None, "verify_ms": None, "other_ms": None}
    n = len(its)
    d = sum(it.get("draft_time_s") or 0.0 for it in its) / n
    v = sum(it.get("verify_time_s") or 0.0 for it in its) / n
    t = sum(it.get("iter_time_s") or 0.0 for it in its) / n
    return {"draft_ms": 1e3 * d, "verify_ms": 1e3 * v, "other_ms": 1e3 * max(0.0, t - d - v)}


class _Progress:
    """A tqdm bar on a terminal; otherwise (logs, CI, pipes) about ten plain progress lines on stderr,
    since a redrawn bar written to a file is one line per step."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.n, self.enabled = total, 0, enabled
        self.every = max(1, total // 10)
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)
            except Exception:  # noqa: BLE001 - tqdm is optional
                self.bar = None

    def step(self, msg: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(msg[:60])
            self.bar.update(1)
        elif self.n % self.every == 0 or self.n == self.total:
            print(f"[{self.n}/{self.total}] {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _throughput(runs: Sequence[dict]) -> Optional[float]:
    """Tokens per second over ``runs`` (total new tokens / total wall time)."""
    wall = sum(r["wall_time_s"] for r in runs)
    return sum(r["new_tokens"] for r in runs) / wall if wall > 0 else None


def aggregate_repeats(modes: Sequence[Mode], grid: dict, repeats: int, n_prompts: int,
                      tie: float = timing.TIE_TOLERANCE) -> tuple[list[dict], dict]:
    """Mode rows and the ranking check from ``grid[(repeat, mode index, prompt index)]`` runs.

    Pure (no clock): the runs need ``new_tokens``, ``wall_time_s``, ``tokens``, ``mean_accepted`` and
    ``iterations``; ``modes[0]`` is ``ar``. Sets each run's ``match_rate`` and ``first_divergence``
    (against ``ar`` of the same repeat and prompt). Throughput per (mode, repeat) is total tokens over
    total wall time across the prompts; the speed-up per repeat divides it by the same repeat's ``ar``.
    """
    n_modes = len(modes)
    for (rep, j, i), run in grid.items():
        run["match_rate"], run["first_divergence"] = _agreement(run["tokens"], grid[rep, 0, i]["tokens"])
    tps = [[_throughput([grid[rep, j, i] for i in range(n_prompts)]) for rep in range(repeats)]
           for j in range(n_modes)]
    rows = []
    for j, mode in enumerate(modes):
        row = summarise(mode, [grid[rep, j, i] for rep in range(repeats) for i in range(n_prompts)])
        speedups = [t / a if t and a else None for t, a in zip(tps[j], tps[0])]
        ts, ss = timing.spread(tps[j]), timing.spread(speedups)
        row.update(repeats=repeats, tokens_per_s=ts["median"], tokens_per_s_min=ts["min"],
                   tokens_per_s_max=ts["max"], tokens_per_s_per_repeat=tps[j], speedup=ss["median"],
                   speedup_min=ss["min"], speedup_max=ss["max"], speedup_per_repeat=speedups)
        rows.append(row)
    check = timing.rank_check([m.name for m in modes], [r["speedup_per_repeat"] for r in rows], tie)
    for j, row in enumerate(rows):
        row["order"] = ("?" if j in check["undetermined"] else "ok") if check["checked"] else None
    return rows, check


def run_generate_bench(model, codec: TokenCodec, drafter_factory: Callable[[], object], prompts: Sequence[str],
                       modes: Sequence[Mode], max_new_tokens: int = 32, policy: str = "substitute",
                       budget_choices=None, warmup: bool = True, progress: bool = True,
                       keep_iterations: bool = False, argv: Optional[Sequence[str]] = None,
                       config: Optional[dict] = None, repeats: int = DEFAULT_REPEATS,
                       tie: float = timing.TIE_TOLERANCE, requests: Optional[int] = None,
                       candidates: Optional[str] = None) -> dict:
    """Run every mode on every prompt ``repeats`` times; returns ``{"meta", "config", "modes", "spread", "runs"}``.

    Interleaved: each repeat takes the prompts in turn and runs every mode on the prompt before moving
    on (mode order rotated per prompt and repeat), so a slow phase of a shared machine lands on all
    modes alike instead of on whichever mode happened to run then. A mode's speed-up is computed per
    repeat against the same repeat's ``ar`` run; its row holds the median and min-max over the
    repeats, and ``spread`` is `moespec.bench.timing.rank_check` of those per-repeat speed-ups (the
    row's ``order`` is ``"?"`` where it could not rank the mode, ``"ok"`` where it could, None with
    one repeat). Token agreement is against ``ar`` of the same repeat and prompt.

    ``requests``: stream mode, N requests taking the prompts in turn (request r is prompt r mod P); each
    Cascade mode keeps one `CascadeState` across a repeat's requests (a fresh one per repeat). None: one
    request per prompt, Cascade cold on each. ``candidates``: the budgets' candidate set (None: the default).

    ``modes`` rows: see `summarise`, plus ``repeats``, ``tokens_per_s`` / ``speedup`` (medians),
    ``*_min``, ``*_max``, ``*_per_repeat`` and ``order``. ``runs``: one per (repeat, mode, prompt)
    with repeat, new_tokens, wall_time_s, tokens_per_s, mean_accepted, match_rate, first_divergence,
    summary, controller (and iterations when ``keep_iterations``).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not modes or modes[0].kind != "ar":
        raise ValueError("modes must start with the 'ar' mode (the reference of speed-up and agreement)")
    if requests is not None and (isinstance(requests, bool) or not isinstance(requests, int) or requests < 1):
        raise ValueError(f"requests must be an int >= 1, got {requests!r}")
    device = next(model.parameters()).device
    prompt_ids = [codec.encode(p) for p in prompts]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("a prompt encodes to zero tokens")
    stream = requests is not None
    request_ids = [prompt_ids[r % len(prompt_ids)] for r in range(requests)] if stream else prompt_ids
    eos = codec.eos_token_id
    if warmup:
        # The first call pays one-time costs (patching, allocator, kernels); keep them out of the timings.
        run_one(model, prompt_ids[0][:16], drafter_factory(), Mode("static", max(m.k for m in modes) or 1),
                min(4, max_new_tokens), policy, eos, budget_choices, candidates=candidates)
    from ..speculative import CascadeState

    n_modes, n_prompts = len(modes), len(request_ids)
    grid: dict[tuple[int, int, int], dict] = {}  # (repeat, mode index, request index) -> run
    bar = _Progress(repeats * n_modes * n_prompts, progress)
    try:
        for rep in range(repeats):
            # Stream mode: one state per Cascade mode and repeat, kept across the requests.
            states = {j: CascadeState() if stream and m.kind in ("cascade", "cascade+budget") else False
                      for j, m in enumerate(modes)}
            for i, ids in enumerate(request_ids):
                first = (rep + i) % n_modes
                for j in list(range(first, n_modes)) + list(range(first)):
                    mode = modes[j]
                    t0 = time.perf_counter()
                    new, st = run_one(model, ids, drafter_factory(), mode, max_new_tokens, policy, eos,
                                      budget_choices, cascade_state=states[j], candidates=candidates)
                    summ = st["summary"]
                    run = {
                        "mode": mode.name, "repeat": rep, "prompt_index": i % len(prompt_ids), "request": i,
                        "prompt_tokens": len(ids),
                        "new_tokens": len(new), "wall_time_s": summ["wall_time_s"],
                        "tokens_per_s": len(new) / summ["wall_time_s"] if summ["wall_time_s"] > 0 else None,
                        "mean_accepted": summ["mean_accepted"], "tokens": new, "summary": summ,
                        "controller": st.get("controller"), "iterations": st["iterations"],
                    }
                    grid[rep, j, i] = run
                    bar.step(f"{rep + 1}/{repeats} {mode.name} {'r' if stream else 'p'}{i + 1}: "
                             f"{run['tokens_per_s'] or 0:.0f} tok/s "
                             f"({time.perf_counter() - t0:.1f} s)")
    finally:
        bar.close()
    rows, check = aggregate_repeats(modes, grid, repeats, n_prompts, tie)
    runs = [grid[rep, j, i] for rep in range(repeats) for j in range(n_modes) for i in range(n_prompts)]
    if not keep_iterations:
        for r in runs:
            del r["iterations"]
    meta = report.run_meta(device, argv)
    meta["timing"] = ("wall-clock" if device.type != "cuda" else "wall-clock, device synchronised") + \
        f"; {repeats} interleaved repeat{'s' if repeats > 1 else ''}, median and min-max"
    cfg = {"max_new_tokens": max_new_tokens, "policy": policy, "candidates": candidates,
           "prompts": len(prompt_ids), "repeats": repeats,
           "requests": requests,
           "cascade_state": ("one CascadeState per Cascade mode and repeat, kept across the stream's requests"
                             if stream else "none: Cascade starts cold on every request"),
           "interleaving": f"per repeat, per {'request' if stream else 'prompt'}: every mode, order rotated by "
                           f"(repeat + {'request' if stream else 'prompt'})",
           "modes": [asdict(m) | {"name": m.name} for m in modes], **(config or {})}
    return {"meta": meta, "config": cfg, "modes": rows, "spread": check, "runs": runs}


# ----------------------------------------------------------------------------- output

# (row key, terminal header, Markdown header). The terminal drops OPTIONAL_COLUMNS (first listed,
# first dropped) when the table would be wider than report.TERMINAL_WIDTH; the Markdown file has all.
COLUMNS = [
    ("mode", "mode", "mode"),
    ("tokens_per_s", "tok/s", "tokens/s (median)"),
    ("tokens_per_s_range", "min-max", "tokens/s min-max"),
    ("speedup", "speed-up", "speed-up (median)"),
    ("speedup_range", "min-max", "speed-up min-max"),
    ("order", "order", "order"),
    ("mean_accepted", "accept", "accepted per verification"),
    ("tokens_per_iteration", "tok/it", "tokens per iteration"),
    ("mean_union_per_layer", "union", "union experts per layer"),
    ("mean_kept_per_layer", "kept", "kept experts per layer"),
    ("expert_mb_per_token", "MB/tok", "expert MB per token"),
    ("draft_ms", "draft ms", "draft ms per iteration"),
    ("verify_ms", "verify ms", "verify ms per iteration"),
    ("other_ms", "other ms", "other ms per iteration"),
    ("match_rate", "match", "tokens matching ar"),
    ("first_divergence_min", "1st div", "first divergence"),
]
OPTIONAL_COLUMNS = ("other_ms", "draft_ms", "verify_ms", "tokens_per_iteration", "tokens_per_s_range",
                    "first_divergence_min")


def _range(lo, hi, digits: Optional[int] = None) -> Optional[str]:
    if lo is None or hi is None:
        return None
    if digits is None:
        return f"{report.fmt(float(lo))}-{report.fmt(float(hi))}"
    return f"{lo:.{digits}f}-{hi:.{digits}f}"


def _display_rows(result: dict) -> list[dict]:
    """Table cells per mode: '-' where a column has no meaning for the row (the ar reference)."""
    out = []
    for r in result["modes"]:
        ar = r.get("kind") == "ar"
        b = r.get("expert_bytes_per_token")
        sp = r.get("speedup")
        d = dict(r)
        d.update(
            tokens_per_s_range=_range(r.get("tokens_per_s_min"), r.get("tokens_per_s_max")),
            speedup=None if sp is None else f"{sp:.2f}",
            # ar's speed-up is 1 by definition in every repeat: no range to show.
            speedup_range=None if ar else _range(r.get("speedup_min"), r.get("speedup_max"), 2),
            expert_mb_per_token=r.get("expert_mb_per_token", None if b is None else b / 1e6),
            # Acceptance and agreement compare a speculative mode with ar; ar has neither.
            mean_accepted=None if ar else r.get("mean_accepted"),
            match_rate=None if ar or r.get("match_rate") is None else _percent(r["match_rate"]),
            first_divergence_min=None if ar else ("none" if r.get("first_divergence_min") is None
                                                  else r["first_divergence_min"]),
        )
        out.append(d)
    return out


def _percent(x: float) -> str:
    if x >= 1.0:
        return "100%"
    return f"{100 * x:.1f}%" if x >= 0.995 or x < 0.1 else f"{100 * x:.0f}%"


def generate_table(result: dict, max_width: Optional[int] = report.TERMINAL_WIDTH) -> str:
    """The terminal table of the mode rows, at most ``max_width`` characters wide when the optional
    columns can be dropped to get there (``max_width=None``: every column, as in the Markdown file);
    a line under it names any dropped column."""
    rows = _display_rows(result)
    cols = [(k, h) for k, h, _ in COLUMNS]
    kept, dropped = report.fit_columns(rows, cols, max_width, OPTIONAL_COLUMNS)
    text = report.terminal_table(rows, kept)
    if dropped:
        text += f"\n(not shown, to fit {max_width} columns: {', '.join(dropped)}; --wide prints them, the Markdown " \
                "file has them)"
    return text


def _acceptance_example(rows: Sequence[dict]) -> Optional[str]:
    """A budget row with higher acceptance than every unbudgeted static row and a low match, if any."""
    static = [r for r in rows if r.get("kind") == "static" and r.get("mean_accepted") is not None]
    for r in rows:
        if r.get("kind") != "budget" or r.get("match_rate") is None or not static:
            continue
        ref = max(static, key=lambda x: x["mean_accepted"])
        if r["mean_accepted"] > ref["mean_accepted"] and r["match_rate"] < 0.9:
            return (f"here {r['mode']} accepts {r['mean_accepted']:.2f} tokens per verification against "
                    f"{ref['mean_accepted']:.2f} for {ref['mode']}, while only {_percent(r['match_rate'])} of its "
                    "tokens match ar")
    return None


def generate_notes(result: dict) -> list[str]:
    """The notes printed under the table and written under the Markdown table."""
    cfg, spread = result["config"], result.get("spread") or {}
    n = cfg.get("repeats", 1)
    tie = spread.get("tie", timing.TIE_TOLERANCE)
    notes = [
        f"{_workload(cfg)}, greedy, policy {cfg['policy']}; {n} "
        f"repeat{'s' if n > 1 else ''}, interleaved: each repeat runs every mode on a {_unit(cfg)} before the next "
        f"{_unit(cfg)} (mode order rotated), so slow phases of a shared machine hit all modes alike.",
        ("stream: Cascade keeps what it learned (a CascadeState per mode, fresh per repeat) from one request to the "
         "next, so the cold start of each repeat is paid and measured once per stream." if cfg.get("requests")
         else "each prompt is an independent request: Cascade starts cold on every one (use --requests N for a "
              "stream, where it keeps its state)."),
        "tok/s and speed-up: median over the repeats, min-max beside it; the speed-up is computed per repeat "
        "against that repeat's ar run.",
        f"order: '?' = this run does not rank the mode: its speed-up range overlaps another mode's (ar counts as "
        f"1.00-1.00) and the spread is too wide to call them equal (a tie: each of the two within {100 * tie:g} % "
        f"over its repeats, medians within {100 * tie:g} %); 'ok' = ordered or tied against every mode; '-' = one "
        "repeat, nothing checked.",
        "accept: draft tokens accepted per verification. Under a budget the draft is verified by the budgeted "
        "target, so this is agreement with the budgeted model, not with the unbudgeted target: a budget that "
        "degrades the model can raise it (the degraded output falls into repetitive loops a drafter predicts "
        "easily) while match drops. Judge a budget's quality by match, not by acceptance.",
        "union/kept: distinct experts per MoE layer per verification forward (per decode forward for ar); "
        "MB/tok: expert weights read per generated token in MB (10^6 bytes), prefill excluded.",
        "match: share of token positions equal to ar's output (mean over prompts and repeats); 1st div: "
        "earliest differing position (none = identical everywhere); '-' = no meaning for the row (ar is the "
        "reference).",
    ]
    notes += cascade_targets(result)
    example = _acceptance_example(result["modes"])
    if example:
        i = next(i for i, n in enumerate(notes) if n.startswith("accept:"))
        notes[i] = notes[i][:-1] + f" ({example})."
    return notes


def cascade_targets(result: dict) -> list[str]:
    """Lines checking Cascade's promise (docs/cascade.md) on the mode rows: >= 0.98x ``ar`` where every
    fixed mode it could have chosen loses, >= 0.95x the best of them where one wins, and
    ``cascade+budget`` >= ``cascade`` (medians, with each mode's min-max). ``cascade`` is held to the
    lossless fixed modes (static chains, trees); ``cascade+budget``, which also picks C, to those and
    the static (K, C) budget modes. Empty without Cascade or static rows."""
    rows = result["modes"]
    static = [r for r in rows if r.get("kind") == "static" and r.get("speedup") is not None]
    casc = [r for r in rows if r.get("kind") in ("cascade", "cascade+budget") and r.get("speedup") is not None]
    if not static or not casc:
        return []
    out = []
    for r in casc:
        kinds = ("static", "tree") if r["kind"] == "cascade" else ("static", "tree", "budget")
        pool = [x for x in rows if x.get("kind") in kinds and x.get("speedup") is not None]
        best = max(pool, key=lambda x: x["speedup"])
        loses = best["speedup"] < 1.0
        target = 0.98 if loses else 0.95 * best["speedup"]
        what = "static K" if kinds == ("static",) or not any(x["kind"] != "static" for x in pool) else \
            "fixed mode" if r["kind"] == "cascade+budget" else "lossless fixed mode"
        ref = f"ar (every {what} loses here)" if loses else f"{best['mode']} (0.95 x {best['speedup']:.2f})"
        gap = target - r["speedup"]
        verdict = "met" if gap <= 0 else f"missed by {gap:.3f}"
        out.append(f"Cascade target: {r['mode']} {r['speedup']:.3f} (min-max {r['speedup_min']:.2f}-"
                   f"{r['speedup_max']:.2f}) against >= {target:.3f} for {ref}: {verdict} on the median.")
    pair = {r["kind"]: r for r in casc}
    if len(pair) == 2:
        c, j = pair["cascade"], pair["cascade+budget"]
        d = j["speedup"] - c["speedup"]
        out.append(f"Cascade target: cascade+budget >= cascade: {j['speedup']:.3f} against {c['speedup']:.3f}, "
                   + ("met" if d >= 0 else f"missed by {-d:.3f}") + " on the median"
                   + ("" if result.get("spread", {}).get("checked") is False else
                      "; their min-max ranges overlap, so this run does not order them"
                      if not (j["speedup_min"] > c["speedup_max"] or c["speedup_min"] > j["speedup_max"]) else "")
                   + ".")
    return out


def _unit(cfg: dict) -> str:
    return "request" if cfg.get("requests") else "prompt"


def _workload(cfg: dict) -> str:
    if cfg.get("requests"):
        return (f"a stream of {cfg['requests']} requests ({cfg['prompts']} prompts in turn) x "
                f"{cfg['max_new_tokens']} new tokens")
    return f"{cfg['prompts']} prompts x {cfg['max_new_tokens']} new tokens"


def spread_warning(result: dict) -> Optional[str]:
    """One warning line when the spread is too wide to rank the modes (or was not measured), else None."""
    spread = result.get("spread") or {}
    if not spread:
        return None
    if not spread.get("checked"):
        return ("1 repeat: no spread measured, so the ranking of the modes is not checked; use --repeats 3 or "
                "more")
    if not spread.get("flagged"):
        return None
    bad = [p for p in spread["pairs"] if p["relation"] == "undetermined"]
    shown = "; ".join(f"{p['a']} {p['a_range'][0]:.2f}-{p['a_range'][1]:.2f} vs {p['b']} "
                      f"{p['b_range'][0]:.2f}-{p['b_range'][1]:.2f}" for p in bad[:4])
    more = f"; and {len(bad) - 4} more" if len(bad) > 4 else ""
    return (f"the speed-up spread is too wide to rank {len(spread['undetermined'])} of {len(result['modes'])} "
            f"modes (marked '?'): {shown}{more}. Rerun with more --repeats or on a quieter machine to rank "
            "them.")


def _target_lines(cfg: dict) -> list[str]:
    """Header lines on how the target ran: dtype, experts implementation, widening, forward-time split."""
    out = []
    if cfg.get("experts"):
        backend = cfg.get("experts_backend") or cfg.get("model_experts_implementation")
        out.append(f"experts: {cfg['experts']}, run by {backend}; dtype {cfg.get('dtype', 'fp32')}")
    w = cfg.get("widen")
    if w:
        out.append(f"widened experts: intermediate {w['intermediate_size']} -> {w['widened_size']} (x{w['factor']:g}; "
                   f"zero down-projection columns, outputs unchanged), {w['expert_bytes_after'] / 1e6:.2f} MB per "
                   f"expert, {w['total_expert_bytes'] / 1e9:.2f} GB of experts in all")
    before, after = cfg.get("forward_ms_trained_width"), cfg.get("forward_ms_widened")
    if before and after:
        share = cfg.get("expert_share_of_forward") or {}
        parts = [f"T={t}: {before[t]:.1f} ms at the trained width, {after[t]:.1f} ms widened"
                 + (f" ({100 * share[t]:.0f} % streaming the widened experts)" if t in share else "")
                 for t in after if t in before]
        out.append("one target forward of T random tokens (64-token cache, median of 7; random tokens route "
                   "wider than drafts): " + "; ".join(parts))
    return out


def generate_markdown(result: dict) -> str:
    """The Markdown report of a `run_generate_bench` result (every column, notes under the table)."""
    meta, cfg = result["meta"], result["config"]
    extra = [f"target: {cfg.get('target')}; drafter: {cfg.get('drafter')}",
             f"{_workload(cfg)}, greedy; policy {cfg['policy']}; "
             f"timing: {meta['timing']}",
             "every mode runs the target patched by `moespec.patch` (routing statistics; budgets where asked), so "
             "all modes share one MoE implementation"] + _target_lines(cfg)
    lines = [f"# moespec bench generate — {meta['device']}", ""] + report.meta_markdown(meta, extra) + [""]
    lines.append(report.markdown_table(_display_rows(result), [(k, h) for k, _, h in COLUMNS]))
    lines += [""] + [f"- {n}" for n in generate_notes(result)]
    warn = spread_warning(result)
    if warn:
        lines += ["", f"**Warning:** {warn}"]
    rule = (result.get("spread") or {}).get("rule") or timing.RANK_RULE.format(tie=timing.TIE_TOLERANCE,
                                                                                 pct=100 * timing.TIE_TOLERANCE)
    lines += ["", f"Ranking rule (`order`): {rule}"]
    return "\n".join(lines) + "\n"


def plot_generate(result: dict, path: Path) -> Optional[Path]:
    """PNG: speed-up over autoregressive per mode, and tokens/s against expert MB read per token (one point
    per mode, labelled with its match rate against autoregressive decoding)."""
    plt = report.matplotlib_pyplot()
    rows = result["modes"]
    if plt is None or not rows:
        return None
    names = [r["mode"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    sp = [r.get("speedup") or 0 for r in rows]
    err = [[max(0.0, v - (r.get("speedup_min") if r.get("speedup_min") is not None else v)) for v, r in zip(sp, rows)],
           [max(0.0, (r.get("speedup_max") if r.get("speedup_max") is not None else v) - v) for v, r in zip(sp, rows)]]
    a1.bar(names, sp, yerr=err, capsize=3, color="#4c72b0")
    a1.axhline(1.0, color="k", lw=0.8, ls="--")
    a1.set_ylabel("speed-up over autoregressive (median, min-max)")
    a1.tick_params(axis="x", labelrotation=45, labelsize=7)
    for lab in a1.get_xticklabels():
        lab.set_horizontalalignment("right")
    a1.grid(True, axis="y", alpha=0.3)
    mb = [r.get("expert_mb_per_token") or (r.get("expert_bytes_per_token") or 0) / 1e6 for r in rows]
    tps = [r.get("tokens_per_s") or 0 for r in rows]
    lo = [max(0.0, v - (r.get("tokens_per_s_min") if r.get("tokens_per_s_min") is not None else v))
          for v, r in zip(tps, rows)]
    hi = [max(0.0, (r.get("tokens_per_s_max") if r.get("tokens_per_s_max") is not None else v) - v)
          for v, r in zip(tps, rows)]
    colours = {"ar": "k", "static": "#4c72b0", "tree": "#55a868", "budget": "#dd8452", "cascade": "#8172b2",
               "cascade+budget": "#c44e52"}
    for i, r in enumerate(rows):
        a2.errorbar([mb[i]], [tps[i]], yerr=[[lo[i]], [hi[i]]], fmt="o", capsize=2,
                    color=colours.get(r.get("kind"), "#937860"))
        match = f" ({100 * r['match_rate']:.0f}%)" if r.get("match_rate") is not None and r.get("kind") != "ar" else ""
        a2.annotate(names[i] + match, (mb[i], tps[i]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    a2.set_xlabel("expert MB read per generated token")
    a2.set_ylabel("tokens/s (median, min-max)")
    a2.grid(True, alpha=0.3)
    fig.suptitle(f"moespec bench generate — {result['config'].get('target')} — {result['meta']['device']} "
                 "(in brackets: token match vs autoregressive)", fontsize=9)
    return report.save_figure(fig, path)


def write_generate_outputs(result: dict, out_dir: Path, stem: str = "bench_generate", png: bool = True) -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>.png``; returns their paths."""
    return report.write_outputs(result, out_dir, stem, generate_markdown, plot_generate, png)
