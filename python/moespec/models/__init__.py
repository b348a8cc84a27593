"""The small trained models shipped with moespec (for demos, tests and quality evaluation).

- target: a Qwen3-MoE model (4 layers, 32 experts, top-4, about 7 M parameters);
- draft: a dense Qwen3 model (2 layers, about 0.9 M parameters) with the same tokenizer.

Both were trained on the Python standard library sources by `python -m moespec.models.train`
(see ``assets/training.json`` for the exact command, hardware, time and held-out perplexities)
and ship as bf16 safetensors that load offline with ``from_pretrained``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
TARGET_PATH = ASSETS / "target"
DRAFT_PATH = ASSETS / "draft"


def _check(path: Path) -> Path:
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"moespec demo model missing at {path}; reinstall moespec or run "
                                f"`python -m moespec.models.train`")
    return path


def load_target(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", root: Path | None = None):
    """The shipped Qwen3-MoE target as a ``Qwen3MoeForCausalLM`` (eval mode); ``root`` overrides
    the assets folder (e.g. the output of a fresh training run)."""
    from transformers import AutoModelForCausalLM

    path = TARGET_PATH if root is None else Path(root) / "target"
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


def training_report(root: Path | None = None) -> dict:
    """The ``training.json`` written by the run that produced the shipped weights."""
    return json.loads(((ASSETS if root is None else Path(root)) / "training.json").read_text())
