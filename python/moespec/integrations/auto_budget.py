"""``budget="auto"``: the budget rule chosen by measurement (docs/budget-rules.md).

The rule is data, not code: `AUTO_RULE` is what `moespec bench quality` recommended on the shipped
demo models (bench/results/cpu/budget_sweep.md): the cheapest rule (fewest expert bytes per emitted
token) that kept acceptance within 2 % of unbudgeted and greedy agreement with the unbudgeted
output at >= 95 %, on a chain and on a tree draft. A fixed cap is stored relative to the model's
top-k so that it carries over to other models; re-run the sweep on your own model to check it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .config import BudgetConfig

__all__ = ["AutoRule", "AUTO_RULE", "auto_budget", "auto_config"]


@dataclass(frozen=True)
class AutoRule:
    """A budget rule in model-independent form.

    Attributes:
        cap_per_k: the cap as a multiple of the layer's top-k (C = ceil(cap_per_k * k)); None: no cap.
        coverage: coverage target tau (None: a fixed cap).
        policy: ``"substitute"`` or ``"truncate"``.
        candidates: ``"all"`` or ``"union"``.
        measured_on: where the rule was chosen (for the documentation and `moespec info`).
    """

    cap_per_k: Optional[float]
    coverage: Optional[float]
    policy: str
    candidates: str
    measured_on: str

    def caps(self, top_ks: Sequence[int]) -> list[Optional[int]]:
        """One cap per MoE layer."""
        if self.cap_per_k is None:
            return [None] * len(top_ks)
        return [max(int(k), math.ceil(self.cap_per_k * int(k) - 1e-9)) for k in top_ks]

    def describe(self) -> str:
        parts = []
        if self.cap_per_k is not None:
            parts.append(f"C = {self.cap_per_k:g} x top-k")
        if self.coverage is not None:
            parts.append(f"coverage {self.coverage:g}")
        return f"{', '.join(parts)}, {self.policy}, candidates {self.candidates}"


# Chosen by `moespec bench quality` on both shipped targets (bench/results/cpu/budget_sweep.md and
# budget_sweep_fine.md): no rule that saved expert bytes kept greedy agreement >= 95 % on the chain and the
# tree of both models. Coverage 0.99 over the union failed the fine model's 16-node tree (agreement 0.67);
# coverage 0.99 over all experts passed all four: it never bound there, and on a model with peakier routing
# it trims only experts that together hold < 1 % of the score mass.
AUTO_RULE = AutoRule(cap_per_k=None, coverage=0.99, policy="substitute", candidates="all",
                     measured_on="shipped demo models (E=32 top-4 and E=128 top-8, 4 MoE layers each), CPU, "
                                 "chain K=8 and 16-node tree")


def auto_config(top_ks: Sequence[int], backend: str = "auto", rule: AutoRule = AUTO_RULE) -> BudgetConfig:
    """The `BudgetConfig` of ``rule`` for MoE layers with the given top-k (one per layer)."""
    caps = rule.caps(top_ks)
    budget = caps[0] if len(set(caps)) <= 1 and caps else list(caps)
    return BudgetConfig(budget, rule.policy, "prob", rule.coverage, None, backend, rule.candidates)


def auto_budget(model, rule: AutoRule = AUTO_RULE) -> BudgetConfig:
    """The measured default rule as a `BudgetConfig` for ``model`` (a transformers MoE model).

    Raises:
        ValueError: the model's config names no top-k (not a supported MoE model).
    """
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    k = getattr(cfg, "num_experts_per_tok", None)
    if not isinstance(k, int) or k < 1:
        raise ValueError("budget='auto' needs an MoE model whose config has num_experts_per_tok")
    layers = _moe_top_ks(model) or [k]
    return auto_config(layers, rule=rule)


def _moe_top_ks(model) -> list[int]:
    """Top-k of each supported MoE block, in order (empty when there is none)."""
    from .architectures import find_moe_blocks

    return [spec.router_spec(getattr(block, spec.router_attr)).top_k for _, block, spec in find_moe_blocks(model)]
