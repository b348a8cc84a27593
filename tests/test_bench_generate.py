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
               "expert_bytes_per_token", "match_rate", "identical_prompts", "first_divergence_min"}
RUN_FIELDS = {"mode", "prompt_index", "new_tokens", "wall_time_s", "tokens_per_s", "mean_accepted", "match_rate",
              "first_divergence", "tokens", "summary"}


def test_bench_generate_all_modes(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a b c a b c a b"}\n"x y x y x y"\n')
    rc = cli.main(["bench", "generate", "--threads", "1", "--target", "tiny:qwen3_moe", "--drafter", "prompt-lookup",
                   "--prompts", str(prompts), "--max-new-tokens", "6", "--ks", "2", "--budgets", "4",
                   "--k-max", "2", "--out", str(tmp_path), "--quiet", "--no-warmup"])
    assert rc == 0
    data = json.loads((tmp_path / "bench_generate.json").read_text())
    assert {"command", "date", "device", "git_commit"} <= set(data["meta"])
    assert data["config"]["prompts"] == 2 and data["config"]["target_spec"] == "tiny:qwen3_moe"
    modes = {m["mode"]: m for m in data["modes"]}
    assert list(modes) == ["ar", "static K=2", "budget K=2 C=4", "cascade Kmax=2", "cascade+budget Kmax=2"]
    for m in modes.values():
        assert MODE_FIELDS <= set(m), m
        assert m["new_tokens"] == 12 and m["tokens_per_s"] > 0
        assert m["mean_kept_per_layer"] <= m["mean_union_per_layer"]
    ar = modes["ar"]
    assert ar["speedup"] == 1.0 and ar["match_rate"] == 1.0 and ar["mean_union_per_layer"] == 4.0  # top-4
    # Unbudgeted greedy speculation is lossless: identical to autoregressive decoding.
    for name in ("static K=2", "cascade Kmax=2"):
        assert modes[name]["match_rate"] == 1.0 and modes[name]["first_divergence_min"] is None
    assert modes["budget K=2 C=4"]["mean_kept_per_layer"] <= 4
    assert len(data["runs"]) == 10 and all(RUN_FIELDS <= set(r) for r in data["runs"])
    assert "| mode |" in (tmp_path / "bench_generate.md").read_text()
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
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\n')
    for path in (bad, tmp_path / "missing.jsonl"):
        try:
            g.load_prompts(str(path))
        except ValueError as exc:
            assert str(path) in str(exc)
        else:
            raise AssertionError("bad prompts file accepted")


def test_bench_generate_default_models(tmp_path):
    """The built-in target and draft (when shipped) are the defaults of `bench generate`."""
    from moespec import models

    if not all((p / "model.safetensors").is_file() for p in (models.TARGET_PATH, models.DRAFT_PATH)):
        pytest.skip("built-in models not present")
    rc = cli.main(["bench", "generate", "--threads", "1", "--num-prompts", "1", "--max-new-tokens", "6",
                   "--modes", "static", "--ks", "2", "--out", str(tmp_path), "--quiet", "--no-warmup", "--no-png"])
    assert rc == 0
    data = json.loads((tmp_path / "bench_generate.json").read_text())
    assert data["config"]["target_spec"] == "default" and "draft" in data["config"]["drafter"]
    assert [m["mode"] for m in data["modes"]] == ["ar", "static K=2"]
    assert data["modes"][1]["match_rate"] == 1.0  # lossless without a budget
