"""Drop-in budgeted MoE for Hugging Face transformers (v5) models.

    handle = moespec.patch(model, budget=16)          # auto: budget verification-shaped calls only
    with moespec.expert_budget(model, 8, policy="truncate"):
        model(input_ids, cache=cache)                 # explicit budget for every call inside
    with moespec.verification():                      # "auto" patches budget calls inside
        model(draft_ids, cache=cache)
    handle.stats.last().expert_bytes
    handle.unpatch()

Modules: `patching` (patch/unpatch, call scope), `architectures` (the supported transformers
blocks), `routing` (per-router budget rules), `experts` (the ``"moespec"`` experts
implementation), `config` (budget settings), `auto_budget` (the measured ``budget="auto"`` rule), `stats` (routing statistics), `tiny` (tiny random
models), `calls` (call-shape detection), `hf_compat` (argument names that differ between
transformers versions).
"""
from __future__ import annotations

from .architectures import SUPPORTED_BLOCKS, supported_architectures
from .auto_budget import AUTO_RULE, auto_budget
from .config import BudgetConfig, LayerBudgets
from .patching import (MoELayerInfo, PatchHandle, UnsupportedModelError, expert_budget, get_handle, patch,
                       verification)
from .stats import CallStats, LayerStats, RoutingStats

__all__ = [
    "patch",
    "expert_budget",
    "verification",
    "get_handle",
    "PatchHandle",
    "MoELayerInfo",
    "UnsupportedModelError",
    "BudgetConfig",
    "auto_budget",
    "AUTO_RULE",
    "LayerBudgets",
    "RoutingStats",
    "CallStats",
    "LayerStats",
    "SUPPORTED_BLOCKS",
    "supported_architectures",
]
