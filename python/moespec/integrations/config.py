"""Budget settings of a patched model: one small config object instead of flags per call.

`BudgetConfig` is what the user writes (a budget that may be per layer); `resolve` checks it
against the model's MoE layers and gives a `LayerBudgets`, one cap per MoE layer. Both carry the
``backend`` the moespec ops of budgeted calls run on (`BACKENDS`; fixed for the life of a patch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from .. import ops


def _scalar(b) -> bool:
    """One cap for every layer: an int, a NumPy integer or a 0-d tensor (validated by the ops)."""
    import torch

    if isinstance(b, torch.Tensor):
        return b.dim() == 0
    return isinstance(b, int) or (hasattr(b, "__index__") and not isinstance(b, (list, tuple)))

__all__ = ["BudgetConfig", "LayerBudgets", "BudgetSpec", "WHEN_MODES", "BACKENDS"]

# int for all layers, one entry per MoE layer, or a function of the MoE layer ordinal.
BudgetSpec = Union[None, int, str, Sequence[Optional[int]], Callable[[int], Optional[int]]]

WHEN_MODES = ("auto", "always")

# The `moespec.ops` backends a patch can run its budgeted calls on (see `moespec.ops`).
BACKENDS: tuple[str, ...] = tuple(ops._BACKENDS)


@dataclass(frozen=True)
class LayerBudgets:
    """Validated budget settings for every MoE layer of one model.

    Attributes:
        caps: per MoE layer, the maximum number of experts kept (None: no cap).
        policy: ``"substitute"`` or ``"truncate"`` (docs/design.md §3).
        score: ``"prob"`` or ``"topk"``.
        coverage: adaptive budget share in ``(0, 1]`` (None: fixed caps).
        min_budget: lower clamp of the adaptive budget (None: the layer's top_k).
        backend: the `moespec.ops` backend of budgeted calls' routing and experts ops.
        candidates: ``"all"`` or ``"union"``, resolved (docs/design.md §3).
    """

    caps: tuple[Optional[int], ...]
    policy: str = "substitute"
    score: str = "prob"
    coverage: Optional[float] = None
    min_budget: Optional[int] = None
    backend: str = "auto"
    candidates: str = "union"

    def cap(self, layer: int) -> Optional[int]:
        """The cap of MoE layer ``layer``."""
        return self.caps[layer]

    def applies(self, layer: int) -> bool:
        """True when layer ``layer`` is budgeted at all (a cap or a coverage target)."""
        return self.caps[layer] is not None or self.coverage is not None

    @property
    def active(self) -> bool:
        """True when at least one layer is budgeted."""
        return any(self.applies(i) for i in range(len(self.caps)))


@dataclass(frozen=True)
class BudgetConfig:
    """User-facing budget settings (see `moespec.patch`).

    Attributes:
        budget: None, an int for every MoE layer, a list with one int-or-None per MoE layer,
            a callable ``f(layer_ordinal) -> int | None``, or ``"auto"``: the rule chosen by
            measurement (`moespec.integrations.auto_budget.AUTO_RULE`), which then sets the
            cap, coverage, policy and candidates (the other fields except ``backend`` are ignored).
        policy, score, coverage, min_budget: as in `moespec.ops.budget_routing`.
        backend: where budgeted calls run moespec's ops (one of `BACKENDS`): ``"auto"`` (the
            kernels on CUDA tensors, the reference elsewhere), ``"reference"``, ``"cuda"`` or
            ``"emu"`` (the kernels on the CPU emulator of an emulation build). `resolve` checks
            the name; `moespec.patch` checks that it can run where the model is.
        candidates: the experts a kept set is chosen from: ``"all"``, ``"union"``, or None for
            the policy's default (`moespec.ops.validate_candidates`).
    """

    budget: BudgetSpec = None
    policy: str = "substitute"
    score: str = "prob"
    coverage: Optional[float] = None
    min_budget: Optional[int] = None
    backend: str = "auto"
    candidates: Optional[str] = None

    def resolve(self, top_ks: Sequence[int]) -> LayerBudgets:
        """Validate against MoE layers with the given top-k and return per-layer caps.

        Raises:
            ValueError: a malformed budget (wrong list length, non-int entries, below top-k),
                an unknown policy, score mode, candidate set or backend, or a coverage outside
                ``(0, 1]``.
        """
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"moespec: backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.budget, str):
            if self.budget != "auto":
                raise ValueError(f"moespec: budget must be None, an int, a per-layer list, a callable or 'auto', "
                                 f"got {self.budget!r}")
            # The whole measured rule (cap, coverage, policy, candidates) replaces these settings.
            from .auto_budget import auto_config

            return auto_config(top_ks, self.backend).resolve(top_ks)
        n = len(top_ks)
        caps = []
        for i, (cap, k) in enumerate(zip(self._caps(n), top_ks)):
            try:
                # Integer-like caps (numpy ints, 0-d integer tensors) come back as Python ints.
                caps.append(ops.validate_budget(cap, k, self.policy, self.score, self.coverage, self.min_budget)[0])
            except ValueError as err:
                where = f"MoE layer {i}: " if n > 1 and not _scalar(self.budget) else ""
                raise ValueError(f"moespec: invalid budget settings: {where}{err}") from None
        caps = tuple(caps)
        try:
            candidates = ops.validate_candidates(self.candidates, self.policy)
        except ValueError as err:
            raise ValueError(f"moespec: invalid budget settings: {err}") from None
        return LayerBudgets(caps, self.policy, self.score,
                            None if self.coverage is None else float(self.coverage), self.min_budget, self.backend,
                            candidates)

    def _caps(self, n: int) -> tuple[Optional[int], ...]:
        b = self.budget
        if b is None or _scalar(b):
            # bool is an int subclass; validate_budget rejects it with a clear message.
            return (b,) * n
        if callable(b):
            caps = []
            for i in range(n):
                try:
                    caps.append(b(i))
                except Exception as err:  # surface the layer that failed, keep the cause
                    raise ValueError(f"moespec: budget callable failed for MoE layer {i}: {err!r}") from err
            return tuple(caps)
        if isinstance(b, (list, tuple)):
            if len(b) != n:
                raise ValueError(
                    f"moespec: a per-layer budget needs one entry per MoE layer: got {len(b)} entries "
                    f"for {n} MoE layers")
            return tuple(b)
        raise ValueError(
            "moespec: budget must be None, an int, a list/tuple with one int-or-None per MoE layer, "
            f"or a callable(layer_ordinal) -> int | None; got {type(b).__name__}")
