"""Tiny random transformers MoE models, built offline, for tests, demos and quick benchmarks.

Every supported architecture at a few kilobytes: hidden 64, 2 decoder layers, vocabulary 128.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["TINY_ARCHITECTURES", "tiny_config", "tiny_model"]

TINY_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(arch: str, **overrides):
    """A tiny config of ``arch`` (one of `TINY_ARCHITECTURES`); ``overrides`` replace fields."""
    import transformers as tf

    if arch == "mixtral":
        cls, kw = tf.MixtralConfig, dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    elif arch == "qwen2_moe":
        cls, kw = tf.Qwen2MoeConfig, dict(intermediate_size=64, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2)
    elif arch == "qwen3_moe":
        # norm_topk_prob=True as in the released Qwen3-MoE checkpoints.
        cls, kw = tf.Qwen3MoeConfig, dict(head_dim=16, intermediate_size=64, moe_intermediate_size=32,
                                          num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)
    elif arch == "olmoe":
        # The default eos id (50279) is outside a tiny vocabulary.
        cls, kw = tf.OlmoeConfig, dict(intermediate_size=32, num_experts=16, num_experts_per_tok=4, eos_token_id=None)
    elif arch == "deepseek_v3":
        cls, kw = tf.DeepseekV3Config, dict(
            intermediate_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
            topk_group=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_hidden_layers=3,
            num_key_value_heads=4)  # MLA has no grouped KV heads; 2 breaks cached attention
    elif arch == "gpt_oss":
        cls, kw = tf.GptOssConfig, dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                                        sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHITECTURES}")
    return cls(**{**_COMMON, **kw, **overrides})


def tiny_model(arch: str, seed: int = 0, router_std: Optional[float] = 0.5, dtype: torch.dtype = torch.float32,
               **overrides) -> torch.nn.Module:
    """A tiny ``*ForCausalLM`` of ``arch`` with random weights, in eval mode.

    Args:
        seed: RNG seed for the weights.
        router_std: re-draw router weights (and biases) with this std so routing is peaked
            like a trained model's, rather than near-uniform; None keeps transformers' init.
        dtype: parameter dtype.
    """
    import transformers as tf

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    if router_std is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("mlp.gate.weight", "mlp.router.weight", "mlp.router.bias")):
                    p.copy_(torch.randn(p.shape, generator=gen) * router_std)
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model.to(dtype).eval()
