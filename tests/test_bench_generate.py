"""`moespec bench generate` and `moespec generate` on CPU with tiny random models."""
import json

import pytest
import torch

from moespec import cli
from moespec.bench import generate as g


@pytest.fixture(autouse=True)
def _restore_threads():
    """`--threads` sets torch's global thread count; keep it from leaking into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


MODE_FIELDS = {"mode", "kind", "k", "budget", "prompts", "new_tokens", "wall_time_s", "tokens_per_s", "speedup",
               "mean_accepted", "tokens_per_iteration", "mean_union_per_layer", "mean_kept_per_layer",
               "expert_bytes_per_token", "expert_mb_per_token", "match_rate", "identical_prompts",
               "first_divergence_min", "repeats", "tokens_per_s_min", "tokens_per_s_max", "speedup_min",
               "speedup_max", "speedup_per_repeat", "tokens_per_s_per_repeat", "order"}
RUN_FIELDS = {"mode", "repeat", "prompt_index", "new_tokens", "wall_time_s", "tokens_per_s", "mean_accepted", "match_rate",
              "first_divergence", "tokens", "summary"}


def test_bench_generate_all_modes(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a b c a b c a b"}\n"x y x y x y"\n')
    rc = cli.main(["bench", "generate", "--threads", "1", "--target", "tiny:qwen3_moe", "--drafter", "prompt-lookup",
                   "--prompts", str(prompts), "--max-new-tokens", "6", "--ks", "2", "--budgets", "4",
                   "--k-max", "2", "--repeats", "2", "--out", str(tmp_path), "--quiet", "--no-warmup"])
    assert rc == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 120 for line in out.splitlines() if not line.startswith("wrote ")), out
    assert "budgeted target" in out  # the acceptance note under the table
    data = json.loads((tmp_path / "bench_generate.json").read_text())
    assert {"command", "date", "device", "git_commit"} <= set(data["meta"])
    assert data["config"]["prompts"] == 2 and data["config"]["target_spec"] == "tiny:qwen3_moe"
    assert data["config"]["repeats"] == 2 and data["spread"]["checked"]
    modes = {m["mode"]: m for m in data["modes"]}
    assert list(modes) == ["ar", "static K=2", "budget K=2 C=4", "cascade Kmax=2", "cascade+budget Kmax=2"]
    for m in modes.values():
        assert MODE_FIELDS <= set(m), m
        assert m["new_tokens"] == 2 * 12 and m["tokens_per_s"] > 0 and m["repeats"] == 2
        assert m["speedup_min"] <= m["speedup"] <= m["speedup_max"] and len(m["speedup_per_repeat"]) == 2
        assert m["order"] in ("ok", "?") and m["prompts"] == 2
        assert m["mean_kept_per_layer"] <= m["mean_union_per_layer"]
        assert m["expert_mb_per_token"] == pytest.approx(m["expert_bytes_per_token"] / 1e6)
    ar = modes["ar"]
    assert ar["speedup"] == 1.0 and ar["speedup_per_repeat"] == [1.0, 1.0]
    assert ar["match_rate"] == 1.0 and ar["mean_union_per_layer"] == 4.0  # top-4
    # Unbudgeted greedy speculation is lossless: identical to autoregressive decoding.
    for name in ("static K=2", "cascade Kmax=2"):
        assert modes[name]["match_rate"] == 1.0 and modes[name]["first_divergence_min"] is None
        assert modes[name]["identical_prompts"] == 2
    assert modes["budget K=2 C=4"]["mean_kept_per_layer"] <= 4
    assert len(data["runs"]) == 2 * 5 * 2 and all(RUN_FIELDS <= set(r) for r in data["runs"])
    assert sorted({r["repeat"] for r in data["runs"]}) == [0, 1]
    md = (tmp_path / "bench_generate.md").read_text()
    assert "| mode |" in md and "speed-up min-max" in md and "Ranking rule" in md and "budgeted target" in md
    assert (tmp_path / "bench_generate.png").is_file()


def test_generate_one_prompt(tmp_path, capsys):
    out = tmp_path / "gen.json"
    rc = cli.main(["generate", "--threads", "1", "--target", "tiny:olmoe", "--drafter", "tiny:qwen3_moe",
                   "--prompt", "hello world",
                   "--max-new-tokens", "5", "--k", "3", "--budget", "4", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tokens_per_s" in text and "mean_accepted" in text
    data = json.loads(out.read_text())
    assert data["stats"]["new_tokens"] == 5 and data["stats"]["mode"] == "budget K=3 C=4"
    assert data["stats"]["mean_kept_per_layer"] <= data["stats"]["mean_union_per_layer"]
    assert {"command", "date", "device", "git_commit"} <= set(data["meta"])
    assert len(data["tokens"]) == 5 and data["spec_stats"]["iterations"]


def test_agreement_and_prompts(tmp_path):
    assert g._agreement([1, 2, 3], [1, 2, 3]) == (1.0, None)
    assert g._agreement([1, 5, 3, 4], [1, 2, 3, 4]) == (0.75, 1)
    assert g._agreement([1, 2], [1, 2, 3, 4]) == (0.5, 2)
    assert g.load_prompts(None) == list(g.BUILTIN_PROMPTS)
    assert len(g.load_prompts(None, 2)) == 2
    with pytest.raises(ValueError, match="holds 8"):
        g.load_prompts(None, 100)  # refused, not silently cut to the 8 built-in prompts
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\n')
    for path in (bad, tmp_path / "missing.jsonl"):
        try:
            g.load_prompts(str(path))
        except ValueError as exc:
            assert str(path) in str(exc)
        else:
            raise AssertionError("bad prompts file accepted")


def test_bench_generate_default_models(tmp_path, capsys):
    """The built-in target and draft (when shipped) are the defaults of `bench generate`."""
    from moespec import models

    if not all((p / "model.safetensors").is_file() for p in (models.TARGET_PATH, models.DRAFT_PATH)):
        pytest.skip("built-in models not present")
    rc = cli.main(["bench", "generate", "--threads", "1", "--num-prompts", "1", "--max-new-tokens", "6",
                   "--modes", "static", "--ks", "2", "--repeats", "1", "--out", str(tmp_path), "--quiet",
                   "--no-warmup", "--no-png"])
    assert rc == 0
    data = json.loads((tmp_path / "bench_generate.json").read_text())
    assert data["config"]["target_spec"] == "default" and "draft" in data["config"]["drafter"]
    assert [m["mode"] for m in data["modes"]] == ["ar", "static K=2"]
    assert data["modes"][1]["match_rate"] == 1.0  # lossless without a budget
    assert not data["spread"]["checked"] and data["modes"][1]["order"] is None
    assert "1 repeat" in capsys.readouterr().err  # the ranking is not checked, and the user is told


# ----------------------------------------------------------------------------- synthetic timings (no model)

DEFAULT_MODES = g.build_modes(g.MODE_FAMILIES, [2, 4, 8], [16, 8], 8, 8)  # the default configuration's modes
BASE_S = [0.3, 0.37, 0.44, 0.6, 0.62, 0.47, 0.38, 0.39]  # seconds per prompt of each mode on a quiet machine
ACCEPT = [0, 0.86, 1.13, 1.37, 1.37, 1.94, 1.26, 1.33]


def _grid(factor, n_prompts=2, tokens=64):
    """Runs of DEFAULT_MODES: mode j, repeat r, prompt i takes BASE_S[j] * factor(r, j) seconds."""
    grid = {}
    for r in range(3):
        for j, mode in enumerate(DEFAULT_MODES):
            for i in range(n_prompts):
                toks = list(range(tokens))
                if mode.kind == "budget" and mode.budget == 8:
                    toks = [0] + [t + 1000 for t in toks[1:]]  # diverges at position 1
                its = [{"draft_size": mode.k, "accepted": ACCEPT[j], "expert_bytes": 3_100_000 * (1 + mode.k // 4),
                        "layers": [{"union_size": 4 + mode.k, "kept_size": min(4 + mode.k, mode.budget or 99)}]}
                       ] * (tokens // 2)
                grid[r, j, i] = {"new_tokens": tokens, "wall_time_s": BASE_S[j] * factor(r, j), "tokens": toks,
                                 "mean_accepted": ACCEPT[j], "iterations": its, "prompt_index": i}
    return grid


def _result(factor):
    rows, check = g.aggregate_repeats(DEFAULT_MODES, _grid(factor), 3, 2)
    cfg = {"prompts": 2, "max_new_tokens": 64, "policy": "substitute", "repeats": 3}
    return {"meta": {}, "config": cfg, "modes": rows, "spread": check, "runs": []}


def _cells(table: str) -> dict:
    """{mode: {header: cell}} from a terminal table (columns located by its dashes line)."""
    lines = table.splitlines()
    spans, pos = [], 0
    for dash in lines[1].split("  "):
        spans.append((pos, pos + len(dash)))
        pos += len(dash) + 2
    head = [lines[0][a:b].strip() for a, b in spans]
    rows = {}
    for line in lines[2:]:
        if line.startswith("("):
            continue
        cells = [line[a:b].strip() for a, b in spans]
        rows[cells[0]] = dict(zip(head, cells))
    return rows


def test_slow_phases_hit_all_modes_alike():
    # The machine is 2.5x slower in repeat 1: tokens/s swings, but the per-repeat speed-ups do not.
    result = _result(lambda r, j: (1.0, 2.5, 1.2)[r])
    rows = {r["mode"]: r for r in result["modes"]}
    k4 = rows["static K=4"]
    assert k4["tokens_per_s_max"] / k4["tokens_per_s_min"] == pytest.approx(2.5)
    assert k4["speedup_min"] == pytest.approx(k4["speedup_max"]) == pytest.approx(0.3 / 0.44)
    assert not result["spread"]["flagged"] and all(r["order"] == "ok" for r in rows.values())
    assert g.spread_warning(result) is None
    # With a few % of per-mode noise on top, static K=8 and budget K=8 C=16 (3 % apart) overlap: a tie, no flag.
    result = _result(lambda r, j: (1.0, 2.5, 1.2)[r] * (1 + 0.02 * ((r + j) % 3)))
    ties = [(p["a"], p["b"]) for p in result["spread"]["pairs"] if p["relation"] == "tie"]
    assert ("static K=8", "budget K=8 C=16") in ties and not result["spread"]["flagged"]


def test_noise_that_reorders_modes_is_flagged():
    # Per-mode noise (not shared by the repeat): static K=4 and Cascade swap places between repeats.
    noise = {(0, 2): 0.6, (1, 6): 1.6, (2, 2): 1.3}
    result = _result(lambda r, j: noise.get((r, j), 1.0))
    rows = {r["mode"]: r for r in result["modes"]}
    assert result["spread"]["flagged"]
    assert rows["static K=4"]["order"] == "?" and rows["cascade Kmax=8"]["order"] == "?"
    assert rows["budget K=8 C=16"]["order"] == "ok"  # below every interval it could be confused with
    warn = g.spread_warning(result)
    assert "too wide to rank" in warn and "static K=4" in warn and "--repeats" in warn
    table = g.generate_table(result)
    assert _cells(table)["static K=4"]["order"] == "?"
    md = g.generate_markdown(dict(result, meta={"device": "cpu", "command": "moespec bench generate",
                                                 "date": "-", "git_commit": "-", "torch": "-",
                                                 "transformers": "-", "timing": "wall-clock"},
                                  config=dict(result["config"], target="t", drafter="d")))
    assert "**Warning:**" in md and "| ? |" in md


def test_table_fits_120_columns_with_dashes_for_the_reference_row():
    result = _result(lambda r, j: (1.0, 1.05, 0.97)[r] * (1 + 0.02 * ((r + j) % 3)))
    table = g.generate_table(result)
    assert max(len(line) for line in table.splitlines()) <= 120, table
    cells = _cells(table)
    assert list(cells) == [m.name for m in DEFAULT_MODES]
    ar = cells["ar"]
    for col in ("accept", "match", "1st div"):
        assert ar.get(col, "-") == "-", (col, ar)
    assert ar["speed-up"] == "1.00" and ar["order"] == "ok"
    assert cells["static K=2"]["match"] == "100%" and cells["static K=2"].get("1st div", "none") == "none"
    assert cells["budget K=8 C=8"]["match"] == "1.6%"  # 1 of 64 tokens
    assert cells["static K=2"]["MB/tok"] == "1.55"  # MB (3.1e6 bytes per iteration, 2 tokens each), not bytes
    # --wide: every column, as in the Markdown file.
    wide = g.generate_table(result, max_width=None)
    assert "tok/it" in wide and "not shown" not in wide
    notes = g.generate_notes(result)
    assert any("budgeted target" in n and "budget K=8 C=8 accepts 1.94" in n for n in notes)
    assert all(len(line) <= 120 for line in g.report.wrap_notes(notes).splitlines())


# ----------------------------------------------------------------------------- argument errors

PARSER_ERRORS = [
    ["--repeats", "0"], ["--repeats", "-2"], ["--repeats", "x"], ["--num-prompts", "0"], ["--num-prompts", "-3"],
    ["--max-new-tokens", "-1"], ["--budget-k", "0"], ["--k-max", "-1"], ["--ks", "0,2"], ["--budgets", "0"],
    ["--budgets", "8,8"], ["--budgets", "none"], ["--requests", "0"],
]


@pytest.mark.parametrize("argv", PARSER_ERRORS, ids=" ".join)
def test_bench_generate_parser_rejects(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "generate", *argv])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


RUNTIME_ERRORS = [
    (["--num-prompts", "100"], "holds 8"),  # the built-in set: refused, not cut to 8 silently
    (["--ks", "2,2"], "more than once"),
    (["--modes", "static", "--budgets", "8"], "--budgets applies"),
    (["--target", "tiny:qwen3_moe", "--budgets", "3"], "top-k"),  # validate_budget: C >= top-k (4)
]


@pytest.mark.parametrize("argv,message", RUNTIME_ERRORS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bench_generate_runtime_rejects(argv, message, capsys, tmp_path):
    # --max-new-tokens 2: should the check ever regress, the test runs a short bench instead of the full default one.
    assert cli.main(["bench", "generate", "--out", str(tmp_path), "--quiet", "--max-new-tokens", "2", "--no-warmup",
                     "--no-png", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moespec: error:") and message in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_num_prompts_beyond_a_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"a b"\n"c d"\n')
    assert cli.main(["bench", "generate", "--target", "tiny:qwen3_moe", "--prompts", str(prompts),
                     "--num-prompts", "3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(prompts) in err and "holds 2" in err


def test_bench_generate_stream_keeps_cascade_state_per_repeat(tmp_path, capsys):
    rc = cli.main(["bench", "generate", "--threads", "1", "--target", "tiny:qwen3_moe", "--drafter", "prompt-lookup",
                   "--num-prompts", "2", "--requests", "5", "--max-new-tokens", "6", "--modes", "cascade",
                   "--ks", "2", "--repeats", "2", "--out", str(tmp_path), "--quiet", "--no-warmup", "--no-png"])
    assert rc == 0
    assert "a stream of 5 requests" in capsys.readouterr().out
    data = json.loads((tmp_path / "bench_generate.json").read_text())
    assert data["config"]["requests"] == 5 and data["config"]["prompts"] == 2
    runs = [r for r in data["runs"] if r["mode"] == "cascade Kmax=2"]
    assert len(runs) == 2 * 5 and [r["prompt_index"] for r in runs[:5]] == [0, 1, 0, 1, 0]
    # Each repeat's stream starts cold and every later request continues warm.
    for rep in (0, 1):
        warm = [r["controller"]["warm"] for r in runs if r["repeat"] == rep]
        assert warm == [False, True, True, True, True]
    assert all(not r["controller"].get("warm") for r in data["runs"] if r["mode"] == "ar")
    modes = {m["mode"]: m for m in data["modes"]}
    assert modes["cascade Kmax=2"]["match_rate"] == 1.0 and modes["cascade Kmax=2"]["new_tokens"] == 2 * 5 * 6
    assert "a stream of 5 requests" in (tmp_path / "bench_generate.md").read_text()


def test_generate_cascade_state_file(tmp_path, capsys):
    path = tmp_path / "state" / "cascade.json"
    argv = ["generate", "--threads", "1", "--target", "tiny:qwen3_moe", "--drafter", "prompt-lookup",
            "--controller", "cascade", "--max-new-tokens", "8", "--cascade-state", str(path)]
    assert cli.main(argv) == 0 and "cold start" in capsys.readouterr().out
    assert cli.main(argv) == 0 and "warm start" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["format"] == "moespec.cascade_state" and data["entries"][0]["requests"] == 2
    path.write_text('{"format": "moespec.cascade_state", "version": 0}')
    assert cli.main(argv) == 2 and "version 0" in capsys.readouterr().err
    assert cli.main(argv[:5] + ["--cascade-state", str(path)]) == 2  # a static run has no Cascade state
    assert "--controller cascade" in capsys.readouterr().err


def test_cascade_targets_lines():
    def row(mode, kind, sp, lo, hi):
        return {"mode": mode, "kind": kind, "speedup": sp, "speedup_min": lo, "speedup_max": hi}
    losing = {"modes": [row("ar", "ar", 1.0, 1.0, 1.0), row("static K=2", "static", 0.85, 0.8, 0.9),
                        row("cascade Kmax=8", "cascade", 0.985, 0.97, 1.0),
                        row("cascade+budget Kmax=8", "cascade+budget", 0.95, 0.9, 0.97)]}
    lines = g.cascade_targets(losing)
    assert "against >= 0.980 for ar" in lines[0] and "met" in lines[0]
    assert "missed by 0.030" in lines[1]
    assert "cascade+budget >= cascade: 0.950 against 0.985, missed by 0.035" in lines[2] and "overlap" in lines[2]
    winning = {"modes": [row("ar", "ar", 1.0, 1.0, 1.0), row("static K=4", "static", 1.5, 1.45, 1.55),
                         row("cascade Kmax=8", "cascade", 1.44, 1.4, 1.5)]}
    (line,) = g.cascade_targets(winning)
    assert "against >= 1.425 for static K=4 (0.95 x 1.50): met" in line
    assert g.cascade_targets({"modes": winning["modes"][:2]}) == []  # no Cascade row


def test_bench_generate_trees_coverage_and_widening(tmp_path, capsys):
    rc = cli.main(["bench", "generate", "--threads", "1", "--target", "tiny:qwen3_moe", "--drafter", "prompt-lookup",
                   "--prompts", str(_prompts(tmp_path)), "--max-new-tokens", "6", "--modes", "static,tree,budget",
                   "--ks", "2", "--trees", "4", "--budgets", "4", "--coverages", "0.9", "--widen", "3",
                   "--repeats", "1", "--out", str(tmp_path), "--quiet", "--no-warmup"])
    assert rc == 0
    data = json.loads((tmp_path / "bench_generate.json").read_text())
    modes = {m["mode"]: m for m in data["modes"]}
    assert list(modes) == ["ar", "static K=2", "tree 4 nodes", "budget K=2 C=4", "budget K=2 cov=0.9 C<=4"]
    cfg = data["config"]
    assert cfg["experts"] == "moespec" and cfg["experts_backend"].startswith("cpu (C++ CPU kernels")
    assert cfg["widen"]["factor"] == 3 and cfg["widen"]["widened_size"] == 3 * cfg["widen"]["intermediate_size"]
    # Trees are lossless too, on the widened model and moespec's experts.
    assert modes["tree 4 nodes"]["match_rate"] == 1.0
    tree_runs = [r for r in data["runs"] if r["mode"] == "tree 4 nodes"]
    assert tree_runs and all(r["summary"]["iterations"] for r in tree_runs)
    assert modes["budget K=2 cov=0.9 C<=4"]["mean_kept_per_layer"] <= 4
    # The widened experts' bytes are what the statistics count: 3x those of an unwidened run.
    rc = cli.main(["bench", "generate", "--threads", "1", "--target", "tiny:qwen3_moe", "--drafter", "prompt-lookup",
                   "--prompts", str(_prompts(tmp_path)), "--max-new-tokens", "6", "--modes", "static", "--ks", "2",
                   "--repeats", "1", "--out", str(tmp_path), "--name", "narrow", "--quiet", "--no-warmup"])
    assert rc == 0
    narrow = {m["mode"]: m for m in json.loads((tmp_path / "narrow.json").read_text())["modes"]}
    assert modes["ar"]["expert_bytes_per_token"] == pytest.approx(3 * narrow["ar"]["expert_bytes_per_token"])


def _prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a b c a b c a b"}\n"x y x y x y"\n')
    return path


def test_presets_fill_only_what_the_command_line_leaves_open():
    import argparse

    args = argparse.Namespace(preset="memory-bound", argv=["bench", "generate", "--preset", "memory-bound",
                                                          "--repeats", "5", "--ks=4"],
                              repeats=5, ks=[4], target="default", widen=None)
    g.apply_preset(args)
    s = g.PRESETS["memory-bound"]["settings"]
    assert args.repeats == 5 and args.ks == [4]  # given on the command line
    assert args.target == "fine" and args.widen == s["widen"] and args.dtype == "bf16" and args.experts == "moespec"
    full = argparse.Namespace(preset="memory-bound-full", argv=[])
    g.apply_preset(full)
    assert "tree" in full.modes and full.trees and full.coverages and full.repeats >= 3


@pytest.mark.parametrize("argv, message", [
    (["--coverages", "0.9", "--modes", "static"], "--coverages adds budget modes"),
    (["--coverages", "1.5"], "fractions in (0, 1]"),
    (["--experts", "fast"], "invalid choice"),
    (["--widen", "0"], ">= 1"),
])
def test_bench_generate_new_flags_reject(argv, message, capsys, tmp_path):
    rc = None
    try:
        rc = cli.main(["bench", "generate", "--target", "tiny:qwen3_moe", "--drafter", "prompt-lookup",
                       "--out", str(tmp_path), "--quiet"] + argv)
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_markdown_states_how_the_target_ran():
    from moespec.bench.generate import _target_lines

    cfg = {"experts": "moespec", "experts_backend": "cpu (C++ CPU kernels, avx2)", "dtype": "bf16",
           "widen": {"intermediate_size": 64, "widened_size": 8192, "factor": 128.0,
                     "expert_bytes_after": 6291456, "total_expert_bytes": 3221225472},
           "forward_ms_trained_width": {"1": 5.0, "9": 15.0}, "forward_ms_widened": {"1": 20.0, "9": 90.0},
           "expert_share_of_forward": {"1": 0.75, "9": 0.833}}
    text = "\n".join(_target_lines(cfg))
    assert "run by cpu (C++ CPU kernels, avx2); dtype bf16" in text
    assert "64 -> 8192 (x128" in text and "6.29 MB per expert" in text and "3.22 GB" in text
    assert "T=1: 5.0 ms at the trained width, 20.0 ms widened (75 %" in text
    assert "T=9: 15.0 ms at the trained width, 90.0 ms widened (83 %" in text
    assert _target_lines({}) == []
