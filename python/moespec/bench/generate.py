"""``moespec bench generate`` / ``moespec generate``: end-to-end speculative decoding evaluation.

Modes (each run on every prompt, greedy):

- ``ar``: autoregressive (the engine with K=0), the speed and agreement baseline;
- ``static`` K: a chain of K draft tokens every iteration, unbudgeted (lossless);
- ``budget`` C: static K (``budget_k``) with expert budget C at verification (lossy by design);
- ``cascade``: utility-driven K (DESIGN §4), unbudgeted;
- ``cascade+budget``: Cascade choosing K and the budget C together.

Per mode: tokens/s and speed-up over ``ar``, mean acceptance length, tokens per iteration, mean
union and kept experts per MoE layer per verification forward, expert bytes per generated token, and
agreement with the ``ar`` output (token match rate and first divergence).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import report

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

MODE_FAMILIES = ("ar", "static", "budget", "cascade", "cascade+budget")


@dataclass(frozen=True)
class Mode:
    """One evaluated configuration: ``kind`` in `MODE_FAMILIES`, draft size ``k`` (K_max for
    Cascade), ``budget`` (None = unbudgeted; ignored by ``cascade+budget``, which picks it)."""

    kind: str
    k: int = 0
    budget: Optional[int] = None

    @property
    def name(self) -> str:
        if self.kind == "ar":
            return "ar"
        if self.kind == "static":
            return f"static K={self.k}"
        if self.kind == "budget":
            return f"budget K={self.k} C={self.budget}"
        return f"{self.kind} Kmax={self.k}"

    @property
    def controller(self) -> str:
        return {"cascade": "cascade", "cascade+budget": "cascade+budget"}.get(self.kind, "static")


def build_modes(families: Sequence[str], ks: Sequence[int], budgets: Sequence[int], budget_k: int,
                k_max: int) -> list[Mode]:
    """The list of modes to run, ``ar`` always first (it is the reference)."""
    bad = [f for f in families if f not in MODE_FAMILIES]
    if bad:
        raise ValueError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODE_FAMILIES)}")
    modes = [Mode("ar")]
    if "static" in families:
        modes += [Mode("static", k) for k in ks]
    if "budget" in families:
        modes += [Mode("budget", budget_k, c) for c in budgets]
    if "cascade" in families:
        modes.append(Mode("cascade", k_max))
    if "cascade+budget" in families:
        modes.append(Mode("cascade+budget", k_max))
    return modes


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


def load_target(spec: str, dtype: str = "fp32", device: str = "cpu"):
    """``(model, TokenCodec, label)`` for ``default`` (the shipped model), ``tiny:ARCH`` or an HF id/path."""
    if spec == "default":
        from .. import models

        try:
            m = models.load_target(dtype=_dtype(dtype), device=device)
            tok = models.load_tokenizer()
        except FileNotFoundError as exc:
            raise ValueError(f"the built-in target model is not available ({exc}); pass --target with a "
                             "Hugging Face id or path, or tiny:qwen3_moe for a random tiny model") from None
        return m, TokenCodec(tok, m.config.vocab_size), "moespec built-in Qwen3-MoE target"
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
        spec = "default" if target_spec == "default" else "prompt-lookup"
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
    return prompts[:limit] if limit else prompts


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
            eos_token_id=None, budget_choices=None) -> tuple[list[int], dict]:
    """One greedy `moespec.speculative.generate` call for ``mode``; returns (new token ids, stats dict)."""
    from ..speculative import generate

    kw = dict(drafter=drafter, max_new_tokens=max_new_tokens, draft=mode.k, policy=policy,
              controller=mode.controller, do_sample=False, eos_token_id=eos_token_id, routing_stats=True)
    if mode.kind == "budget":
        kw["budget"] = mode.budget
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
    return {
        "mode": mode.name, "kind": mode.kind, "k": mode.k, "budget": mode.budget,
        "prompts": len(runs), "new_tokens": new, "wall_time_s": wall,
        "tokens_per_s": new / wall if wall > 0 else None,
        "mean_accepted": (sum(it["accepted"] for it in drafted) / len(drafted)) if drafted else 0.0,
        "tokens_per_iteration": new / len(its) if its else None,
        "mean_union_per_layer": union, "mean_kept_per_layer": kept,
        "expert_bytes_per_token": ebytes / new if new else None,
        "match_rate": sum(r["match_rate"] for r in runs) / len(runs) if runs else None,
        "identical_prompts": sum(r["first_divergence"] is None for r in runs),
        "first_divergence_min": min(firsts) if firsts else None,
        "first_divergence_mean": sum(firsts) / len(firsts) if firsts else None,
        "budgets_used": sorted({str(it.get("budget")) for it in drafted}),
    }


class _Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.n, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
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
        else:
            print(f"[{self.n}/{self.total}] {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_generate_bench(model, codec: TokenCodec, drafter_factory: Callable[[], object], prompts: Sequence[str],
                       modes: Sequence[Mode], max_new_tokens: int = 32, policy: str = "substitute",
                       budget_choices=None, warmup: bool = True, progress: bool = True,
                       keep_iterations: bool = False, argv: Optional[Sequence[str]] = None,
                       config: Optional[dict] = None) -> dict:
    """Run every mode on every prompt; returns ``{"meta", "config", "modes", "runs"}``.

    ``modes`` rows: see `summarise`. ``runs``: one per (mode, prompt) with new_tokens,
    wall_time_s, tokens_per_s, mean_accepted, match_rate, first_divergence, summary, controller
    (and iterations when ``keep_iterations``).
    """
    device = next(model.parameters()).device
    prompt_ids = [codec.encode(p) for p in prompts]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("a prompt encodes to zero tokens")
    eos = codec.eos_token_id
    if warmup:
        # The first call pays one-time costs (patching, allocator, kernels); keep them out of the timings.
        run_one(model, prompt_ids[0][:16], drafter_factory(), Mode("static", max(m.k for m in modes) or 1),
                min(4, max_new_tokens), policy, eos, budget_choices)
    bar = _Progress(len(modes) * len(prompt_ids), progress)
    refs: list[list[int]] = []
    rows, runs = [], []
    try:
        for mode in modes:
            mode_runs = []
            for i, ids in enumerate(prompt_ids):
                t0 = time.perf_counter()
                new, st = run_one(model, ids, drafter_factory(), mode, max_new_tokens, policy, eos, budget_choices)
                if mode.kind == "ar":
                    refs.append(new)
                rate, first = _agreement(new, refs[i])
                summ = st["summary"]
                run = {
                    "mode": mode.name, "prompt_index": i, "prompt_tokens": len(ids), "new_tokens": len(new),
                    "wall_time_s": summ["wall_time_s"],
                    "tokens_per_s": len(new) / summ["wall_time_s"] if summ["wall_time_s"] > 0 else None,
                    "mean_accepted": summ["mean_accepted"], "match_rate": rate, "first_divergence": first,
                    "tokens": new, "summary": summ, "controller": st.get("controller"),
                    "iterations": st["iterations"],
                }
                mode_runs.append(run)
                bar.step(f"{mode.name} prompt {i + 1}: {run['tokens_per_s'] or 0:.1f} tok/s "
                         f"({time.perf_counter() - t0:.1f} s)")
            row = summarise(mode, mode_runs)
            rows.append(row)
            if not keep_iterations:
                for r in mode_runs:
                    del r["iterations"]
            runs += mode_runs
    finally:
        bar.close()
    ar = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = (row["tokens_per_s"] / ar) if ar and row["tokens_per_s"] else None
    meta = report.run_meta(device, argv)
    meta["timing"] = "wall-clock" if device.type != "cuda" else "wall-clock, device synchronised"
    cfg = {"max_new_tokens": max_new_tokens, "policy": policy, "prompts": len(prompt_ids),
           "modes": [asdict(m) | {"name": m.name} for m in modes], **(config or {})}
    return {"meta": meta, "config": cfg, "modes": rows, "runs": runs}


# ----------------------------------------------------------------------------- output

COLUMNS = [("mode", "mode"), ("tokens_per_s", "tok/s"), ("speedup", "speed-up"), ("mean_accepted", "accept len"),
           ("tokens_per_iteration", "tok/iter"), ("mean_union_per_layer", "union/layer"),
           ("mean_kept_per_layer", "kept/layer"), ("expert_mb_per_token", "expert MB/tok"),
           ("match_rate", "match"), ("first_divergence_min", "1st diverg.")]


def _display_rows(result: dict) -> list[dict]:
    out = []
    for r in result["modes"]:
        b = r.get("expert_bytes_per_token")
        out.append(dict(r, expert_mb_per_token=None if b is None else b / 1e6))
    return out


def generate_table(result: dict) -> str:
    """The terminal table of the mode rows."""
    return report.terminal_table(_display_rows(result), COLUMNS)


def generate_markdown(result: dict) -> str:
    """The Markdown report of a `run_generate_bench` result."""
    meta, cfg = result["meta"], result["config"]
    extra = [f"target: {cfg.get('target')}; drafter: {cfg.get('drafter')}",
             f"{cfg['prompts']} prompts x {cfg['max_new_tokens']} new tokens, greedy; policy {cfg['policy']}; "
             f"timing: {meta['timing']}",
             "speed-up and agreement are relative to `ar` (autoregressive); union/kept: distinct experts per MoE "
             "layer per verification forward (per decode forward for `ar`); first divergence: earliest differing "
             "position over prompts (- = none)",
             "every mode runs the target patched by `moespec.patch` (routing statistics; budgets where asked), so "
             "all modes share one MoE implementation"]
    lines = [f"# moespec bench generate — {meta['device']}", ""] + report.meta_markdown(meta, extra) + [""]
    lines.append(report.markdown_table(_display_rows(result), COLUMNS))
    return "\n".join(lines) + "\n"


def plot_generate(result: dict, path: Path) -> Optional[Path]:
    """PNG: speed-up over autoregressive and expert MB per token, per mode (match rate annotated)."""
    plt = report.matplotlib_pyplot()
    rows = result["modes"]
    if plt is None or not rows:
        return None
    names = [r["mode"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.bar(names, [r.get("speedup") or 0 for r in rows], color="#4c72b0")
    a1.axhline(1.0, color="k", lw=0.8, ls="--")
    a1.set_ylabel("speed-up over autoregressive")
    a2.bar(names, [(r.get("expert_bytes_per_token") or 0) / 1e6 for r in rows], color="#dd8452")
    a2.set_ylabel("expert MB read per generated token")
    for i, r in enumerate(rows):
        if r.get("match_rate") is not None:
            a2.annotate(f"{100 * r['match_rate']:.0f}%", (i, (r.get("expert_bytes_per_token") or 0) / 1e6),
                        ha="center", va="bottom", fontsize=7)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        for lab in ax.get_xticklabels():
            lab.set_horizontalalignment("right")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"moespec bench generate — {result['config'].get('target')} — {result['meta']['device']} "
                 "(labels: token match vs autoregressive)", fontsize=9)
    return report.save_figure(fig, path)


def write_generate_outputs(result: dict, out_dir: Path, stem: str = "bench_generate", png: bool = True) -> dict:
    """Write ``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>.png``; returns their paths."""
    return report.write_outputs(result, out_dir, stem, generate_markdown, plot_generate, png)
