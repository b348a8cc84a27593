"""moespec: budgeted Mixture-of-Experts kernels and utility-driven speculative decoding.

- `moespec.ops`: the public op API (validated; CUDA kernels where available, else the reference).
- `moespec.reference`: the exact PyTorch semantics of every op.
- `moespec.ExpertLayout`: how expert weights are laid out (transformers v5, up-first, gpt-oss).
"""
from __future__ import annotations

from . import ops, reference
from .types import BudgetedRouting, ExpertLayout, ExpertUnion

__version__ = "0.1.0"

__all__ = ["ops", "reference", "ExpertLayout", "ExpertUnion", "BudgetedRouting", "__version__"]

# Heavier entry points (transformers, the speculative engine) load on first use, so that
# `import moespec` stays cheap and works without transformers installed.
_LAZY = {
    "patch": "moespec.integrations",
    "expert_budget": "moespec.integrations",
    "verification": "moespec.integrations",
    "get_handle": "moespec.integrations",
    "integrations": "moespec.integrations",
    "speculative": "moespec.speculative",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith("." + name) else getattr(module, name)
    raise AttributeError(f"module 'moespec' has no attribute {name!r}")
