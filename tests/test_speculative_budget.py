"""Budgets apply where intended: verification forwards only (kept <= C), never prefill or plain decode.

Goes through moespec.integrations; skipped with a reason when that module is not importable yet.
"""
import json

import pytest
import torch

from test_speculative_support import spec_single_thread  # noqa: F401  (autouse)
from test_speculative_support import DraftConfig, DraftModelDrafter, generate, greedy_reference, perturbed_copy, tiny_moe

from moespec.speculative.budget import integration_available

pytestmark = pytest.mark.skipif(
    not integration_available(),
    reason="moespec.integrations (patch / expert_budget / get_handle) is not importable yet")

E = 16  # experts per layer in tiny_moe


@pytest.fixture(scope="module")
def target_and_drafter():
    target = tiny_moe(seed=0, sharp=6.0)
    return target, perturbed_copy(target, noise=0.3)


def _prompt(seed, n=10):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _check_unbudgeted(layers):
    assert layers, "routing stats missing"
    for ls in layers:
        assert not ls["budgeted"] and ls["kept_size"] == ls["union_size"]


@pytest.mark.parametrize("shape", [DraftConfig.chain(4), DraftConfig.tree(depth=3, branching=3, nodes=8)])
def test_budget_caps_verification_only(target_and_drafter, shape):
    from moespec.integrations import get_handle

    target, drafter = target_and_drafter
    out, stats = generate(target, _prompt(1), drafter=DraftModelDrafter(drafter), max_new_tokens=16,
                          draft=shape, budget=5)
    assert get_handle(target) is None  # our temporary patch is removed
    _check_unbudgeted(stats.prefill["layers"])
    assert stats.prefill["budgeted"] is False
    verified = [r for r in stats.iterations if r.draft_size > 0]
    assert verified
    for r in verified:
        assert r.budget == 5 and len(r.layers) == target.config.num_hidden_layers
        for ls in r.layers:
            assert ls["kept_size"] <= 5 and ls["kept_size"] <= ls["union_size"] and ls["budget"] == 5
        assert r.expert_bytes == sum(ls["expert_bytes"] for ls in r.layers) > 0
    # With 4 of 16 experts per token, a multi-token verification's union usually exceeds 5.
    assert any(ls["union_size"] > 5 and ls["budgeted"] for r in verified for ls in r.layers)
    json.dumps(stats.to_dict())


def test_per_layer_budget_and_plain_decode_unbudgeted(target_and_drafter):
    target, drafter = target_and_drafter
    _, stats = generate(target, _prompt(2), drafter=DraftModelDrafter(drafter), max_new_tokens=12, draft=3,
                        budget=[4, 6])
    for r in stats.iterations:
        if r.draft_size > 0:
            assert [ls["kept_size"] <= c for ls, c in zip(r.layers, [4, 6])] == [True, True]
    # K=0 iterations are one-token decodes: never budgeted even when a budget is given.
    _, stats = generate(target, _prompt(3), drafter=DraftModelDrafter(drafter), max_new_tokens=6, draft=0,
                        budget=5)
    for r in stats.iterations:
        assert r.budget is None
        _check_unbudgeted(r.layers)


def test_budget_at_least_union_is_lossless(target_and_drafter):
    """A budget is a cap, never a perturbation: C = E changes nothing."""
    target, drafter = target_and_drafter
    prompt = _prompt(4)
    ref = greedy_reference(target, prompt, 16)
    out, stats = generate(target, prompt, drafter=DraftModelDrafter(drafter), max_new_tokens=16,
                          draft=DraftConfig.tree(depth=3, branching=2, nodes=6), budget=E)
    assert torch.equal(out, ref)
    assert all(ls["kept_size"] == ls["union_size"] for r in stats.iterations for ls in (r.layers or []))


def test_routing_stats_without_budget(target_and_drafter):
    target, drafter = target_and_drafter
    prompt = _prompt(5)
    out, stats = generate(target, prompt, drafter=DraftModelDrafter(drafter), max_new_tokens=10, draft=4,
                          routing_stats=True)
    assert torch.equal(out, greedy_reference(target, prompt, 10))
    for r in stats.iterations:
        _check_unbudgeted(r.layers)


def test_cascade_budget_picks_from_candidates(target_and_drafter):
    target, drafter = target_and_drafter
    from moespec.speculative.engine import default_budget_choices

    choices = default_budget_choices(target)
    assert choices[0] is None and all(c >= 4 for c in choices[1:])  # never below top-k
    _, stats = generate(target, _prompt(6), drafter=DraftModelDrafter(drafter), max_new_tokens=60, draft=4,
                        controller="cascade+budget", cost_model=lambda r: 1.0 + 0.1 * r.draft_size)
    assert stats.controller["kind"] == "cascade+budget" and stats.controller["budgets"] == choices
    for r in stats.iterations:
        assert r.budget in choices
        if r.budget is not None:
            assert all(ls["kept_size"] <= r.budget for ls in r.layers)


def test_cascade_budget_tightens_when_experts_dominate_cost(target_and_drafter):
    """Cost = fixed part + experts read: with an exact-copy drafter (acceptance barely hurt by the
    budget, plenty of tokens per iteration), the joint controller should pick a budget."""
    import copy

    target, _ = target_and_drafter
    twin = copy.deepcopy(target)

    def cost(r):
        if r.draft_size == 0:
            return 1.0
        return 0.5 + sum(ls["kept_size"] for ls in r.layers) / 8.0  # one token reads 4 experts x 2 layers

    _, stats = generate(target, _prompt(6), drafter=DraftModelDrafter(twin), max_new_tokens=120, draft=6,
                        controller="cascade+budget", cost_model=cost)
    decisions = stats.controller["decisions"]
    assert decisions and decisions[0]["k"] > 0 and decisions[0]["budget"] is not None
    tried = {t["budget"] for t in decisions[0]["trials"]}
    assert None in tried and len(tried) >= 2  # it compared the unbudgeted run with budgets
