"""`moespec bench layer` on CPU: shapes, routing generators, outputs, capture and replay."""
import json

import pytest
import torch

from moespec import cli
from moespec.bench import layer, routing_gen, shapes
from moespec.bench.capture import load_capture


@pytest.fixture(autouse=True)
def _restore_threads():
    """`--threads` sets torch's global thread count; keep it from leaking into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


META_FIELDS = {"command", "date", "device", "git_commit", "torch", "copy_bandwidth_gbps", "timing", "dtype",
               "routing", "cpu_reduced", "shapes", "tokens", "budgets", "policies", "impls"}
ROW_FIELDS = {"model", "H", "I", "E", "k", "scale", "T", "budget", "policy", "routing", "union", "kept", "active",
              "bytes", "floor_us", "impl", "routing_included", "time_us", "gbps", "x_floor", "graph", "rel_err", "note"}


def run(argv):
    return cli.main([str(a) for a in argv])


def test_layer_bench_cpu_writes_json_markdown_png(tmp_path):
    rc = run(["bench", "layer", "--threads", "1", "--shape", "32,16,8,2", "--tokens", "1,6", "--budgets", "none,3",
              "--policies", "substitute,truncate", "--routing", "iid,tree:2", "--impls", "all", "--iters", "1",
              "--warmup", "0",
              "--out", tmp_path, "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "bench_layer.json").read_text())
    assert META_FIELDS <= set(data["meta"])
    assert data["meta"]["timing"] == "wall-clock" and data["meta"]["device"].startswith("CPU")
    assert data["meta"]["command"].startswith("moespec bench layer")
    rows = data["rows"]
    assert rows and all(ROW_FIELDS <= set(r) for r in rows)
    impls = {r["impl"] for r in rows}
    assert {r["routing"] for r in rows} == {"iid", "tree:2:0.8"}
    assert {"moespec", "moespec-cpu", "moespec-cpu-experts", "reference", "hf-eager", "hf-grouped_mm",
            "hf-batched_mm", "torch-grouped_mm"} <= impls
    for r in rows:
        if r["impl"].startswith("moespec") and not r["impl"].startswith("moespec-cpu"):
            assert r["time_us"] is None and r["note"].startswith("n/a")  # no GPU: labelled, not faked
            continue
        assert r["time_us"] > 0 and r["x_floor"] > 0, r
        assert r["rel_err"] < 1e-4, r  # every implementation computes the same budgeted layer
        assert r["kept"] <= r["union"] and r["active"] <= r["kept"]
        if r["budget"] is not None:
            assert r["kept"] <= r["budget"]
    assert {(r["T"], r["budget"], r["policy"]) for r in rows} == {
        (1, None, "-"), (1, 3, "substitute"), (1, 3, "truncate"), (6, None, "-"), (6, 3, "substitute"),
        (6, 3, "truncate")}
    wide = layer.wide_rows(rows)  # bench/bench_layer.py's flat format
    assert len(wide) == 12 and all("reference_us" in w and "hf_grouped_mm_us" in w and "ours_cpu_us" in w
                                   for w in wide)
    assert (tmp_path / "bench_layer.md").read_text().startswith("# moespec bench layer")
    assert (tmp_path / "bench_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_cover_design_table_and_cpu_runs_are_labelled(tmp_path):
    assert {"mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen2-57b-a14b", "qwen3-30b-a3b", "qwen3-235b-a22b",
            "olmoe-1b-7b", "deepseek-v2-lite", "deepseek-v3", "gpt-oss-20b", "gpt-oss-120b"} <= set(shapes.PRESETS)
    assert shapes.PRESETS["qwen3-30b-a3b"].expert_bytes(2) == 3 * 2048 * 768 * 2
    rc = run(["bench", "layer", "--threads", "1", "--models", "qwen3-30b-a3b,gpt-oss-20b", "--reduce", "64",
              "--tokens", "2",
              "--budgets", "none,16", "--impls", "reference,hf-grouped_mm", "--iters", "1", "--warmup", "0",
              "--out", tmp_path, "--no-png", "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "bench_layer.json").read_text())
    assert data["meta"]["cpu_reduced"] and "reduced" in data["meta"]["label"]
    q = [r for r in data["rows"] if r["model"] == "qwen3-30b-a3b"]
    assert q and all((r["H"], r["I"], r["E"], r["k"], r["scale"]) == (32, 8, 128, 8, 64) for r in q)
    g = [r for r in data["rows"] if r["model"] == "gpt-oss-20b"]
    assert any(r["impl"] == "reference" and r["rel_err"] == 0.0 for r in g)
    assert any(r["impl"] == "hf-grouped_mm" and r["note"].startswith("n/a") for r in g)  # layout not supported
    assert "reduced" in (tmp_path / "bench_layer.md").read_text()


def mean_union(gen_spec, T=16, E=64, k=8, n=20):
    g = routing_gen.parse_routing(gen_spec)
    gen = torch.Generator().manual_seed(0)
    return sum(torch.topk(g.logits(T, E, gen), k, dim=-1).indices.unique().numel() for _ in range(n)) / n


def test_routing_generators_shape_and_skew():
    gen = torch.Generator().manual_seed(0)
    for spec in ("iid", "zipf", "zipf:2", "tree", "tree:3:0.5"):
        z = routing_gen.parse_routing(spec).logits(7, 32, gen)
        assert z.shape == (7, 32) and z.dtype == torch.float32 and torch.isfinite(z).all()
    iid = mean_union("iid")
    assert abs(iid - 64 * (1 - (1 - 8 / 64) ** 16)) < 4  # matches the i.i.d. expectation
    assert mean_union("zipf:1.5") < iid - 5  # skew concentrates the union
    assert mean_union("tree:2:0.9") < iid - 5  # shared prefixes share experts
    assert routing_gen.tree_parents(5, 2) == [-1, -1, 0, 0, 1]
    for bad in ("bogus", "zipf:x", "zipf:inf", "zipf:nan", "zipf:-1", "tree:0", "tree:2:1.5", "replay:", "iid:3"):
        with pytest.raises(ValueError):
            routing_gen.parse_routing(bad)


def test_capture_and_replay(tmp_path):
    cap_path = tmp_path / "routing.pt"
    assert run(["capture", "--target", "tiny:qwen3_moe", "--num-prompts", "3", "--out", cap_path]) == 0
    cap = load_capture(cap_path)
    assert cap["num_experts"] == 16 and cap["top_k"] == 4 and cap["num_layers"] == 2
    assert cap["logits"][0].shape == (cap["tokens"], 16) and cap["topk_ids"][1].shape == (cap["tokens"], 4)
    assert run(["bench", "layer", "--threads", "1", "--routing", f"replay:{cap_path}", "--tokens", "4",
                "--budgets", "none,8",
                "--impls", "reference", "--iters", "1", "--warmup", "0", "--out", tmp_path, "--no-png",
                "--quiet"]) == 0
    data = json.loads((tmp_path / "bench_layer.json").read_text())
    assert data["meta"]["routing"].startswith("replay:")
    rows = data["rows"]
    assert rows and all(r["E"] == 16 and r["k"] == 4 and r["model"] == "capture:tiny:qwen3_moe" for r in rows)
    assert all(4 <= r["union"] <= 16 for r in rows)
    # A capture replayed on a shape with another E is refused clearly.
    assert run(["bench", "layer", "--threads", "1", "--routing", f"replay:{cap_path}", "--shape", "32,16,8,2",
                "--tokens", "2",
                "--budgets", "none", "--out", tmp_path, "--quiet"]) == 2
