"""The small trained models shipped with moespec (for demos, tests and quality evaluation).

- target ``"coarse"`` (the default): a Qwen3-MoE model (4 layers, 32 experts, top-4, about 7 M parameters);
- target ``"fine"``: the same architecture with Qwen3-30B-A3B's routing granularity (128 experts,
  top-8, renormalised; about 13 M parameters), the same active expert width per token;
- draft: a dense Qwen3 model (2 layers, about 0.9 M parameters) with the same tokenizer. It depends
  only on the corpus, tokenizer and seed, which both targets share, so it serves both.

All were trained on the Python standard library sources by `python -m moespec.models.train`
(``--arch fine`` for the fine-grained target; see ``assets/training.json`` and
``assets/training_fine.json`` for the exact commands, hardware, times and held-out perplexities)
and ship as bf16 safetensors that load offline with ``from_pretrained``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
TARGET_PATH = ASSETS / "target"
DRAFT_PATH = ASSETS / "draft"
#: Shipped targets by name -> (folder under the assets, training report).
TARGETS = {"coarse": ("target", "training.json"), "fine": ("target_fine", "training_fine.json")}
FINE_TARGET_PATH = ASSETS / TARGETS["fine"][0]


def _target_folder(name: str) -> str:
    if name not in TARGETS:
        raise ValueError(f"unknown shipped target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name][0]


def _check(path: Path) -> Path:
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"moespec demo model missing at {path}; reinstall moespec or run "
                                f"`python -m moespec.models.train`")
    return path


def load_target(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", root: Path | None = None,
                name: str = "coarse"):
    """A shipped Qwen3-MoE target as a ``Qwen3MoeForCausalLM`` (eval mode): ``name`` ``"coarse"``
    (32 experts top-4) or ``"fine"`` (128 experts top-8); ``root`` overrides the assets folder (e.g.
    the output of a fresh training run)."""
    from transformers import AutoModelForCausalLM

    path = (ASSETS if root is None else Path(root)) / _target_folder(name)
    m = AutoModelForCausalLM.from_pretrained(_check(path), dtype=dtype, local_files_only=True)
    return m.to(device).eval()


def load_draft(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", root: Path | None = None):
    """The shipped dense Qwen3 draft model (eval mode)."""
    from transformers import AutoModelForCausalLM

    path = DRAFT_PATH if root is None else Path(root) / "draft"
    m = AutoModelForCausalLM.from_pretrained(_check(path), dtype=dtype, local_files_only=True)
    return m.to(device).eval()


def load_tokenizer(root: Path | None = None):
    """The shared byte-level BPE tokenizer (``PreTrainedTokenizerFast``)."""
    from transformers import AutoTokenizer

    path = TARGET_PATH if root is None else Path(root) / "target"
    return AutoTokenizer.from_pretrained(_check(path), local_files_only=True)


def training_report(root: Path | None = None, name: str = "coarse") -> dict:
    """The training report (``training.json``, ``training_fine.json``) of the run that produced a
    shipped target (and, for ``"coarse"``, the draft)."""
    _target_folder(name)
    return json.loads(((ASSETS if root is None else Path(root)) / TARGETS[name][1]).read_text())
