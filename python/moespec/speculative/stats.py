"""JSON-serialisable statistics of a speculative `generate` call."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["IterationStats", "SpecStats", "jsonable"]


def jsonable(value: Any) -> Any:
    """`value` if JSON can hold it (budgets are None, ints or lists), a dict for a dataclass (a budget
    rule), else its repr (callables)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)


@dataclass
class IterationStats:
    """One draft + verify iteration."""

    index: int
    k: int  # draft size the controller asked for (0 = plain decode)
    budget: Any  # expert budget applied to the verification forward (None = unbudgeted)
    phase: str  # controller phase: static / baseline / test / set
    draft_size: int  # nodes actually drafted
    draft_depth: int
    accepted: int  # draft tokens accepted
    emitted: int  # tokens appended to the output (accepted + bonus, after truncation)
    draft_time_s: float
    verify_time_s: float
    iter_time_s: float  # wall time of the whole iteration (drafting included)
    cost: float | None = None  # time fed to the controller when a cost model replaces the clock
    expert_bytes: int | None = None  # expert weight bytes read by the verification forward
    layers: list | None = None  # per MoE layer: union_size, kept_size, kept_experts, expert_bytes, budget


@dataclass
class SpecStats:
    """Everything `generate` measured. `to_dict()` / `to_json()` export it."""

    config: dict = field(default_factory=dict)
    prefill: dict = field(default_factory=dict)
    iterations: list[IterationStats] = field(default_factory=list)
    controller: dict = field(default_factory=dict)
    new_tokens: int = 0
    wall_time_s: float = 0.0

    @property
    def mean_accepted(self) -> float:
        it = [r for r in self.iterations if r.draft_size > 0]
        return sum(r.accepted for r in it) / len(it) if it else 0.0

    @property
    def tokens_per_iteration(self) -> float:
        return self.new_tokens / len(self.iterations) if self.iterations else 0.0

    def summary(self) -> dict:
        its = self.iterations
        return {
            "iterations": len(its),
            "new_tokens": self.new_tokens,
            "mean_accepted": self.mean_accepted,
            "tokens_per_iteration": self.tokens_per_iteration,
            "draft_time_s": sum(r.draft_time_s for r in its),
            "verify_time_s": sum(r.verify_time_s for r in its),
            "wall_time_s": self.wall_time_s,
            "expert_bytes": sum(r.expert_bytes or 0 for r in its),
        }

    def to_dict(self) -> dict:
        return jsonable({
            "config": self.config,
            "summary": self.summary(),
            "prefill": self.prefill,
            "controller": self.controller,
            "iterations": [asdict(r) for r in self.iterations],
        })

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)
