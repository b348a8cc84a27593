"""Speculation-length controllers: `StaticController` and Cascade (`CascadeController`).

Cascade (docs/design.md §4, docs/cascade.md) measures the utility of speculating with K draft tokens,

    U(K) = ETR(K) / (t_iter(K) / t_iter(0)),   ETR = mean(accepted + 1) per iteration,

where t_iter is the wall time (or the cost model's time) of a whole iteration, drafting included.
It alternates a *test* phase (up to `max_trials` trials of at most `trial_iters` iterations,
hill-climbing from the last decided point) and a *set* phase (`set_iters` iterations at the best K).
Speculation is switched off (K=0, whose utility is 1 by definition) when no tested K beats 1; each
consecutive K=0 decision doubles the set phase (16, 32, 64, ...) up to `max_set_iters`, and testing
never stops.

What makes the tests cheap:

- A set phase at K>0 measures its own point: its utility is the incumbent of the next test phase, so
  that phase only runs trials beside it (no trial re-measures the incumbent).
- Sequential trials: a trial ends after `min_trial_iters` iterations once its utility is clearly
  below or above the reference (the incumbent, or 1 when speculation is off): beyond `z` standard
  errors of the per-iteration ratios (accepted + 1) * t_iter(0) / t_iter, with the variance pooled over
  past trials so that two lucky iterations do not decide alone.
- Switching speculation on is held to more: a trial whose alternative is K=0 alternates with K=0
  iterations (its own t_iter(0), measured beside it), runs up to `max_trial_iters` while its gain is
  unclear, and a point turns speculation on only if its remembered utility is above 1 by `z_on`
  standard errors.
- While speculation is off, a test phase is one probe at the best K>0 remembered; it ends there when
  the probe loses.
- t_iter(0) is fresh without K=0 trials while speculating: one K=0 iteration every `refresh_every`
  iterations at K>0, t_iter(0) being the median of the last `t0_samples` K=0 iterations. Only a
  controller that has never seen a K=0 iteration opens with a K=0 baseline trial.

Warm start: `state_dict()` / `load_state_dict()` carry everything learned (t_iter(0), the remembered
utilities, the back-off and the phase in progress) from one request to the next; a request resumes
where the previous one stopped, i.e. at the last decided point. `moespec.speculative.cascade_state`
keeps these per (target, drafter, device, dtype, draft shape). Decay: remembered utilities lose half
their weight every `half_life` iterations (and are dropped when almost nothing is left), and the K=0
back-off is capped at `max_set_iters`, so a changed workload is re-learned within a bounded number of
iterations.

Hill-climb details: from a winning point (U > 1) step K by +-`step`, keeping the direction that paid
off and turning back once after a worse trial; from a losing point (U <= 1) halve K, so a too-long
draft reaches the useful range (or K=0) in few trials. In joint mode (`budgets` with more than one
entry) a point is (K, budget index) and the same hill-climb also moves along the budget axis.
The controller never reads a clock itself: the engine feeds it times, so it is deterministic under a
cost model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Decision", "StaticController", "CascadeController", "make_controller", "STATE_VERSION"]

#: Version of `CascadeController.state_dict()`; bumped when its layout changes.
STATE_VERSION = 1


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
    kind: str  # "baseline" (K=0, measures t_iter(0)) or "test"
    ref: float = 1.0  # utility it is compared with (sequential stop)
    accepted: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


class CascadeController:
    """Utility-driven choice of K (and optionally the budget).

    k_max:           largest draft size it may pick; k_init the first one tested (default
                     (k_max + 1) // 2).
    budgets:         candidate budgets, loosest first (e.g. [None, 64, 32]); one entry = K only.
    trial_iters:     most iterations per test trial (4); max_trials per test phase (4);
    min_trial_iters: iterations after which a trial may stop early (2); z: how many standard errors
                     make a difference "clear" (2.0);
    max_trial_iters: a trial that decides whether to speculate at all alternates with K=0 iterations
                     (its own t_iter(0)) and, while its gain is unclear, goes on up to this many
                     iterations (16); a gain still within z_on standard errors of 1 leaves speculation off;
    z_on:            standard errors a gain needs to switch speculation on (2.5): stricter than z,
                     since a false gain costs where "never lose much" is decided;
    set_iters:       base set-phase length (16), doubled on each consecutive K=0 decision up to
                     max_set_iters (256), and on each repeated decision of the same K>0 point up to
                     max_set_win_iters (64);
    min_change:      relative utility change under which hill-climbing stops (0.10);
    refresh_every:   iterations at K>0 between two K=0 probe iterations that keep t_iter(0) fresh (50);
    t0_samples:      K=0 iterations whose median is t_iter(0) (4);
    half_life:       iterations after which a remembered utility has half its weight (512);
    memory_iters:    most iterations of evidence a remembered utility holds (64): decisions use it,
                     merged with each new trial, so noisy trials average out;
    step:            K step of the hill-climb (1). Below U=1 the climb halves K instead.
    """

    def __init__(self, k_max: int, k_init: int | None = None, budgets: Sequence[Any] = (None,),
                 budget_init: int = 0, trial_iters: int = 4, max_trials: int = 4, set_iters: int = 16,
                 min_change: float = 0.10, refresh_every: int = 50, step: int = 1, min_trial_iters: int = 2,
                 z: float = 2.0, max_set_iters: int = 256, t0_samples: int = 4, half_life: int = 512,
                 memory_iters: int = 64, max_set_win_iters: int = 64, max_trial_iters: int = 16,
                 z_on: float = 2.5):
        if k_max < 1:
            raise ValueError("Cascade needs k_max >= 1")
        for name, v in (("trial_iters", trial_iters), ("max_trials", max_trials), ("set_iters", set_iters),
                        ("refresh_every", refresh_every), ("min_trial_iters", min_trial_iters),
                        ("t0_samples", t0_samples), ("half_life", half_life), ("memory_iters", memory_iters)):
            if int(v) < 1:
                raise ValueError(f"Cascade needs {name} >= 1, got {v!r}")
        for name, v in (("max_set_iters", max_set_iters), ("max_set_win_iters", max_set_win_iters)):
            if v < set_iters:
                raise ValueError(f"{name} ({v}) must be >= set_iters ({set_iters})")
        self.k_max = int(k_max)
        # A cold start tests the middle of the range: the climb reaches either end in few trials,
        # and a losing middle K halves towards K=0 (from k_max the halving needs one trial more).
        self.k_init = int(min(k_init if k_init is not None else (k_max + 1) // 2, k_max))
        self.budgets = list(budgets) or [None]
        self.budget_init = int(budget_init)
        self.trial_iters = int(trial_iters)
        self.min_trial_iters = min(int(min_trial_iters), self.trial_iters)
        self.max_trial_iters = max(int(max_trial_iters), self.trial_iters)
        self.z = float(z)
        self.z_on = float(z_on)
        self.max_trials = int(max_trials)
        self.set_iters = int(set_iters)
        self.max_set_iters = int(max_set_iters)
        self.max_set_win_iters = int(max_set_win_iters)
        self.min_change = float(min_change)
        self.refresh_every = int(refresh_every)
        self.t0_samples = int(t0_samples)
        self.half_life = int(half_life)
        self.memory_iters = int(memory_iters)
        self.step = max(1, int(step))

        # Learned state (carried across requests by state_dict / load_state_dict).
        self.iteration = 0
        self._t0_window: list[float] = []
        self._since_t0 = 0
        self._memory: dict[tuple[int, int], list[float]] = {}  # point -> [utility, weight, iteration]
        self._var = [0.0, 0]  # pooled per-iteration ratio variance: sum of squares, degrees of freedom
        self.zero_streak = 0
        self.same_streak = 0  # consecutive decisions of the same K>0 point
        self.last_choice: tuple[int, int] | None = None
        self._phase = "test"
        self._trial: _Trial | None = None
        self._trials: list[tuple[tuple[int, int], float]] = []
        self._ran = 0  # trials run in this test phase (the set phase's incumbent is free)
        self._cur: tuple[tuple[int, int], float] | None = None
        self._dir: tuple[int, int] | None = None
        self._turned = False
        self._set_point = (0, 0)
        self._set_left = 0
        self._set_acc: list[int] = []
        self._set_times: list[float] = []
        self._set_ratios: list[float] = []
        self._probe = False  # the next iteration is a single K=0 probe (t_iter(0) refresh)
        self._phase_t0s: list[float] = []  # K=0 probes of the current test phase

        # Per request: what happened during this request (reset by load_state_dict).
        self.decisions: list[dict] = []  # one per completed test phase
        self.trials_log: list[dict] = []  # one per completed trial or t_iter(0) probe
        self.warm = False
        self._start_test()

    # --- public ------------------------------------------------------------------------------
    @property
    def joint(self) -> bool:
        return len(self.budgets) > 1

    @property
    def t0(self) -> float | None:
        """t_iter(0): the median of the last `t0_samples` K=0 iterations (None before the first)."""
        if not self._t0_window:
            return None
        s = sorted(self._t0_window)
        n = len(s)
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    @property
    def utility_seen(self) -> dict[tuple[int, int], float]:
        """Remembered utility per (K, budget index), decayed measurements merged."""
        return {p: m[0] for p, m in self._memory.items()}

    @property
    def phase(self) -> str:
        if self._probe:
            return "baseline"
        return self._trial.kind if self._phase == "test" and self._trial is not None else self._phase

    def _point(self) -> tuple[int, int]:
        if self._probe:
            return (0, self._set_point[1])
        return self._trial.point if self._phase == "test" else self._set_point

    def next(self) -> Decision:
        """The (K, budget) for the next iteration."""
        k, ci = self._point()
        return Decision(k, self.budgets[ci] if k > 0 else None, self.phase)

    def observe(self, accepted: int, t_iter: float) -> None:
        """Feed back one finished iteration: accepted draft tokens and its time t_iter."""
        k, _ = self._point()
        t_iter = float(t_iter)
        self.iteration += 1
        if k == 0:
            self._t0_window = (self._t0_window + [t_iter])[-self.t0_samples:]
            self._since_t0 = 0
        else:
            self._since_t0 += 1
        if self._probe:
            self._probe = False
            if self._phase == "test":
                self._phase_t0s.append(t_iter)
            self.trials_log.append({"iteration": self.iteration, "kind": "baseline", "t0": self.t0})
        elif self._phase == "set":
            self._set_left -= 1
            if k > 0:
                self._set_acc.append(int(accepted))
                self._set_times.append(t_iter)
                self._set_ratios.append(self._ratio(accepted, t_iter))
            if self._set_left <= 0 or (k > 0 and self._set_worse()):
                self._start_test()
        else:
            tr = self._trial
            tr.accepted.append(int(accepted))
            tr.times.append(t_iter)
            n = len(tr.times)
            if tr.kind == "test" and self._clear(tr):
                self._finish_trial()
            elif n >= self.trial_iters and not self._extend(tr):
                self._finish_trial()
            elif tr.kind == "test" and tr.ref <= 1.0:
                # A trial that decides whether to speculate at all alternates with K=0 iterations, so
                # t_iter(0) is measured beside it: on a shared machine the load changes within a
                # second, and a K=0 phase measured in a slow spell would make any K look like a gain.
                # While speculation is off these K=0 iterations are what would run anyway.
                self._probe = True
        # Keep t_iter(0) fresh while speculating: one plain iteration, not a trial.
        if (self._phase == "set" and self._set_point[0] > 0 and self._set_left > 0
                and self._since_t0 >= self.refresh_every):
            self._probe = True

    def utility(self, accepted: Sequence[int], times: Sequence[float], t0: float | None = None) -> float:
        """U = ETR / (t_iter / t_iter(0)) over a trial's iterations (t0: t_iter(0), default `self.t0`)."""
        etr = sum(a + 1 for a in accepted) / len(accepted)
        t = sum(times) / len(times)
        t0 = self.t0 if t0 is None else t0
        if t0 is None or t <= 0:
            return etr
        return etr / (t / t0)

    def to_dict(self) -> dict:
        """This request's record: kind, t_iter(0), decisions and trials, and whether it started warm."""
        return {
            "kind": "cascade+budget" if self.joint else "cascade",
            "k_max": self.k_max,
            "budgets": list(self.budgets),
            "t0": self.t0,
            "warm": self.warm,
            "decisions": list(self.decisions),
            "trials": list(self.trials_log),
        }

    # --- warm start --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything learned, as plain JSON data (see `load_state_dict`)."""
        tr = self._trial
        return {
            "version": STATE_VERSION,
            "k_max": self.k_max,
            "budgets": _jsonable(self.budgets),
            "iteration": self.iteration,
            "t0_window": list(self._t0_window),
            "since_t0": self._since_t0,
            "memory": [[p[0], p[1], *m] for p, m in sorted(self._memory.items())],
            "variance": list(self._var),
            "zero_streak": self.zero_streak,
            "same_streak": self.same_streak,
            "last_choice": list(self.last_choice) if self.last_choice is not None else None,
            "phase": self._phase,
            "trial": None if tr is None else {
                "point": list(tr.point), "kind": tr.kind, "ref": tr.ref, "accepted": list(tr.accepted),
                "times": list(tr.times)},
            "phase_t0s": list(self._phase_t0s),
            "trials": [[p[0], p[1], u] for p, u in self._trials],
            "ran": self._ran,
            "cur": None if self._cur is None else [self._cur[0][0], self._cur[0][1], self._cur[1]],
            "dir": list(self._dir) if self._dir is not None else None,
            "turned": self._turned,
            "set_point": list(self._set_point),
            "set_left": self._set_left,
            "set_accepted": list(self._set_acc),
            "set_times": list(self._set_times),
            "set_ratios": list(self._set_ratios),
            "probe": self._probe,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a controller with the same k_max and budgets.

        The request then resumes where the previous one stopped (the last decided point, or the
        trial in progress). Raises `ValueError` when the state is of another version or controller.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"Cascade controller state of version {got!r}; this moespec reads version "
                             f"{STATE_VERSION}")
        if state.get("k_max") != self.k_max or state.get("budgets") != _jsonable(self.budgets):
            raise ValueError(f"Cascade state for k_max={state.get('k_max')}, budgets={state.get('budgets')} cannot "
                             f"continue a controller with k_max={self.k_max}, budgets={_jsonable(self.budgets)}")
        try:
            self.iteration = int(state["iteration"])
            self._t0_window = [float(t) for t in state["t0_window"]][-self.t0_samples:]
            self._since_t0 = int(state["since_t0"])
            self._memory = {(int(k), int(c)): [float(u), float(w), float(at)]
                            for k, c, u, w, at in state["memory"] if self._valid((k, c))}
            self._var = [float(state["variance"][0]), int(state["variance"][1])]
            self.zero_streak = int(state["zero_streak"])
            self.same_streak = int(state["same_streak"])
            lc = state["last_choice"]
            self.last_choice = (int(lc[0]), int(lc[1])) if lc is not None else None
            self._phase = state["phase"]
            t = state["trial"]
            self._trial = None if t is None else _Trial(
                (int(t["point"][0]), int(t["point"][1])), t["kind"], float(t["ref"]), [int(a) for a in t["accepted"]],
                [float(x) for x in t["times"]])
            self._phase_t0s = [float(x) for x in state["phase_t0s"]]
            self._trials = [((int(k), int(c)), float(u)) for k, c, u in state["trials"]]
            self._ran = int(state["ran"])
            cur = state["cur"]
            self._cur = None if cur is None else ((int(cur[0]), int(cur[1])), float(cur[2]))
            self._dir = tuple(state["dir"]) if state["dir"] is not None else None
            self._turned = bool(state["turned"])
            self._set_point = (int(state["set_point"][0]), int(state["set_point"][1]))
            self._set_left = int(state["set_left"])
            self._set_acc = [int(a) for a in state["set_accepted"]]
            self._set_times = [float(x) for x in state["set_times"]]
            self._set_ratios = [float(x) for x in state["set_ratios"]]
            self._probe = bool(state["probe"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"malformed Cascade controller state ({type(exc).__name__}: {exc})") from None
        if self._phase not in ("test", "set") or (self._phase == "test") != (self._trial is not None) or \
                not self._valid(self._set_point) or (self._trial is not None and not self._valid(self._trial.point)):
            raise ValueError("malformed Cascade controller state (inconsistent phase)")
        self.decisions, self.trials_log, self.warm = [], [], True

    def _valid(self, p) -> bool:
        return 0 <= int(p[0]) <= self.k_max and 0 <= int(p[1]) < len(self.budgets)

    # --- measurements ------------------------------------------------------------------------
    def _ratio(self, accepted: int, t_iter: float) -> float:
        """One iteration's utility: (accepted + 1) * t_iter(0) / t_iter."""
        t0 = self.t0
        if t0 is None or t_iter <= 0:
            return float(accepted + 1)
        return (accepted + 1) * t0 / t_iter

    def _trial_t0(self, tr: _Trial) -> float | None:
        """t_iter(0) for a trial: measured beside it when this test phase ran K=0 probes (the machine's
        load may have changed since the last K=0 phase), else the controller's."""
        if not self._phase_t0s:
            return self.t0
        s = sorted(self._phase_t0s[-self.t0_samples:])
        n = len(s)
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    def _trial_ratios(self, tr: _Trial) -> list[float]:
        t0 = self._trial_t0(tr)
        if t0 is None:
            return [float(a + 1) for a in tr.accepted]
        return [(a + 1) * t0 / t if t > 0 else float(a + 1) for a, t in zip(tr.accepted, tr.times)]

    def _trial_utility(self, tr: _Trial) -> float:
        return self.utility(tr.accepted, tr.times, self._trial_t0(tr))

    def _clear(self, tr: _Trial) -> bool:
        """Sequential test: is this trial's utility already clearly below or above its reference?"""
        ratios = self._trial_ratios(tr)
        n = len(ratios)
        if n < self.min_trial_iters:
            return False
        mean = sum(ratios) / n
        var = sum((r - mean) ** 2 for r in ratios) / (n - 1) if n > 1 else 0.0
        if self._var[1] > 0:
            var = max(var, self._var[0] / self._var[1])
        # Clear = beyond z standard errors AND by more than min_change: stopping on a small gap would
        # bias close challengers low (the unlucky ones stop, the lucky ones regress to the mean).
        se = math.sqrt(var / n)
        margin = max(self.z * se, self.min_change * tr.ref)
        u = self._trial_utility(tr)
        if u + margin < tr.ref:
            return True
        # A gain that would switch speculation on must clear the stricter z_on.
        up = max(self.z_on * se, self.min_change * tr.ref) if tr.ref <= 1.0 else margin
        return u - up > tr.ref

    def _set_worse(self) -> bool:
        """A set phase at K>0 whose utility is clearly below what the point is remembered at (the
        workload changed): end it now rather than at its planned length."""
        n = len(self._set_ratios)
        mem = self._memory.get(self._set_point)
        if n < 2 * self.trial_iters or mem is None or self._var[1] == 0:
            return False
        u = self.utility(self._set_acc, self._set_times)
        return u + self.z * math.sqrt(self._var[0] / self._var[1] / n) < mem[0]

    def _extend(self, tr: _Trial) -> bool:
        """Keep a trial going past trial_iters? Only when it decides whether to speculate at all (its
        reference is K=0's utility 1), it looks like a gain and that gain is not yet clear."""
        return (tr.kind == "test" and tr.ref <= 1.0 and len(tr.times) < self.max_trial_iters
                and self._trial_utility(tr) > 1.0)

    def _proven(self, point: tuple[int, int]) -> bool:
        """Is the remembered utility of `point` above 1 by `z` standard errors of its evidence?"""
        m = self._memory.get(point)
        if m is None:
            return False
        var = self._var[0] / self._var[1] if self._var[1] > 0 else 0.0
        return m[0] - self.z_on * math.sqrt(var / max(m[1], 1.0)) > 1.0

    def _pool_variance(self, ratios: Sequence[float]) -> None:
        n = len(ratios)
        if n < 2:
            return
        mean = sum(ratios) / n
        ss, dof = self._var
        ss, dof = ss + sum((r - mean) ** 2 for r in ratios), dof + n - 1
        if dof > 256:  # fade old evidence so a changed workload's noise level is learned too
            ss, dof = ss / 2, dof // 2
        self._var = [ss, dof]

    def _remember(self, point: tuple[int, int], u: float, n: int) -> float:
        """Merge a measurement (n iterations) into the memory of `point`; returns the merged utility.

        Older evidence fades (half its weight every `half_life` iterations) and counts for at most
        `memory_iters` iterations, so a few noisy iterations do not decide alone and a changed
        workload still moves the estimate quickly; a measurement that differs from the memory by more
        than `z` standard errors replaces it (the workload changed).
        """
        old = self._memory.get(point)
        w_old = 0.0 if old is None else min(self.memory_iters,
                                            old[1] * 0.5 ** ((self.iteration - old[2]) / self.half_life))
        if w_old > 0 and self._var[1] > 0:
            var = self._var[0] / self._var[1]
            if abs(u - old[0]) > self.z * math.sqrt(var / n + var / w_old):
                w_old = 0.0
        merged = u if w_old <= 0 else (w_old * old[0] + n * u) / (w_old + n)
        self._memory[point] = [merged, w_old + n, float(self.iteration)]
        return merged

    def _forget_stale(self) -> None:
        # A memory under a quarter of one iteration's weight says nothing any more.
        for p in [p for p, m in self._memory.items()
                  if m[1] * 0.5 ** ((self.iteration - m[2]) / self.half_life) < 0.25]:
            del self._memory[p]

    # --- phases ------------------------------------------------------------------------------
    def _start_test(self) -> None:
        self._phase = "test"
        self._phase_t0s = []
        self._trials, self._ran = [], 0
        self._cur, self._dir, self._turned = None, None, False
        self._forget_stale()
        if self.t0 is None:
            self._trial = _Trial((0, self._start_point()[1]), "baseline")
            return
        sp = self._set_point
        if sp[0] > 0 and len(self._set_ratios) >= self.min_trial_iters:
            # The set phase measured the incumbent: test only beside it.
            raw = self.utility(self._set_acc, self._set_times)
            self._pool_variance(self._set_ratios)
            u = self._remember(sp, raw, len(self._set_ratios))
            self._trials.append((sp, u))
            self.trials_log.append({"iteration": self.iteration, "kind": "set", "k": sp[0],
                                    "budget": self.budgets[sp[1]], "utility": raw, "merged": u})
            self._cur = (sp, u)
            self._clear_set()
            nxt = self._next_from_cur()
            if nxt is None:
                self._decide()
            else:
                self._new_trial(nxt, max(1.0, u))
            return
        self._clear_set()
        self._new_trial(self._start_point(), 1.0)

    def _new_trial(self, point: tuple[int, int], ref: float) -> None:
        self._trial = _Trial(point, "test", ref=ref)
        if ref <= 1.0 and self._since_t0 > 0:
            # This trial decides whether to speculate at all: measure t_iter(0) right beside it.
            self._probe = True

    def _clear_set(self) -> None:
        self._set_acc, self._set_times, self._set_ratios = [], [], []

    def _start_point(self) -> tuple[int, int]:
        """The best K>0 remembered: the last choice if it speculated, else the best measured."""
        if self.last_choice is not None and self.last_choice[0] > 0:
            return self.last_choice
        positive = {p: m[0] for p, m in self._memory.items() if p[0] > 0}
        if positive:
            return max(positive, key=lambda p: (positive[p], -p[0]))
        return (self.k_init, self.budget_init)

    def _finish_trial(self) -> None:
        tr = self._trial
        if tr.kind == "baseline":
            # t_iter(0) was measured by `observe`; now test from the usual start point.
            self.trials_log.append({"iteration": self.iteration, "kind": "baseline", "t0": self.t0})
            self._new_trial(self._start_point(), 1.0)
            return
        raw = self._trial_utility(tr)
        self._pool_variance(self._trial_ratios(tr))
        u = self._remember(tr.point, raw, len(tr.times))
        self._trials.append((tr.point, u))
        self._ran += 1
        self.trials_log.append({
            "iteration": self.iteration, "kind": "test", "k": tr.point[0], "budget": self.budgets[tr.point[1]],
            "utility": raw, "merged": u, "iterations": len(tr.times),
        })
        nxt = self._climb(tr.point, u)
        if nxt is None or self._ran >= self.max_trials:
            self._decide()
        else:
            # Against a losing incumbent the alternative is K=0, whose utility is 1.
            self._new_trial(nxt, max(1.0, self._cur[1]) if self._cur is not None else 1.0)

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

    def _budget_move(self) -> tuple[int, int] | None:
        if any(p[1] != self._cur[0][1] for p, _ in self._trials):
            return None
        options = [m for m in self._neighbours(*self._cur) if m[1][1] != 0]
        if not options:
            return None
        nxt, self._dir = options[0]
        return nxt

    def _next_from_cur(self) -> tuple[int, int] | None:
        cur_p, cur_u = self._cur
        options = self._neighbours(cur_p, cur_u)
        if not options:
            return None
        nxt, self._dir = options[0]
        if nxt[0] == 0:
            return None  # reaching K=0: its utility is known (1), so testing ends here
        return nxt

    def _climb(self, point: tuple[int, int], u: float) -> tuple[int, int] | None:
        """Hill-climbing step; None means stop testing."""
        if self._cur is None:
            self._cur = (point, u)
            if self.zero_streak > 0 and u <= 1.0 + self.min_change:
                # Speculation is off and its best candidate still loses: one cheap probe is enough
                # (keeps the cost of "testing never stops" small while K=0 is right). A marginal win
                # goes straight to a set phase, which measures it over more iterations before any climb.
                return None
        else:
            cur_p, cur_u = self._cur
            change = abs(u - cur_u) / max(cur_u, 1e-12)
            if u > cur_u or (u == cur_u and u <= 1.0):
                self._cur = (point, u)
                if u > 1.0 and change < self.min_change:
                    # Flat among winners: no point climbing further along K; in joint mode the budget
                    # axis gets one trial first if this phase has not moved along it yet.
                    return self._budget_move() if self.joint else None
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
        return self._next_from_cur()

    def _decide(self) -> None:
        best_p, best_u = max(self._trials, key=lambda t: (t[1], -t[0][0]))
        if best_u > 1.0 and not self._proven(best_p):
            best_u = 1.0  # a gain within the noise: K=0 (U=1 exactly) is the safe choice
        if best_u <= 1.0:  # K=0 has U=1 by definition; a tie goes to the cheaper K=0
            best_p = (0, best_p[1])
            self.zero_streak += 1
            self.same_streak = 0
            set_len = min(self.max_set_iters, self.set_iters * 2 ** min(self.zero_streak - 1, 30))
        else:
            # A point chosen again and again with a clear gain is stable: test it less often (set phases
            # double up to max_set_win_iters); a set phase that turns clearly worse ends early (observe).
            clear = best_u > 1.0 + self.min_change
            self.same_streak = self.same_streak + 1 if best_p == self.last_choice and clear else 0
            self.zero_streak = 0
            set_len = min(self.max_set_win_iters, self.set_iters * 2 ** min(self.same_streak, 30))
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
        self._clear_set()


def _jsonable(budgets: Sequence[Any]) -> list:
    from .stats import jsonable

    return jsonable(list(budgets))


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
