"""Train the shipped demo models: a small Qwen3-MoE target and a dense Qwen3 draft model.

    python -m moespec.models.train                # writes ./moespec_results/models (target/, draft/, training.json)
    python -m moespec.models.train --quick --out /tmp/m   # a seconds-long smoke run

The output never goes into the installed package unless ``--out`` names it: to refresh the shipped
weights, pass ``--out python/moespec/models/assets`` from a source checkout.

Corpus: the running interpreter's standard library sources (`moespec.models.corpus`), one file
in ten held out. Tokenizer: byte-level BPE trained with `tokenizers` on the training files.
Everything is seeded; the run writes ``training.json`` (command, hardware, wall time, losses,
held-out perplexities) next to the weights.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import corpus

ASSETS = Path(__file__).resolve().parent / "assets"
#: Default output folder, relative to the working directory (never the installed package).
DEFAULT_OUT = Path("moespec_results") / "models"
EOS = "<|endoftext|>"


@dataclass
class TrainConfig:
    vocab_size: int = 4096
    seq_len: int = 256
    batch: int = 16
    target_steps: int = 1500
    draft_steps: int = 1000
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    router_aux_loss_coef: float = 0.001  # light balancing: keep the realistic skew of a trained router
    eval_windows: int = 96
    seed: int = 0
    threads: int = 1  # one thread: on a shared 2-core machine OpenMP spin-waiting wastes the rest


#: The shipped targets: (experts, top-k, expert width, output folder, report file, experts implementation used
#: for training). "coarse" is the first target (32 experts, top-4); "fine" has Qwen3-30B-A3B's routing
#: granularity (128 experts, top-8, renormalised) with the same active expert width per token (8 x 64 = 4 x 128).
#: Training runs grouped_mm for "fine": at 128 experts the eager per-expert loop took 2x as long per step.
TARGETS = {
    "coarse": dict(num_experts=32, top_k=4, moe_intermediate_size=128, folder="target", report="training.json",
                   experts_implementation="eager"),
    "fine": dict(num_experts=128, top_k=8, moe_intermediate_size=64, folder="target_fine",
                 report="training_fine.json", experts_implementation="grouped_mm"),
}


def target_config(vocab_size: int, arch: str = "coarse"):
    """Qwen3-MoE, 4 layers, hidden size 128, renormalised top-k. ``arch``: ``"coarse"`` (32 experts top-4,
    about 7 M parameters) or ``"fine"`` (128 experts top-8, about 13 M parameters)."""
    from transformers import Qwen3MoeConfig

    t = TARGETS[arch]
    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, moe_intermediate_size=t["moe_intermediate_size"],
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=t["num_experts"], num_experts_per_tok=t["top_k"], norm_topk_prob=True, decoder_sparse_step=1,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, router_aux_loss_coef=0.001,
    )


def draft_config(vocab_size: int):
    """Dense Qwen3, 2 layers (about 0.9 M parameters), same tokenizer as the target."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def train_tokenizer(files: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((corpus.read_text(f) for f in files), trainer=trainer)
    return tok


def encode(tok, files: list[Path]) -> torch.Tensor:
    """One int32 stream: every file's tokens followed by EOS."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch([corpus.read_text(f) for f in files]):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def _batches(data: torch.Tensor, cfg: TrainConfig, gen: torch.Generator):
    n = data.numel() - cfg.seq_len - 1
    while True:
        starts = torch.randint(0, n, (cfg.batch,), generator=gen)
        yield torch.stack([data[s:s + cfg.seq_len] for s in starts.tolist()]).long()


def train_lm(model, data: torch.Tensor, steps: int, cfg: TrainConfig, name: str, log=print) -> list[dict]:
    """AdamW with linear warm-up and cosine decay to 10 %; returns the loss history."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    history, t0, it = [], time.time(), _batches(data, cfg, gen)
    is_moe = hasattr(model.config, "num_experts")
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = next(it)
        out = model(input_ids=x, labels=x, output_router_logits=is_moe) if is_moe else model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            rec = {"step": step, "loss": round(float(out.loss.detach()), 4), "lr": lr_at(step),
                   "elapsed_s": round(time.time() - t0, 1)}
            if is_moe and getattr(out, "aux_loss", None) is not None:
                rec["aux_loss"] = round(float(out.aux_loss.detach()), 4)
            history.append(rec)
            log(f"[{name}] " + " ".join(f"{k}={v}" for k, v in rec.items()))
    model.eval()
    return history


@torch.no_grad()
def perplexity(model, data: torch.Tensor, seq_len: int, windows: int) -> float:
    """Mean next-token perplexity over the first ``windows`` non-overlapping windows of ``data``."""
    model.eval()
    total, count = 0.0, 0
    n = min(windows, (data.numel() - 1) // seq_len)
    for w in range(n):
        x = data[w * seq_len:(w + 1) * seq_len + 1].long().unsqueeze(0)
        logits = model(input_ids=x[:, :-1]).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum"))
        count += seq_len
    return math.exp(total / count)


def save(model, tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=2048)
    fast.save_pretrained(out)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m moespec.models.train`` argument parser."""
    p = argparse.ArgumentParser(prog="python -m moespec.models.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output folder (default ./{DEFAULT_OUT}; created if missing, existing target/, draft/ and "
                        "training.json in it are overwritten; load the result with "
                        "moespec.models.load_target(root=...) or `python -m moespec.models.evaluate --models OUT`)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (a few steps, a few files)")
    p.add_argument("--arch", choices=sorted(TARGETS), default="coarse",
                   help="which target to train: coarse (32 experts top-4, written to target/ with training.json) or "
                        "fine (128 experts top-8, written to target_fine/ with training_fine.json)")
    p.add_argument("--no-draft", action="store_true",
                   help="train the target only (the draft depends only on the corpus, tokenizer and seed, which "
                        "every target shares, so one draft serves both targets)")
    for f, v in asdict(TrainConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=None)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for f in asdict(TrainConfig()):
        val = getattr(args, f)
        if val is None:
            continue
        zero_ok = f in ("warmup", "seed", "weight_decay", "router_aux_loss_coef")
        if not math.isfinite(val) or (val < 0 if zero_ok else val <= 0):
            p.error(f"--{f.replace('_', '-')} must be {'>= 0' if zero_ok else '> 0'}, got {val}")
    from ..cli import prepare_output_dir

    try:  # before any training: a file in the way, or an unwritable folder, fails now
        prepare_output_dir(args.out)
        for sub in (TARGETS[args.arch]["folder"], "draft"):
            if (args.out / sub).exists() and not (args.out / sub).is_dir():
                raise ValueError(f"--out {args.out}: {args.out / sub} is a file, but the {sub} model folder goes there")
    except ValueError as exc:
        p.error(str(exc))
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig()) if getattr(args, f) is not None})
    if args.quick:
        cfg.target_steps, cfg.draft_steps, cfg.eval_windows, cfg.batch, cfg.seq_len = 3, 3, 2, 2, 64
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    t_start = time.time()
    train_files, test_files = corpus.split_corpus()
    if args.quick:
        train_files, test_files = train_files[:20], test_files[:5]
    tok = train_tokenizer(train_files, cfg.vocab_size)
    train_ids, test_ids = encode(tok, train_files), encode(tok, test_files)
    print(f"corpus: {len(train_files)} train files ({train_ids.numel()} tokens), "
          f"{len(test_files)} held-out files ({test_ids.numel()} tokens)")

    report = {"command": "python -m moespec.models.train " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "hardware": {"machine": platform.machine(), "processor": platform.processor() or "unknown",
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "device": "cpu"},
              "software": {"python": platform.python_version(), "torch": torch.__version__},
              "config": asdict(cfg),
              "corpus": {"root": "<python stdlib>", "python": platform.python_version(),
                         "train_files": len(train_files), "heldout_files": len(test_files),
                         "train_tokens": int(train_ids.numel()), "heldout_tokens": int(test_ids.numel())}}

    arch = TARGETS[args.arch]
    report["arch"] = args.arch
    report["target_experts_implementation"] = arch["experts_implementation"]
    results = {}
    jobs = [("target", lambda: Qwen3MoeForCausalLM(target_config(cfg.vocab_size, args.arch)), cfg.target_steps)]
    if not args.no_draft:
        jobs.append(("draft", lambda: Qwen3ForCausalLM(draft_config(cfg.vocab_size)), cfg.draft_steps))
    for name, make, steps in jobs:
        torch.manual_seed(cfg.seed)
        model = make()
        if name == "target":
            model.config.router_aux_loss_coef = cfg.router_aux_loss_coef
            model.set_experts_implementation(arch["experts_implementation"])  # the faster one on the CPU here
        ppl_init = perplexity(model, test_ids, cfg.seq_len, cfg.eval_windows)
        t0 = time.time()
        history = train_lm(model, train_ids, steps, cfg, name)
        train_s = time.time() - t0
        folder = args.out / (arch["folder"] if name == "target" else name)
        if name == "target":
            model.set_experts_implementation("eager")  # the saved config must not carry the training choice
        save(model, tok, folder)
        shipped = (Qwen3MoeForCausalLM if name == "target" else Qwen3ForCausalLM).from_pretrained(
            folder, dtype=torch.float32, local_files_only=True)
        results[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "steps": steps, "train_tokens_seen": steps * cfg.batch * cfg.seq_len, "train_seconds": round(train_s, 1),
            "heldout_ppl_random_init": round(ppl_init, 2),
            "heldout_ppl": round(perplexity(shipped, test_ids, cfg.seq_len, cfg.eval_windows), 3),
            "history": history,
        }
        print(f"{name}: held-out perplexity {results[name]['heldout_ppl']} (random init {ppl_init:.0f}), "
              f"{train_s:.0f} s")
    report["models"] = results
    report["total_seconds"] = round(time.time() - t_start, 1)
    (args.out / arch["report"]).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} in {report['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
