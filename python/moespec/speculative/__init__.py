"""Speculative decoding for MoE targets (docs/design.md §4).

- `generate(model, input_ids, drafter=..., draft=..., budget=..., controller=...)` -> (tokens, stats)
- draft shapes: `DraftConfig.chain(K)`, `DraftConfig.tree(depth, branching, nodes)`
- drafters: the `Drafter` protocol, `DraftModelDrafter(small_model)`, `PromptLookupDrafter(...)`;
  `check_drafter_vocab(target, draft_model, ...)`: the token-id compatibility rule `generate` applies
- controllers: `StaticController`, `CascadeController` (utility-driven K, optionally K and budget C);
  `CascadeState`: what Cascade learned, kept across calls (``generate(..., cascade_state=...)``), saved as JSON
- verification pieces: `DraftTree`, `tree_forward`, `accept_greedy`, `accept_sampling`, `compact_cache`
"""
from __future__ import annotations

from .cascade import CascadeController, Decision, StaticController, make_controller
from .cascade_state import CascadeState, default_cascade_state, set_default_cascade_state
from .drafters import DraftModelDrafter, Drafter, PromptLookupDrafter, check_drafter_vocab, vocab_sizes
from .engine import default_budget_choices, generate
from .stats import IterationStats, SpecStats
from .tree import DraftConfig, DraftTree
from .verify import Acceptance, accept_greedy, accept_sampling, compact_cache, tree_forward

__all__ = [
    "generate",
    "DraftConfig",
    "DraftTree",
    "Drafter",
    "DraftModelDrafter",
    "PromptLookupDrafter",
    "check_drafter_vocab",
    "vocab_sizes",
    "StaticController",
    "CascadeController",
    "Decision",
    "make_controller",
    "CascadeState",
    "default_cascade_state",
    "set_default_cascade_state",
    "default_budget_choices",
    "SpecStats",
    "IterationStats",
    "Acceptance",
    "accept_greedy",
    "accept_sampling",
    "compact_cache",
    "tree_forward",
]
