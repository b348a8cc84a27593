"""Cascade controller: deterministic simulations under cost models, and through `generate`."""
import pytest
import torch

from test_speculative_support import spec_single_thread  # noqa: F401  (autouse)
from test_speculative_support import (CascadeController, DraftConfig, DraftModelDrafter, generate, greedy_reference,
                               tiny_dense, tiny_moe)

from moespec.speculative.cascade import StaticController, make_controller


def simulate(ctrl, accepted_of, time_of, iterations=500):
    """Run the controller against a deterministic environment; returns (cost ratio vs AR, ks)."""
    total_t, tokens, ks = 0.0, 0, []
    for _ in range(iterations):
        d = ctrl.next()
        acc, t = accepted_of(d.k, d.budget), time_of(d.k, d.budget)
        ctrl.observe(acc, t)
        total_t += t
        tokens += acc + 1
        ks.append(d.k)
    ar = tokens * time_of(0, None)  # autoregressive: one token per K=0 iteration
    return total_t / ar, ks


# Verification of K drafts costs 1 + K/4 plain steps (3x at K=8, the MoE regime of docs/design.md §0).
LOSING = {
    "nothing-accepted": (lambda k, b: 0, lambda k, b: 1.0 + 0.25 * k),
    "some-accepted-but-slow": (None, lambda k, b: 1.0 + 0.35 * k),  # 30% per-token acceptance
}


def geometric_acceptance(alpha=0.3, seed=0):
    """Deterministic stand-in for a drafter whose tokens are each accepted with probability alpha."""
    import random

    rng = random.Random(seed)

    def accepted(k, b):
        n = 0
        while n < k and rng.random() < alpha:
            n += 1
        return n
    return accepted


@pytest.mark.parametrize("k_max", [4, 8])
@pytest.mark.parametrize("env", sorted(LOSING))
def test_losing_speculation_converges_to_k0_within_5_percent(env, k_max):
    accepted_of, time_of = LOSING[env]
    accepted_of = accepted_of or geometric_acceptance()
    ctrl = CascadeController(k_max=k_max)
    cost, ks = simulate(ctrl, accepted_of, time_of, 500)
    assert all(d["k"] == 0 for d in ctrl.decisions)
    assert cost <= 1.05, f"cascade cost {cost:.3f}x autoregressive"
    assert ks[-50:].count(0) >= 45  # speculation is off nearly all the time by the end
    # A static K would have lost badly in the same environment (sanity check of the environment).
    static_cost, _ = simulate(StaticController(k_max), LOSING[env][0] or geometric_acceptance(), time_of, 500)
    assert static_cost > 1.3


def peaked(k_peak, height=1.0):
    """Utility 1 + height * triangle(k) peaking at k_peak: every draft accepted, time shaped to match."""
    def utility(k):
        return 1.0 if k == 0 else 1.0 + height * max(0.0, 1.0 - abs(k - k_peak) / k_peak)
    return (lambda k, b: k), (lambda k, b: (k + 1) / utility(k))


@pytest.mark.parametrize("k_peak", [1, 3, 6])
@pytest.mark.parametrize("k_init", [1, 8])
def test_settles_at_known_peak(k_peak, k_init):
    ctrl = CascadeController(k_max=8, k_init=k_init)
    cost, ks = simulate(ctrl, *peaked(k_peak), iterations=500)
    assert [d["k"] for d in ctrl.decisions[-5:]] == [k_peak] * 5
    # Set phases (16) at the peak; test phases (one trial at the peak, two beside it) keep probing.
    assert ks[-100:].count(k_peak) >= 60
    assert cost < 1.0  # and it pays off


def test_backoff_doubles_set_length_and_resets():
    # Speculation loses for the first 400 iterations, then wins big.
    state = {"it": 0}

    def accepted_of(k, b):
        return k if state["it"] >= 400 else 0

    def time_of(k, b):
        return 1.0 + 0.25 * k

    ctrl = CascadeController(k_max=4)
    for _ in range(700):
        d = ctrl.next()
        ctrl.observe(accepted_of(d.k, d.budget), time_of(d.k, d.budget))
        state["it"] += 1
    lengths = [(d["k"], d["set_iters"]) for d in ctrl.decisions]
    zeros = [n for k, n in lengths if k == 0]
    assert zeros[:5] == [16, 32, 64, 128, 256]
    first_win = next(i for i, (k, _) in enumerate(lengths) if k > 0)
    assert lengths[first_win][1] == 16 and ctrl.zero_streak == 0  # a K>0 decision resets the backoff
    assert all(k > 0 for k, _ in lengths[first_win:])


def test_phase_structure_and_baseline_refresh():
    ctrl = CascadeController(k_max=8, k_init=4)
    _, ks = simulate(ctrl, *peaked(3), iterations=600)
    tests = [t for t in ctrl.trials_log if t["kind"] == "test"]
    for d in ctrl.decisions:
        assert 1 <= len(d["trials"]) <= 4  # up to 4 trials per test phase (the set phase's incumbent included)
    # Set phases at K>0: 16 iterations, doubling (up to 64) while the same point is chosen again.
    sets = [(d["k"], d["set_iters"]) for d in ctrl.decisions if d["k"] > 0]
    assert sets[0][1] == 16 and all(n in (16, 32, 64) for _, n in sets)
    for (k0, n0), (k1, n1) in zip(sets, sets[1:]):
        assert n1 == (min(64, 2 * n0) if k1 == k0 else 16)
    assert sets[-1] == (3, 64)
    baselines = [t["iteration"] for t in ctrl.trials_log if t["kind"] == "baseline"]
    assert baselines[0] == 4 and ks[:4] == [0] * 4  # t_iter(0) measured first, by a 4-iteration K=0 trial
    # The first trial decides whether to speculate at all: it alternates with K=0 iterations.
    first = ctrl.decisions[0]["iteration"]
    assert 1 <= sum(4 < b <= first for b in baselines) <= 4 and ctrl.decisions[0]["k"] > 0
    # Then t_iter(0) stays fresh through single K=0 iterations, one per refresh_every iterations at K>0
    # (in set phases: one falling due during a test phase waits for the set phase).
    later = [b for b in baselines if b > first]
    gaps = [b - a for a, b in zip(later, later[1:])]
    assert len(later) >= 10 and all(ctrl.refresh_every + 1 <= g <= ctrl.refresh_every + 16 for g in gaps), gaps
    assert gaps.count(ctrl.refresh_every + 1) >= len(gaps) // 2
    assert ks[4:].count(0) == len(baselines) - 1
    # Deterministic costs: every trial stops at min_trial_iters iterations (its difference is clear at once).
    assert len(tests) >= 10 and all(t["iterations"] == ctrl.min_trial_iters for t in tests)


def test_joint_k_and_budget_settles_at_peak():
    budgets = [None, 32, 16, 8]

    def utility(k, b):
        if k == 0:
            return 1.0
        tri = max(0.0, 1.0 - abs(k - 4) / 4)
        return 1.0 + tri * (1.2 - 0.2 * abs(budgets.index(b) - 2))  # best at K=4, C=16

    ctrl = make_controller("cascade+budget", 8, budgets=budgets)
    assert ctrl.joint
    simulate(ctrl, lambda k, b: k, lambda k, b: (k + 1) / utility(k, b), iterations=500)
    assert [(d["k"], d["budget"]) for d in ctrl.decisions[-3:]] == [(4, 16)] * 3
    assert ctrl.next().budget in (16, None)  # K=0 iterations never carry a budget


def test_controller_factory_errors():
    with pytest.raises(ValueError):
        make_controller("bogus", 4)
    with pytest.raises(ValueError):
        make_controller("cascade+budget", 4)


@pytest.fixture(scope="module")
def engine_models():
    target = tiny_moe(seed=0, sharp=6.0)
    import copy

    return target, copy.deepcopy(target), tiny_dense(seed=1, sharp=6.0)


def test_generate_with_cascade_turns_losing_speculation_off(engine_models):
    target, _, dense = engine_models
    prompt = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    n = 70
    out, stats = generate(target, prompt, drafter=DraftModelDrafter(dense), max_new_tokens=n, draft=4,
                          controller="cascade", cost_model=lambda r: 1.0 + 0.5 * r.draft_size)
    assert torch.equal(out, greedy_reference(target, prompt, n))  # the controller never changes greedy output
    ctl = stats.controller
    assert ctl["kind"] == "cascade" and ctl["decisions"] and all(d["k"] == 0 for d in ctl["decisions"])
    last = stats.iterations[-30:]
    assert sum(r.k == 0 for r in last) >= 24 and all(r.cost == 1.0 for r in last if r.k == 0)
    assert {r.phase for r in stats.iterations} >= {"baseline", "test", "set"}


def test_generate_with_cascade_keeps_winning_speculation(engine_models):
    target, twin, _ = engine_models
    prompt = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(6))
    n = 150
    out, stats = generate(target, prompt, drafter=DraftModelDrafter(twin), max_new_tokens=n,
                          draft=DraftConfig.chain(6), controller="cascade",
                          cost_model=lambda r: 1.0 + 0.05 * r.draft_size)
    assert torch.equal(out, greedy_reference(target, prompt, n))
    ks = [d["k"] for d in stats.controller["decisions"]]
    assert ks and all(k >= 4 for k in ks)
