"""The one place where `moespec.speculative` talks to `moespec.integrations` (expert budgets + routing stats).

Contract assumed (integration side):
    moespec.integrations.patch(model, budget=None, policy=..., when=...) -> PatchHandle
    moespec.integrations.get_handle(model) -> PatchHandle | None
    moespec.integrations.expert_budget(model, budget, policy=..., candidates=..., coverage=...)  # context manager
    moespec.integrations.verification()  # marks verification forwards for "auto" patches
    PatchHandle.unpatch(); PatchHandle.stats.calls -> list[CallStats]
    CallStats.layers[i]: .layer .tokens .union_size .kept_size .kept_experts .expert_bytes .budget
"""
from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["BudgetSession", "integration_available", "num_experts", "is_budget_config"]


def is_budget_config(budget: Any) -> bool:
    """True for a `moespec.integrations.BudgetConfig` (a whole budget rule, not just a cap)."""
    integ = _integrations()
    return integ is not None and isinstance(budget, getattr(integ, "BudgetConfig", ()))


def _integrations():
    try:
        from moespec import integrations
    except Exception:  # not built yet, or transformers missing
        return None
    needed = ("patch", "get_handle", "expert_budget", "verification")
    return integrations if all(hasattr(integrations, n) for n in needed) else None


def integration_available() -> bool:
    """True when `moespec.integrations` provides patch / get_handle / expert_budget."""
    return _integrations() is not None


def num_experts(model) -> int | None:
    """Routed experts per MoE layer, read from the model config (None for a dense model)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _layer_dict(ls) -> dict:
    kept = getattr(ls, "kept_experts", None)
    if kept is not None and hasattr(kept, "tolist"):
        kept = kept.tolist()
    return {
        "layer": getattr(ls, "layer", None),
        "tokens": getattr(ls, "tokens", None),
        "union_size": getattr(ls, "union_size", None),
        "kept_size": getattr(ls, "kept_size", None),
        "kept_experts": list(kept) if kept is not None else None,
        "read_size": getattr(ls, "read_size", None),
        "expert_bytes": getattr(ls, "expert_bytes", None),
        "dropped_mass": getattr(ls, "dropped_mass", None),
        "budget": getattr(ls, "budget", None),
        "budgeted": bool(getattr(ls, "budgeted", False)),
    }


class BudgetSession:
    """Per-`generate` link to the integration: patches the target when needed, scopes budgets to
    verification forwards, and turns the integration's per-call stats into JSON-ready dicts.

    active=False (no integration, or nothing asked for) makes every method a no-op."""

    def __init__(self, model, policy: str = "substitute", need_budget: bool = False,
                 candidates: str | None = None, **patch_kwargs: Any):
        self.model = model
        self.policy = policy
        self.candidates = candidates
        self.handle = None
        self._owned = False
        integ = _integrations()
        if integ is None:
            if need_budget:
                raise RuntimeError(
                    "an expert budget needs moespec.integrations (patch / expert_budget), which is not importable"
                )
            return
        self._integ = integ
        self.handle = integ.get_handle(model)
        if self.handle is None and need_budget:
            # Patched unbudgeted: prefill and plain decode stay exact; budgets are scoped below.
            self.handle = integ.patch(model, budget=None, policy=policy, **patch_kwargs)
            self._owned = True

    @property
    def active(self) -> bool:
        return self.handle is not None

    def _mark(self) -> int:
        return len(self.handle.stats.calls) if self.active else 0

    @contextlib.contextmanager
    def forward(self, budget: Any, verification: bool = True):
        """Scope for one target forward and collect its routing stats.

        An explicit `budget` is applied to the call. With budget None, a verification call keeps
        the patch's own settings (a user may have patched with a default budget), while prefill
        and one-token decode (`verification=False`) are forced unbudgeted.
        Yields a dict filled on exit with {"layers": [...], "budgeted": bool, "expert_bytes": int}."""
        info: dict = {}
        if not self.active:
            yield info
            return
        start = self._mark()
        if budget is not None:
            ctx = self._integ.expert_budget(self.model, **self.budget_kwargs(budget))
        elif not verification:
            ctx = self._integ.expert_budget(self.model, None)
        else:
            # The patch's own settings; in "auto" mode they apply inside a verification scope.
            ctx = self._integ.verification()
        with ctx:
            yield info
        calls = self.handle.stats.calls[start:]
        info["layers"] = [_layer_dict(ls) for c in calls for ls in getattr(c, "layers", [])]
        info["budgeted"] = any(bool(getattr(c, "budgeted", False)) for c in calls)
        info["expert_bytes"] = sum(int(getattr(c, "expert_bytes", 0) or 0) for c in calls)

    def budget_kwargs(self, budget: Any) -> dict:
        """`expert_budget` arguments for ``budget``: a whole rule (a `BudgetConfig`: cap, policy, score,
        coverage, candidates) or a cap under the session's policy and candidate set."""
        if is_budget_config(budget):
            return {"budget": budget.budget, "policy": budget.policy, "score": budget.score,
                    "coverage": budget.coverage, "min_budget": budget.min_budget, "candidates": budget.candidates}
        return {"budget": budget, "policy": self.policy, "candidates": self.candidates}

    def close(self) -> None:
        """Undo our own patch (a user's patch is left alone)."""
        if self._owned and self.handle is not None:
            self.handle.unpatch()
        self.handle = None
        self._owned = False
