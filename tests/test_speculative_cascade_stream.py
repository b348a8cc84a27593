"""Cascade across a stream of requests: warm start, targets under two synthetic cost models, decay.

A request is `tokens` generated tokens; between requests the controller's state goes through
`state_dict()` / `load_state_dict()` (what `generate` does with a `CascadeState`). Costs and
acceptance are deterministic functions (seeded), so every number here is reproducible.
"""
import random
import statistics

import pytest

from moespec.speculative.cascade import CascadeController, StaticController, make_controller


def geometric(alpha, seed):
    """Accepted drafts of a chain whose tokens are each accepted with probability alpha (seeded)."""
    rng = random.Random(seed)

    def accepted(k, b):
        n = 0
        while n < k and rng.random() < alpha:
            n += 1
        return n
    return accepted


# Speculation loses: 30 % per-token acceptance, verification of K drafts costs 1 + 0.35 K plain steps
# (U(1) = 0.96, U(2) = 0.82, ...; the shape of the recorded CPU run, where every static K loses).
def losing(seed):
    return geometric(0.3, seed), lambda k, b: 1.0 + 0.35 * k


def peaked(k_peak=4, height=0.5):
    """Every draft accepted, times shaped so that U(K) = 1 + height * triangle(K) peaks at k_peak."""
    def utility(k):
        return 1.0 if k == 0 else 1.0 + height * max(0.0, 1.0 - abs(k - k_peak) / k_peak)
    return (lambda k, b: k), (lambda k, b: (k + 1) / utility(k))


# K=4 wins by 1.5x with noisy acceptance: 90 % per token, cost 1 + 0.43 K (U(3) = 1.50, U(4) = 1.51,
# U(5) = 1.49, U(8) = 1.38): a flat top under noise, the hard case for a hill-climb.
def winning_noisy(seed):
    return geometric(0.9, seed), lambda k, b: 1.0 + 0.43 * k


def with_budgets(env, gain):
    """Budgets [None, 16, 8] cut the K-dependent part of the cost by gain per step (acceptance unchanged)."""
    acc, time_of = env
    steps = {None: 0, 16: 1, 8: 2}
    return acc, lambda k, b: time_of(k, None) if k == 0 else 1 + (time_of(k, None) - 1) * (1 - gain * steps[b])


def run_stream(make, env, requests=64, tokens=32, warm=True):
    """Speed-up over autoregressive decoding (cost 1 per token) of a stream of requests; the last controller."""
    accepted_of, time_of = env
    state, total_t, total_n, ctrl = None, 0.0, 0, None
    for _ in range(requests):
        ctrl = make()
        if warm and state is not None:
            ctrl.load_state_dict(state)
        n = 0
        while n < tokens:
            d = ctrl.next()
            a, t = accepted_of(d.k, d.budget), time_of(d.k, d.budget)
            ctrl.observe(a, t)
            total_t += t
            n += min(a + 1, tokens - n)  # a request ends at its token count (as generate truncates)
        total_n += n
        state = ctrl.state_dict() if hasattr(ctrl, "state_dict") else None
    return total_n * time_of(0, None) / total_t, ctrl


def best_static(env_of_seed, seed=0, **kw):
    return max(run_stream(lambda: StaticController(k), env_of_seed(seed), warm=False, **kw)[0] for k in range(1, 9))


def cascade():
    return CascadeController(k_max=8)


def joint():
    return make_controller("cascade+budget", 8, budgets=[None, 16, 8])


@pytest.mark.parametrize("seed", range(4))
def test_losing_stream_stays_within_2_percent_of_autoregressive(seed):
    warm, ctrl = run_stream(cascade, losing(seed))
    cold, _ = run_stream(cascade, losing(seed), warm=False)
    assert warm >= 0.98, f"warm Cascade {warm:.3f}x autoregressive"
    assert cold < 0.9  # a fresh test phase per 32-token request cannot be amortised (the 0.78x)
    assert best_static(losing, seed) < 0.97  # every static K loses here
    assert ctrl.last_choice[0] == 0 and ctrl.zero_streak >= 3
    # Joint mode with budgets that change nothing: no worse than Cascade.
    j, _ = run_stream(joint, with_budgets(losing(seed), 0.0))
    assert j >= warm - 0.01


def test_winning_stream_within_5_percent_of_best_static_k():
    env = lambda seed: peaked()  # noqa: E731 - deterministic: K=4 wins by 1.5x per iteration
    best = best_static(env)
    warm, ctrl = run_stream(cascade, env(0))
    assert warm >= 0.95 * best, f"Cascade {warm:.3f}x AR, best static K {best:.3f}x"
    assert ctrl.last_choice == (4, 0)
    j, jc = run_stream(joint, with_budgets(env(0), 0.0))
    assert j >= warm - 1e-9
    j_gain, _ = run_stream(joint, with_budgets(env(0), 0.1))
    assert j_gain >= warm


def test_winning_noisy_stream_within_5_percent_of_best_static_k_on_average():
    # Under 90 % acceptance noise the per-iteration utility varies by ~45 %, and K=3..5 are within 1 %
    # of each other: single streams land 0.95-0.99x the best static K; the mean over seeds is the claim.
    ratios, joint_ratios = [], []
    for seed in range(4):
        best = best_static(winning_noisy, seed)
        ratios.append(run_stream(cascade, winning_noisy(seed))[0] / best)
        joint_ratios.append(run_stream(joint, with_budgets(winning_noisy(seed), 0.1))[0] / best)
    assert statistics.mean(ratios) >= 0.95 and min(ratios) >= 0.92, ratios
    assert statistics.mean(joint_ratios) >= statistics.mean(ratios), (joint_ratios, ratios)


def test_warm_start_resumes_at_the_last_decided_point():
    env = peaked()
    ctrl = CascadeController(k_max=8)
    for _ in range(200):
        d = ctrl.next()
        ctrl.observe(env[0](d.k, None), env[1](d.k, None))
    state = ctrl.state_dict()
    nxt = CascadeController(k_max=8)
    nxt.load_state_dict(state)
    assert nxt.warm and nxt.next() == ctrl.next()  # same phase, same point
    assert nxt.decisions == [] and nxt.trials_log == []  # per-request records start empty
    # Running both on gives identical choices (the state holds everything the controller needs).
    for _ in range(100):
        a, b = ctrl.next(), nxt.next()
        assert a == b
        for c in (ctrl, nxt):
            c.observe(env[0](a.k, None), env[1](a.k, None))


def test_speculation_off_costs_one_probe_per_test_phase():
    accepted_of, time_of = lambda k, b: 0, lambda k, b: 1.0 + 0.25 * k  # nothing is ever accepted
    _, ctrl = run_stream(cascade, (accepted_of, time_of), requests=8)
    state = ctrl.state_dict()
    ctrl = CascadeController(k_max=8)
    ctrl.load_state_dict(state)
    ks = []
    for _ in range(2000):
        d = ctrl.next()
        ks.append(d.k)
        ctrl.observe(accepted_of(d.k, None), time_of(d.k, None))
    off = [d for d in ctrl.decisions]
    assert off and all(d["k"] == 0 and len(d["trials"]) == 1 for d in off)  # one probe each
    assert all(d["set_iters"] == 256 for d in off)  # the back-off is capped
    # Each probe stops as soon as its loss is clear (min_trial_iters iterations).
    assert sum(k > 0 for k in ks) == ctrl.min_trial_iters * len(off)


def test_changed_workload_is_relearned():
    # Speculation loses for 3000 iterations (the back-off reaches its cap), then K=4 wins by 1.5x.
    state = {"it": 0}
    lose, win = (lambda k, b: 0, lambda k, b: 1.0 + 0.25 * k), peaked()

    def env(i):
        return lose if state["it"] < 3000 else win

    ctrl = CascadeController(k_max=8)
    ks = []
    for _ in range(3800):
        acc, tm = env(state["it"])
        d = ctrl.next()
        ctrl.observe(acc(d.k, None), tm(d.k, None))
        ks.append(d.k)
        state["it"] += 1
    # Re-learned within the capped back-off (256) plus a test phase, then speculating at the peak.
    first = next(i for i in range(3000, 3800) if ks[i] == 4 and ks[i + 1:i + 17] == [4] * 16)
    assert first - 3000 <= 256 + 40, first
    assert ks[-200:].count(4) >= 150


def test_state_dict_checks():
    ctrl = CascadeController(k_max=8)
    st = ctrl.state_dict()
    with pytest.raises(ValueError, match="version"):
        CascadeController(k_max=8).load_state_dict({**st, "version": 99})
    with pytest.raises(ValueError, match="k_max=4"):
        CascadeController(k_max=4).load_state_dict(st)
    with pytest.raises(ValueError, match="budgets"):
        make_controller("cascade+budget", 8, budgets=[None, 16]).load_state_dict(st)
    with pytest.raises(ValueError, match="malformed"):
        CascadeController(k_max=8).load_state_dict({k: v for k, v in st.items() if k != "memory"})


def test_memory_decays_and_is_forgotten():
    ctrl = CascadeController(k_max=8, half_life=100)
    ctrl._remember((3, 0), 1.4, 64)
    ctrl.iteration += 100
    # Half the weight left: an equal-weight new measurement counts as much as the old one (32 vs 32).
    assert ctrl._remember((3, 0), 1.2, 32) == pytest.approx(1.3)
    ctrl.iteration += 1000  # ten half-lives: under a quarter of an iteration's weight
    ctrl._forget_stale()
    assert (3, 0) not in ctrl.utility_seen


@pytest.mark.parametrize("seed", range(3))
def test_losing_stream_under_a_drifting_machine_load(seed):
    """A shared machine: every 37 iterations the load changes (x1 to x3) and each iteration jitters by
    +-10 %. t_iter(0) measured in a slow spell must not make a trial in a fast spell look like a gain."""
    accepted_of, base = losing(seed)
    rng = random.Random(seed + 100)
    load = {"i": 0, "f": 1.0}

    def time_of(k, b):
        load["i"] += 1
        if load["i"] % 37 == 0:
            load["f"] = rng.choice([1.0, 1.5, 2.0, 3.0])
        return base(k, b) * load["f"] * rng.uniform(0.9, 1.1)

    state, spec_t, ar_t = None, 0.0, 0.0
    for _ in range(64):
        ctrl = CascadeController(k_max=8)
        if state is not None:
            ctrl.load_state_dict(state)
        n = 0
        while n < 32:
            d = ctrl.next()
            a, t = accepted_of(d.k, None), time_of(d.k, None)
            ctrl.observe(a, t)
            e = min(a + 1, 32 - n)
            spec_t, ar_t, n = spec_t + t, ar_t + e * load["f"], n + e  # AR pays the same load per token
        state = ctrl.state_dict()
    assert ar_t / spec_t >= 0.98
