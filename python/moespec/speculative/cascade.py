"""Speculation-length controllers: `StaticController` and Cascade (`CascadeController`).

Cascade (docs/design.md §4) measures, per request, the utility of speculating with K draft tokens,

    U(K) = ETR(K) / (t_iter(K) / t_iter(0)),   ETR = mean(accepted + 1) per iteration,

where t_iter is the wall time (or the cost model's time) of a whole iteration, drafting included.
It alternates a *test* phase (up to `max_trials` trials of `trial_iters` iterations, hill-climbing
from the best K seen so far) and a *set* phase (`set_iters` iterations at the best K). Speculation
is switched off (K=0, whose utility is 1 by definition) when no tested K beats 1; each consecutive
K=0 decision doubles the set phase (16, 32, 64, ...), but testing never stops. t_iter(0) is
re-measured by a short K=0 baseline trial when none was seen for `refresh_every` iterations.

Hill-climb details (where docs/design.md leaves room): from a winning point (U > 1) step K by +-`step`,
keeping the direction that paid off and turning back once after a worse trial; from a losing
point (U <= 1) halve K, so a too-long draft reaches the useful range (or K=0) in few trials; while
speculation is off, a test phase whose first trial still loses ends there (one cheap probe).

In joint mode (`budgets` with more than one entry) a point is (K, budget index) and the same
hill-climb also moves along the budget axis, so Cascade picks the expert budget C with K.
The controller never reads a clock itself: the engine feeds it times, so tests are deterministic.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Decision", "StaticController", "CascadeController", "make_controller"]


@dataclass(frozen=True)
class Decision:
    """What to run next: draft size `k` (0 = no speculation) and the budget (None = unbudgeted)."""

    k: int
    budget: Any = None
    phase: str = "static"


class StaticController:
    """Always the same K and budget."""

    def __init__(self, k: int, budget: Any = None):
        self.k, self.budget = int(k), budget
        self.decisions: list[dict] = []

    def next(self) -> Decision:
        return Decision(self.k, self.budget if self.k > 0 else None, "static")

    def observe(self, accepted: int, t_iter: float) -> None:
        pass

    def to_dict(self) -> dict:
        return {"kind": "static", "k": self.k, "budget": self.budget}


@dataclass
class _Trial:
    point: tuple[int, int]
    kind: str  # "baseline" or "test"
    accepted: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


class CascadeController:
    """Utility-driven choice of K (and optionally the budget), per request.

    k_max:          largest draft size it may pick; k_init the first one tested (default k_max).
    budgets:        candidate budgets, loosest first (e.g. [None, 64, 32]); one entry = K only.
    trial_iters:    iterations per test trial (4); max_trials per test phase (4);
    set_iters:      base set-phase length (16), doubled on each consecutive K=0 decision;
    min_change:     relative utility change under which hill-climbing stops (0.10);
    refresh_every:  iterations after which t_iter(0) is re-measured (100);
    step:           K step of the hill-climb (1). Below U=1 the climb halves K instead.
    """

    def __init__(self, k_max: int, k_init: int | None = None, budgets: Sequence[Any] = (None,),
                 budget_init: int = 0, trial_iters: int = 4, max_trials: int = 4, set_iters: int = 16,
                 min_change: float = 0.10, refresh_every: int = 100, step: int = 1):
        if k_max < 1:
            raise ValueError("Cascade needs k_max >= 1")
        self.k_max = int(k_max)
        self.k_init = int(min(k_init if k_init is not None else k_max, k_max))
        self.budgets = list(budgets) or [None]
        self.budget_init = int(budget_init)
        self.trial_iters = int(trial_iters)
        self.max_trials = int(max_trials)
        self.set_iters = int(set_iters)
        self.min_change = float(min_change)
        self.refresh_every = int(refresh_every)
        self.step = max(1, int(step))

        self.iteration = 0
        self.t0: float | None = None
        self._t0_window: deque[float] = deque(maxlen=self.trial_iters)
        self._since_t0 = 0
        self.utility_seen: dict[tuple[int, int], float] = {}
        self.zero_streak = 0
        self.last_choice: tuple[int, int] | None = None
        self.decisions: list[dict] = []  # one per completed test phase
        self.trials_log: list[dict] = []  # one per completed trial

        self._phase = "test"
        self._trial: _Trial | None = None
        self._trials: list[tuple[tuple[int, int], float]] = []
        self._cur: tuple[tuple[int, int], float] | None = None
        self._dir: tuple[int, int] | None = None
        self._turned = False
        self._set_point = (0, 0)
        self._set_left = 0
        self._start_test()

    # --- public ------------------------------------------------------------------------------
    @property
    def joint(self) -> bool:
        return len(self.budgets) > 1

    @property
    def phase(self) -> str:
        return self._trial.kind if self._phase == "test" and self._trial is not None else self._phase

    def next(self) -> Decision:
        """The (K, budget) for the next iteration."""
        k, ci = self._trial.point if self._phase == "test" else self._set_point
        return Decision(k, self.budgets[ci] if k > 0 else None, self.phase)

    def observe(self, accepted: int, t_iter: float) -> None:
        """Feed back one finished iteration: accepted draft tokens and its time t_iter."""
        k, _ = self._trial.point if self._phase == "test" else self._set_point
        self.iteration += 1
        if k == 0:
            self._t0_window.append(float(t_iter))
            self.t0 = sum(self._t0_window) / len(self._t0_window)
            self._since_t0 = 0
        else:
            self._since_t0 += 1
        if self._phase == "set":
            self._set_left -= 1
            if self._set_left <= 0:
                self._start_test()
            return
        tr = self._trial
        tr.accepted.append(int(accepted))
        tr.times.append(float(t_iter))
        if len(tr.times) >= self.trial_iters:
            self._finish_trial()

    def utility(self, accepted: Sequence[int], times: Sequence[float]) -> float:
        """U = ETR / (t_iter / t_iter(0)) over a trial's iterations."""
        etr = sum(a + 1 for a in accepted) / len(accepted)
        t = sum(times) / len(times)
        if self.t0 is None or t <= 0:
            return etr
        return etr / (t / self.t0)

    def to_dict(self) -> dict:
        return {
            "kind": "cascade+budget" if self.joint else "cascade",
            "k_max": self.k_max,
            "budgets": list(self.budgets),
            "t0": self.t0,
            "decisions": list(self.decisions),
            "trials": list(self.trials_log),
        }

    # --- phases ------------------------------------------------------------------------------
    def _start_test(self) -> None:
        self._phase = "test"
        self._trials = []
        self._cur = None
        self._dir = None
        self._turned = False
        if self.t0 is None or self._since_t0 >= self.refresh_every:
            self._trial = _Trial((0, self._start_point()[1]), "baseline")
        else:
            self._trial = _Trial(self._start_point(), "test")

    def _start_point(self) -> tuple[int, int]:
        """The best K>0 seen so far: the last choice if it speculated, else the best measured."""
        if self.last_choice is not None and self.last_choice[0] > 0:
            return self.last_choice
        positive = {p: u for p, u in self.utility_seen.items() if p[0] > 0}
        if positive:
            return max(positive, key=lambda p: (positive[p], -p[0]))
        return (self.k_init, self.budget_init)

    def _finish_trial(self) -> None:
        tr = self._trial
        if tr.kind == "baseline":
            # t0 was refreshed by `observe`; now test from the usual start point.
            self.trials_log.append({"iteration": self.iteration, "kind": "baseline", "t0": self.t0})
            self._trial = _Trial(self._start_point(), "test")
            return
        u = self.utility(tr.accepted, tr.times)
        self.utility_seen[tr.point] = u
        self._trials.append((tr.point, u))
        self.trials_log.append({
            "iteration": self.iteration, "kind": "test", "k": tr.point[0],
            "budget": self.budgets[tr.point[1]], "utility": u,
        })
        nxt = self._climb(tr.point, u)
        if nxt is None or len(self._trials) >= self.max_trials:
            self._decide()
        else:
            self._trial = _Trial(nxt, "test")

    def _neighbours(self, point: tuple[int, int], u: float) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Candidate (next point, direction) moves from `point`, preferred first."""
        k, ci = point
        if u <= 1.0:
            # Speculating at this K does not win: shrink fast towards K=0 (whose utility is 1).
            moves = [(-(k - k // 2), 0)]
            if self.joint:
                moves.append((0, 1))  # or a tighter budget
        else:
            moves = [(self.step, 0), (-self.step, 0)]
            if self.joint:
                # Interleave the axes so that a 4-trial phase probes the budget too.
                moves = [(self.step, 0), (0, 1), (-self.step, 0), (0, -1)]
            if self._dir in moves:  # keep going the way that paid off
                moves.remove(self._dir)
                moves.insert(0, self._dir)
        tried = {p for p, _ in self._trials}
        out = []
        for dk, dc in moves:
            p = (max(0, min(self.k_max, k + dk)), ci + dc)
            if p == point or not 0 <= p[1] < len(self.budgets) or p in tried:
                continue
            out.append((p, (dk, dc)))
        return out

    def _climb(self, point: tuple[int, int], u: float) -> tuple[int, int] | None:
        """Hill-climbing step; None means stop testing."""
        if self._cur is None:
            self._cur = (point, u)
            if self.zero_streak > 0 and u <= 1.0:
                # Speculation is off and its best candidate still loses: one cheap probe is enough
                # (keeps the cost of "testing never stops" small while K=0 is right).
                return None
        else:
            cur_p, cur_u = self._cur
            change = abs(u - cur_u) / max(cur_u, 1e-12)
            if u > cur_u or (u == cur_u and u <= 1.0):
                self._cur = (point, u)
                if u > 1.0 and change < self.min_change:
                    return None  # flat among winners: no point climbing further
                # (below 1 the climb keeps shrinking K until something wins or K reaches 0)
            else:
                # Worse than where we came from: we passed a local maximum in that direction.
                failed = self._dir
                self._dir = None
                if change < self.min_change:
                    return None
                options = [m for m in self._neighbours(cur_p, cur_u) if m[1] != failed]
                # Only turn back once per test phase; otherwise the maximum is behind us.
                if self._turned or not options:
                    return None
                self._turned = True
                nxt, self._dir = options[0]
                return None if nxt[0] == 0 else nxt
        cur_p, cur_u = self._cur
        options = self._neighbours(cur_p, cur_u)
        if not options:
            return None
        nxt, self._dir = options[0]
        if nxt[0] == 0:
            return None  # reaching K=0: its utility is known (1), so testing ends here
        return nxt

    def _decide(self) -> None:
        best_p, best_u = max(self._trials, key=lambda t: (t[1], -t[0][0]))
        if best_u <= 1.0:  # K=0 has U=1 by definition; a tie goes to the cheaper K=0
            best_p = (0, best_p[1])
            self.zero_streak += 1
            set_len = self.set_iters * 2 ** (self.zero_streak - 1)
        else:
            self.zero_streak = 0
            set_len = self.set_iters
        self.last_choice = best_p
        self.decisions.append({
            "iteration": self.iteration, "k": best_p[0],
            "budget": self.budgets[best_p[1]] if best_p[0] > 0 else None,
            "utility": best_u if best_p[0] > 0 else 1.0, "set_iters": set_len,
            "trials": [{"k": p[0], "budget": self.budgets[p[1]], "utility": u} for p, u in self._trials],
        })
        self._phase = "set"
        self._trial = None
        self._set_point = best_p
        self._set_left = set_len


def make_controller(controller, k: int, budget: Any = None, budgets: Sequence[Any] | None = None,
                    **kwargs):
    """Build a controller from a name ("static", "cascade", "cascade+budget") or pass one through."""
    if not isinstance(controller, str):
        return controller
    name = controller.lower()
    if name == "static":
        return StaticController(k, budget)
    if name == "cascade":
        return CascadeController(k_max=max(1, k), budgets=[budget], **kwargs)
    if name in ("cascade+budget", "cascade_budget"):
        if not budgets:
            raise ValueError("controller='cascade+budget' needs candidate budgets (budget_choices=...)")
        return CascadeController(k_max=max(1, k), budgets=list(budgets), **kwargs)
    raise ValueError(f"unknown controller {controller!r}: use 'static', 'cascade', 'cascade+budget' or an object")
