"""CascadeState: keys, save/load, and warm starts through `generate`."""
import copy
import json

import pytest
import torch

from test_speculative_support import spec_single_thread  # noqa: F401  (autouse)
from test_speculative_support import DraftModelDrafter, PromptLookupDrafter, generate, greedy_reference, tiny_dense, \
    tiny_moe

from moespec.speculative import CascadeState, default_cascade_state, set_default_cascade_state
from moespec.speculative.cascade import CascadeController
from moespec.speculative.cascade_state import cascade_key, model_fingerprint


@pytest.fixture(scope="module")
def models():
    target = tiny_moe(seed=0, sharp=6.0)
    return target, tiny_moe(seed=1, sharp=6.0), tiny_dense(seed=1, sharp=6.0)


def _prompt(seed, n=10):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


LOSING = dict(cost_model=lambda r: 1.0 + 0.5 * r.draft_size)  # the dense drafter is rarely right: K=0 wins


def test_fingerprint_tells_weights_apart_and_is_stable(models):
    a, b, _ = models
    assert model_fingerprint(a) == model_fingerprint(copy.deepcopy(a))
    assert model_fingerprint(a) != model_fingerprint(b)  # same architecture and config, other weights


def test_key_separates_target_drafter_draft_shape_dtype_budgets_and_budget_rule(models):
    a, b, dense = models
    c4 = CascadeController(k_max=4)
    base = cascade_key(a, DraftModelDrafter(dense), {"depth": 4, "branching": 1, "nodes": 4}, c4)
    assert base == cascade_key(a, DraftModelDrafter(dense), {"depth": 4, "branching": 1, "nodes": 4}, c4)
    others = [
        cascade_key(b, DraftModelDrafter(dense), {"depth": 4, "branching": 1, "nodes": 4}, c4),
        cascade_key(a, PromptLookupDrafter(), {"depth": 4, "branching": 1, "nodes": 4}, c4),
        cascade_key(a, DraftModelDrafter(dense), {"depth": 2, "branching": 2, "nodes": 4}, c4),
        cascade_key(a.to(torch.float32), DraftModelDrafter(dense), {"depth": 4, "branching": 1, "nodes": 4}, c4),
        cascade_key(a, DraftModelDrafter(dense), {"depth": 4, "branching": 1, "nodes": 4},
                    CascadeController(k_max=4, budgets=[None, 8])),
        cascade_key(a, DraftModelDrafter(dense), {"depth": 4, "branching": 1, "nodes": 4}, c4,
                    {"policy": "truncate", "candidates": "union"}),
        cascade_key(a, DraftModelDrafter(dense), {"depth": 4, "branching": 1, "nodes": 4}, c4,
                    {"policy": "substitute", "candidates": "all"}),
    ]
    a.to(torch.float64)
    assert all(k != base for k in others) and len({json.dumps(k, sort_keys=True) for k in others}) == len(others)
    assert "cpu" in base["device"] and base["dtype"] == "float64"


def test_generate_warm_starts_from_an_explicit_state(models):
    target, _, dense = models
    state = CascadeState()
    n = 24
    runs = []
    for seed in range(4):
        p = _prompt(seed)
        out, st = generate(target, p, drafter=DraftModelDrafter(dense), max_new_tokens=n, draft=4,
                           controller="cascade", cascade_state=state, **LOSING)
        assert torch.equal(out, greedy_reference(target, p, n))  # warm or cold, output is unchanged
        runs.append(st)
    assert len(state) == 1 and state.requests(state.keys()[0]) == 4
    assert not runs[0].controller["warm"] and all(r.controller["warm"] for r in runs[1:])
    # The first request pays the test phase; the last ones start where speculation was switched off.
    assert runs[0].iterations[0].phase == "baseline"
    assert runs[-1].iterations[0].k == 0 and runs[-1].iterations[0].phase == "set"
    cost = [sum(r.cost for r in st.iterations) / st.new_tokens for st in runs]
    assert cost[-1] < cost[0] and cost[-1] <= 1.0 + 1e-9


def test_no_state_leak_between_models(models):
    target, other, dense = models
    state = CascadeState()
    for _ in range(2):
        generate(target, _prompt(1), drafter=DraftModelDrafter(dense), max_new_tokens=20, draft=4,
                 controller="cascade", cascade_state=state, **LOSING)
    _, st = generate(other, _prompt(1), drafter=DraftModelDrafter(dense), max_new_tokens=20, draft=4,
                     controller="cascade", cascade_state=state, **LOSING)
    assert not st.controller["warm"] and st.iterations[0].phase == "baseline"  # a cold start for the other target
    assert len(state) == 2
    assert {k["target"] for k in state.keys()} == {model_fingerprint(target), model_fingerprint(other)}


def test_save_load_round_trip(tmp_path, models):
    target, _, dense = models
    state = CascadeState()
    for seed in range(3):
        generate(target, _prompt(seed), drafter=DraftModelDrafter(dense), max_new_tokens=20, draft=4,
                 controller="cascade", cascade_state=state, **LOSING)
    path = state.save(tmp_path / "sub" / "cascade.json")
    loaded = CascadeState.load(path)
    assert loaded.to_dict() == json.loads(json.dumps(state.to_dict()))
    # The loaded state continues exactly like the original.
    outs = []
    for s in (state, loaded):
        _, st = generate(target, _prompt(7), drafter=DraftModelDrafter(dense), max_new_tokens=20, draft=4,
                         controller="cascade", cascade_state=s, **LOSING)
        outs.append([(r.k, r.phase) for r in st.iterations])
    assert outs[0] == outs[1]


def test_load_refuses_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a moespec Cascade state"):
        CascadeState.load(p)
    p.write_text(json.dumps({"format": "moespec.cascade_state", "version": 99, "entries": []}))
    with pytest.raises(ValueError, match="version 99"):
        CascadeState.load(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        CascadeState.load(p)
    with pytest.raises(ValueError, match="does not exist"):
        CascadeState.load(tmp_path / "missing.json")
    p.write_text(json.dumps({"format": "moespec.cascade_state", "version": 1,
                             "entries": [{"key": {}, "controller": {"version": 0}}]}))
    with pytest.raises(ValueError, match="entry 0"):
        CascadeState.load(p)


def test_lru_bound_and_forget():
    s = CascadeState(max_entries=2)
    for i in range(3):
        s.put({"target": str(i)}, {"version": 1})
    assert [k["target"] for k in s.keys()] == ["1", "2"]
    s.forget({"target": "1"})
    assert len(s) == 1
    s.forget()
    assert len(s) == 0
    with pytest.raises(ValueError):
        CascadeState(max_entries=0)


def test_process_default_is_used_only_with_device_times(models):
    target, _, dense = models
    fresh = set_default_cascade_state(None)
    try:
        assert default_cascade_state() is fresh and len(fresh) == 0
        # Under a cost model the default is not touched (simulated times are not the device's) ...
        generate(target, _prompt(2), drafter=DraftModelDrafter(dense), max_new_tokens=8, draft=4,
                 controller="cascade", **LOSING)
        assert len(fresh) == 0
        # ... with device times it is, and cascade_state=False keeps a call cold.
        generate(target, _prompt(2), drafter=DraftModelDrafter(dense), max_new_tokens=8, draft=4,
                 controller="cascade", cascade_state=False)
        assert len(fresh) == 0
        generate(target, _prompt(2), drafter=DraftModelDrafter(dense), max_new_tokens=8, draft=4,
                 controller="cascade")
        assert len(fresh) == 1
        generate(target, _prompt(2), drafter=DraftModelDrafter(dense), max_new_tokens=8, draft=4)  # static
        assert len(fresh) == 1
        with pytest.raises(TypeError, match="cascade_state"):
            generate(target, _prompt(2), drafter=DraftModelDrafter(dense), max_new_tokens=8, draft=4,
                     controller="cascade", cascade_state="yes")
    finally:
        set_default_cascade_state(None)


def test_generate_keeps_budget_rules_apart(models):
    """Two streams that differ only in how a budget is applied learn separately."""
    target, _, dense = models
    state = CascadeState()
    for cand in ("union", "all", "union"):
        generate(target, _prompt(5), drafter=DraftModelDrafter(dense), max_new_tokens=8, draft=4,
                 controller="cascade+budget", cascade_state=state, candidates=cand, **LOSING)
    assert len(state) == 2
    by_rule = {state_key["budget_rule"]["candidates"]: state.requests(state_key) for state_key in state.keys()}
    assert by_rule == {"union": 2, "all": 1}
