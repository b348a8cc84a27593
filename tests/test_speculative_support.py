"""Shared helpers for the moespec.speculative tests: tiny offline models, a greedy oracle, chi-square.

(Named test_speculative_* so it lives with the spec tests; it defines no tests itself.)
Submodules are imported directly (moespec.speculative.engine, ...) so these tests also run against an
editable install whose file map predates moespec/speculative/__init__.py.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moespec.speculative.cascade import CascadeController  # noqa: E402,F401
from moespec.speculative.drafters import DraftModelDrafter, PromptLookupDrafter  # noqa: E402,F401
from moespec.speculative.engine import generate  # noqa: E402,F401
from moespec.speculative.tree import DraftConfig, DraftTree  # noqa: E402,F401

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, head_dim=16)


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest (and least disturbed by a shared machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def spec_single_thread():
    """Autouse in every spec test module that imports it: one thread for the whole test."""
    with one_thread():
        yield


def _sharpen(model, scale: float):
    # Random-init logits are nearly flat; scaling the LM head makes greedy paths (and deep
    # draft trees) dominant, like a trained model's.
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def tiny_moe(vocab: int = 128, seed: int = 0, dtype=torch.float64, sharp: float = 1.0, experts: int = 16,
             top_k: int = 4, layers: int = 2):
    """A tiny Qwen3-MoE target (default 2 layers, 16 experts, top-4, renormalised), eager experts."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=vocab, intermediate_size=64, moe_intermediate_size=32, num_experts=experts,
                         num_experts_per_tok=top_k, norm_topk_prob=True, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, **{**COMMON, "num_hidden_layers": layers})
    model = Qwen3MoeForCausalLM(cfg).to(dtype).eval()
    model.set_experts_implementation("eager")  # grouped_mm has no fp64 kernel
    return _sharpen(model, sharp)


def tiny_mixtral(vocab: int = 128, seed: int = 0, dtype=torch.float64, sharp: float = 1.0):
    """A 2-layer Mixtral target (8 experts, top-2), eager experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=vocab, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None, sliding_window=None, **COMMON)
    model = MixtralForCausalLM(cfg).to(dtype).eval()
    model.set_experts_implementation("eager")
    return _sharpen(model, sharp)


def tiny_dense(vocab: int = 128, seed: int = 1, dtype=torch.float64, sharp: float = 1.0):
    """A 2-layer dense Qwen3 drafter with the same vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, intermediate_size=64, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, **COMMON)
    return _sharpen(Qwen3ForCausalLM(cfg).to(dtype).eval(), sharp)


def perturbed_copy(model, noise: float, seed: int = 7):
    """A drafter that agrees with the target often but not always (partial acceptance)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * noise * p.std())
    return m


@torch.no_grad()
def greedy_reference(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' own greedy decoding: the oracle for the lossless check."""
    # An explicit all-ones mask: with a pad id set, generate() would mask prompt tokens equal to it.
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None)


def chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square p-value, pooling cells with expected count < 5 into one."""
    observed = observed.double().flatten()
    n = observed.sum()
    exp = expected_probs.double().flatten() * n
    small = exp < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
        exp = torch.cat([exp[~small], exp[small].sum().view(1)])
        if exp[-1] == 0:
            observed, exp = observed[:-1], exp[:-1]
    stat = ((observed - exp) ** 2 / exp).sum()
    df = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))
