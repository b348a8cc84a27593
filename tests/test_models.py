"""The shipped demo models: load offline, have the documented sizes, and have learned the corpus."""
import math

import pytest
import torch

from moespec import models
from moespec.models import corpus, train

# Random weights give a held-out perplexity near the vocabulary size (4096); the shipped target
# must be far below it (training.json records the full-evaluation values).
TARGET_PPL_BOUND = 40.0
DRAFT_PPL_BOUND = 60.0


@pytest.fixture(scope="module")
def heldout_ids():
    tok = models.load_tokenizer()
    _, test_files = corpus.split_corpus()
    text = "".join(corpus.read_text(f) for f in test_files[:8])
    return torch.tensor(tok(text)["input_ids"][: 8 * 256 + 1], dtype=torch.int32)


def test_models_load_offline_with_documented_shapes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target, draft, tok = models.load_target(), models.load_draft(), models.load_tokenizer()
    tc, dc = target.config, draft.config
    assert tc.model_type == "qwen3_moe" and dc.model_type == "qwen3"
    assert (tc.num_experts, tc.num_experts_per_tok, tc.num_hidden_layers, tc.hidden_size) == (32, 4, 4, 128)
    assert tc.norm_topk_prob is True
    assert tc.vocab_size == dc.vocab_size == len(tok) == 4096
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    assert 5e6 <= n_target <= 10e6, n_target
    assert n_draft < n_target / 4
    fine = models.load_target(name="fine")
    fc = fine.config
    assert fc.model_type == "qwen3_moe" and fc.norm_topk_prob is True
    assert (fc.num_experts, fc.num_experts_per_tok, fc.num_hidden_layers, fc.hidden_size) == (128, 8, 4, 128)
    assert fc.vocab_size == len(tok)
    assert 10e6 <= sum(p.numel() for p in fine.parameters()) <= 16e6
    # Every shipped model's weights together (both targets and the draft) stay within 48 MB.
    size = sum(f.stat().st_size for f in models.ASSETS.rglob("*.safetensors"))
    assert size <= 48e6, f"shipped weights are {size / 1e6:.1f} MB"
    report = models.training_report()
    assert report["models"]["target"]["parameters"] == n_target


def test_tokenizer_round_trips_python_source():
    tok = models.load_tokenizer()
    src = "def f(x):\n    return {'a': x ** 2}  # ünïcode\n"
    assert tok.decode(tok(src)["input_ids"]) == src


@pytest.mark.parametrize("which,bound", [("target", TARGET_PPL_BOUND), ("draft", DRAFT_PPL_BOUND)])
def test_heldout_perplexity_beats_random_weights(heldout_ids, which, bound):
    model = models.load_target() if which == "target" else models.load_draft()
    ppl = train.perplexity(model, heldout_ids, 256, 8)
    assert ppl < bound, f"{which} held-out perplexity {ppl:.1f} >= {bound}"
    cfg = train.target_config(4096) if which == "target" else train.draft_config(4096)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    rand = AutoModelForCausalLM.from_config(cfg)
    assert train.perplexity(rand, heldout_ids, 256, 2) > 1000 > 10 * bound


def test_corpus_split_is_stable_and_disjoint():
    tr, te = corpus.split_corpus()
    assert tr and te and not set(tr) & set(te)
    assert 0.03 < len(te) / (len(tr) + len(te)) < 0.2
    assert all(corpus.is_heldout(f) for f in te)


def test_quick_training_run(tmp_path):
    assert train.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("target", "draft"):
        assert (tmp_path / name / "model.safetensors").is_file()
    import json

    rep = json.loads((tmp_path / "training.json").read_text())
    assert math.isfinite(rep["models"]["target"]["heldout_ppl"])
