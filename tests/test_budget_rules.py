"""Budget rules: the sweep that prices them, its recommendation, ``budget="auto"``, and the
statistics the sweep reads (experts read, routing weight dropped)."""
import json

import pytest
import torch

import moespec
from moespec.integrations import AUTO_RULE, BudgetConfig, auto_budget
from moespec.integrations.auto_budget import AutoRule, auto_config
from moespec.integrations.tiny import tiny_model
from moespec.models import budget_sweep as bs

pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- recommendation


def _row(shape, rule, tpv, match, nbytes):
    return {"shape": shape, "rule": rule.to_dict(), "tokens_per_verification": tpv, "token_match_rate": match,
            "expert_bytes_per_token": nbytes, "heldout_ppl": 10.0, "mean_first_divergence": 4.0, "layers": []}


def _synthetic():
    none = bs.Rule("none")
    c8 = bs.Rule("fixed", budget=8)
    c6 = bs.Rule("fixed", budget=6, policy="truncate", candidates="union")
    t9 = bs.Rule("coverage", coverage=0.9)
    rows = []
    for shape, base_tpv in (("chain", 3.0), ("tree", 3.5)):
        rows.append(_row(shape, none, base_tpv, 1.0, 100.0))
        rows.append(_row(shape, c8, base_tpv * 0.99, 0.97, 80.0))          # passes, 80 %
        rows.append(_row(shape, t9, base_tpv * 0.985, 0.96, 70.0 if shape == "chain" else 75.0))  # passes, 72.5 %
    # Cheapest of all, but fails the acceptance bar on the tree only.
    rows.append(_row("chain", c6, 3.0, 0.99, 50.0))
    rows.append(_row("tree", c6, 3.5 * 0.97, 0.99, 50.0))
    return {"shapes": [{"name": "chain", "shape": {}, "nodes": 8, "chunk": 8, "max_union": 20},
                       {"name": "tree", "shape": {}, "nodes": 16, "chunk": 16, "max_union": 22}], "rows": rows}


def test_recommend_picks_the_cheapest_rule_that_passes_on_every_shape():
    rec = bs.recommend(_synthetic())
    assert rec["rule"]["name"] == "tau=0.9 substitute/all"
    assert rec["relative_bytes"] == pytest.approx(0.725)
    assert set(rec["per_shape"]) == {"chain", "tree"}
    fams = rec["cheapest_per_family"]
    assert fams["fixed C substitute/all"]["rule"]["budget"] == 8
    assert "fixed C truncate/union" not in fams  # failed on one shape


def test_recommend_applies_both_bars():
    res = _synthetic()
    # Agreement below 95 % on one shape disqualifies the coverage rule; C=8 is next.
    for r in res["rows"]:
        if r["rule"]["kind"] == "coverage" and r["shape"] == "tree":
            r["token_match_rate"] = 0.94
    assert bs.recommend(res)["rule"]["budget"] == 8
    # Nothing passes: no recommendation, with a reason.
    for r in res["rows"]:
        if r["rule"]["kind"] != "none":
            r["tokens_per_verification"] = 1.0
    rec = bs.recommend(res)
    assert rec["rule"] is None and "no budgeted rule" in rec["reason"]


def test_merge_per_shape_reports(tmp_path):
    res = _synthetic()
    parts = []
    for shape in ("chain", "tree"):
        parts.append({"command": f"sweep {shape}", "date": "d", "device": "cpu", "git_commit": "c",
                      "config": {"prompts": 1, "max_new": 4, "windows": 1},
                      "result": {"shapes": [s for s in res["shapes"] if s["name"] == shape],
                                 "rows": [r for r in res["rows"] if r["shape"] == shape]}})
    # Per shape alone the truncate/union C=6 rule passes the chain; merged, the tree rules it out.
    assert bs.recommend(parts[0]["result"])["rule"]["name"] == "C=6 truncate/union"
    merged = bs.merge_reports(parts)
    assert merged["recommendation"]["rule"]["name"] == "tau=0.9 substitute/all"
    assert merged["command"] == "sweep chain ; sweep tree"
    with pytest.raises(ValueError, match="more than one report"):
        bs.merge_reports([parts[0], parts[0]])
    other = dict(parts[1], config={"prompts": 2, "max_new": 4, "windows": 1})
    with pytest.raises(ValueError, match="different settings"):
        bs.merge_reports([parts[0], other])
    bs.write_report(merged, tmp_path)
    assert (tmp_path / "budget_sweep.md").read_text().count("## ") == 2


def test_compare_candidates_pairs_equal_caps():
    res = _synthetic()
    for c, (m_all, m_union) in {7: (0.5, 0.7), 8: (0.9, 0.6), 9: (0.4, 0.8)}.items():
        for cand, m in (("all", m_all), ("union", m_union)):
            res["rows"].append(_row("chain", bs.Rule("fixed", budget=c, candidates=cand), 2.0, m, 90.0))
    cmp_ = bs.compare_candidates(res)
    e = cmp_["substitute / chain"]
    # The later C=8 "all" row replaces _synthetic's; C=7, 8 and 9 pair up.
    assert e["caps"] == 3 and (e["all_wins_match"], e["union_wins_match"]) == (1, 2)
    assert e["all_token_match_rate"] == pytest.approx(0.6) and e["union_token_match_rate"] == pytest.approx(0.7)
    assert "truncate / chain" not in cmp_  # no truncate pair with both candidate sets


def test_sweep_rules_cover_every_cap_policy_and_candidate_set():
    rules = bs.sweep_rules(4, 9, coverages=(0.9, 0.99))
    assert rules[0].kind == "none"
    fixed = [r for r in rules if r.kind == "fixed"]
    assert sorted({r.budget for r in fixed}) == [4, 5, 6, 7, 8]
    assert len(fixed) == 5 * 4 and len([r for r in rules if r.kind == "coverage"]) == 2 * 4
    assert {(r.policy, r.candidates) for r in fixed} == {(p, c) for p in bs.POLICIES for c in bs.CANDIDATE_SETS}
    cfg = bs.Rule("coverage", coverage=0.9, policy="truncate", candidates="union").config()
    assert (cfg.budget, cfg.coverage, cfg.policy, cfg.candidates) == (None, 0.9, "truncate", "union")


def test_report_and_plot(tmp_path):
    res = _synthetic()
    rep = {"command": "x", "device": "cpu", "date": "d", "git_commit": "c", "result": res,
           "config": {"prompts": 1, "max_new": 4, "windows": 1}, "recommendation": bs.recommend(res)}
    md = bs.to_markdown(rep)
    assert "Recommended (`budget=\"auto\"`): tau=0.9 substitute/all" in md and "## tree" in md
    path = bs.plot_sweep(rep, tmp_path / "s.png")
    if path is not None:  # matplotlib present
        assert path.stat().st_size > 1000


def test_sweep_runs_on_the_shipped_models():
    """A tiny real sweep: per-layer caps hold, the baseline agrees with itself, numbers are sane."""
    from moespec.models import load_draft, load_target, load_tokenizer
    from moespec.models.evaluate import heldout_ids, make_prompts
    from moespec.speculative import DraftConfig

    target, draft = load_target(), load_draft()
    stream = heldout_ids(load_tokenizer(), 2 * 256 + 1)
    prompts = make_prompts(stream, 1, 24, seed=3)
    k = target.config.num_experts_per_tok
    res = bs.run_sweep(target, draft, prompts, stream, [("chain", DraftConfig.chain(6))], max_new=8, windows=1,
                       coverages=(), caps=[k])
    rows = res["rows"]
    assert len(rows) == 1 + 4 and rows[0]["rule"]["kind"] == "none"
    assert rows[0]["token_match_rate"] == 1.0 and res["shapes"][0]["max_union"] > k
    for r in rows:
        assert 0.0 <= r["token_match_rate"] <= 1.0 and r["expert_bytes_per_token"] > 0
        assert r["heldout_ppl"] > 1.0 and r["tokens_per_verification"] >= 1.0
        if r["rule"]["kind"] == "fixed":
            assert all(L["mean_read"] <= L["mean_kept"] <= k for L in r["layers"])
            # C = k binds somewhere (the union of 7 tokens is larger), and then drops routing weight.
            assert any(L["bind_rate"] > 0 and L["dropped_mass"] > 0 for L in r["layers"])
    json.dumps(res)  # JSON-ready


# ----------------------------------------------------------------------------- budget="auto"


def test_auto_rule_resolves_per_model():
    model = tiny_model("qwen3_moe", seed=1)
    cfg = auto_budget(model)
    assert isinstance(cfg, BudgetConfig)
    assert (cfg.coverage, cfg.policy, cfg.candidates) == (AUTO_RULE.coverage, AUTO_RULE.policy, AUTO_RULE.candidates)
    handle = moespec.patch(model, budget="auto")
    try:
        d = handle.default
        k = model.config.num_experts_per_tok
        assert d.caps == tuple(AUTO_RULE.caps([k] * len(handle.layers)))
        assert (d.coverage, d.policy, d.candidates) == (AUTO_RULE.coverage, AUTO_RULE.policy, AUTO_RULE.candidates)
    finally:
        handle.unpatch()


def test_auto_rule_forms():
    fixed = AutoRule(cap_per_k=2.5, coverage=None, policy="truncate", candidates="union", measured_on="t")
    assert fixed.caps([4, 2, 1]) == [10, 5, 3][:2] + [max(1, 3)]
    cfg = auto_config([4, 4], rule=fixed)
    assert (cfg.budget, cfg.coverage, cfg.policy, cfg.candidates) == (10, None, "truncate", "union")
    assert auto_config([4, 2], rule=fixed).budget == [10, 5]
    assert "2.5 x top-k" in fixed.describe()


def test_auto_budget_in_generate_and_errors():
    from moespec import speculative as spec

    model = tiny_model("olmoe", seed=2)
    prompt = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    _, st = spec.generate(model, prompt, max_new_tokens=6, draft=4, budget="auto",
                          drafter=spec.PromptLookupDrafter())
    assert st.to_dict()["config"]["budget"]["coverage"] == AUTO_RULE.coverage
    with pytest.raises(ValueError, match="'auto'"):
        spec.generate(model, prompt, max_new_tokens=2, budget="fast")
    with pytest.raises(ValueError, match="candidates must be one of"):
        spec.generate(model, prompt, max_new_tokens=2, budget=4, candidates="most")
    with pytest.raises(ValueError, match="'auto'"):
        moespec.patch(model, budget="cheap")
    assert moespec.integrations.get_handle(model) is None


def test_budget_config_rule_in_generate_matches_the_patch():
    """A whole rule (coverage + candidates) passed to generate runs exactly what expert_budget runs."""
    from moespec import speculative as spec

    model = tiny_model("qwen3_moe", seed=7)
    prompt = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    rule = BudgetConfig(None, "truncate", "prob", 0.6, None, "auto", "union")
    _, st = spec.generate(model, prompt, max_new_tokens=8, draft=6, budget=rule, drafter=spec.PromptLookupDrafter(),
                          routing_stats=True)
    layers = [L for it in st.iterations if it.draft_size > 0 for L in it.layers]
    assert layers and any(L["budgeted"] and L["kept_size"] < L["union_size"] for L in layers)
    # truncate + union: the kept set lies inside the union and nothing outside it is read
    assert all(L["read_size"] <= L["kept_size"] <= L["union_size"] for L in layers)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("policy,candidates", [("truncate", "union"), ("substitute", "all"), ("truncate", "all")])
def test_read_experts_and_dropped_mass(policy, candidates):
    model = tiny_model("qwen3_moe", seed=5)
    tokens = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    handle = moespec.patch(model)
    routers = [getattr(model.get_submodule(i.name), "gate") for i in handle.layers]
    seen = []
    hook = routers[0].register_forward_hook(lambda m, a, out: seen.append(tuple(o.detach().clone() for o in out)))
    try:
        with torch.no_grad():
            with moespec.expert_budget(model, None):
                model(tokens)  # the unbudgeted routing of layer 0 (its input does not depend on the budget)
            hook.remove()
            k = model.config.num_experts_per_tok
            with moespec.expert_budget(model, k, policy=policy, candidates=candidates):
                model(tokens)
        layer = handle.stats.last().layers[0]
        _, weights, ids = seen[0]
        assert layer.budgeted and layer.kept_size == k < layer.union_size
        kept = set(layer.kept_experts)
        w = weights.double().abs()
        lost = sum(float(w[t, s]) for t in range(ids.shape[0]) for s in range(ids.shape[1])
                   if int(ids[t, s]) not in kept)
        assert layer.dropped_mass == pytest.approx(lost / float(w.sum()), rel=1e-5)
        assert 0 < layer.read_size <= layer.kept_size
        if policy == "truncate":
            # Only surviving pairs read an expert: the kept union experts some token routed to.
            union = {int(e) for e in ids.reshape(-1)}
            assert layer.read_size == len(kept & union)
        assert layer.expert_bytes == layer.read_size * layer.bytes_per_expert
        d = layer.to_dict()
        assert d["read_size"] == layer.read_size and d["dropped_mass"] == pytest.approx(layer.dropped_mass, abs=1e-6)
    finally:
        hook.remove()
        handle.unpatch()


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv,msg", [
    (["bench", "quality", "--shapes", "cone"], "--shapes takes a comma list of chain, tree"),
    (["bench", "quality", "--coverages", "0.9,x"], "--coverages takes a comma list"),
    (["bench", "quality", "--coverages", "1.5"], "--coverages must lie in (0, 1]"),
    (["generate", "--budget", "fast"], "expected an integer budget >= 1 or 'auto'"),
    (["generate", "--budget", "6", "--candidates", "most"], "invalid choice"),
])
def test_cli_rejects_bad_budget_arguments(argv, msg, capsys, tmp_path):
    from moespec import cli

    try:  # argparse errors exit; errors found while the command runs return the code
        rc = cli.main(argv + (["--out", str(tmp_path)] if argv[0] == "bench" else []))
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert msg in capsys.readouterr().err


def test_cli_generate_with_auto_budget_and_candidates(capsys, tmp_path):
    from moespec import cli

    out = tmp_path / "g.json"
    assert cli.main(["generate", "--budget", "auto", "--k", "6", "--max-new-tokens", "8", "--json", str(out)]) == 0
    assert cli.main(["generate", "--budget", "4", "--candidates", "union", "--policy", "truncate", "--k", "6",
                     "--max-new-tokens", "8"]) == 0
    rec = json.loads(out.read_text())
    assert rec["stats"]["new_tokens"] == 8 and rec["stats"]["mode"].startswith("budget")
    assert rec["spec_stats"]["config"]["budget"]["coverage"] == AUTO_RULE.coverage


def test_bench_generate_passes_candidates_on(tmp_path, capsys):
    """`bench generate --candidates` is accepted and recorded with the run (the engine-level effect of
    the candidate set is tested in test_hf_budget_semantics and test_selection)."""
    from moespec import cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"a b c a b c a b"\n')
    for cand in ("all", "union"):
        out = tmp_path / cand
        rc = cli.main(["bench", "generate", "--threads", "1", "--target", "tiny:qwen3_moe", "--drafter", "prompt-lookup",
                       "--prompts", str(prompts), "--max-new-tokens", "6", "--ks", "4", "--budgets", "4",
                       "--modes", "budget", "--repeats", "1", "--out", str(out), "--quiet", "--no-warmup",
                       "--candidates", cand])
        assert rc == 0
        data = json.loads((out / "bench_generate.json").read_text())
        assert data["config"]["candidates"] == cand
