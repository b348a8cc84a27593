"""Record tests/data/spec_golden.json: greedy tokens of the shipped models (no budget).

    python tests/data/make_spec_golden.py

`tests/test_hf_unchanged.py::test_speculative_generate_matches_golden_tokens` replays these settings on
whatever transformers is installed and expects exactly these tokens, so one recording (made on the
newest supported transformers) pins `moespec.speculative.generate` across the supported range. Re-record
only when the shipped weights or the recorded settings change, never to paper over a mismatch.

For each prompt the file stores the prompt text and its token ids (the test feeds the ids, so a
tokenizer change cannot move the golden), the greedy tokens, and the smallest top-1/top-2 logit
margin along the greedy path (a mismatch at a near-tie would be numerical noise, not a bug).
"""
from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "spec_golden.json"
# Chosen for clear greedy paths (smallest top-1/top-2 logit margin above 0.2).
PROMPTS = [
    "def fibonacci(n):\n    ",
    "    return self.",
]
MAX_NEW_TOKENS = 24
DRAFT_K = 4
DTYPE = "float32"


@torch.inference_mode()
def record() -> dict:
    import transformers

    from moespec import speculative as spec
    from moespec.models import load_draft, load_target, load_tokenizer

    torch.manual_seed(0)
    target, draft, tok = load_target(dtype=torch.float32), load_draft(dtype=torch.float32), load_tokenizer()
    cases = []
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids
        want = target.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
        got, _ = spec.generate(target, ids, drafter=draft, draft=DRAFT_K, max_new_tokens=MAX_NEW_TOKENS,
                               do_sample=False)
        got = got[0, ids.shape[1]:].tolist()
        if got != want or len(want) != MAX_NEW_TOKENS:
            raise SystemExit(f"spec.generate {got} != greedy {want} for {text!r}; not recording")
        # Margin of each greedy choice, recomputed without a cache from the full sequence.
        seq = torch.tensor([ids[0].tolist() + want])
        logits = target(seq).logits[0, ids.shape[1] - 1:-1]
        top2 = logits.topk(2, dim=-1).values
        if not torch.equal(logits.argmax(-1), torch.tensor(want)):
            raise SystemExit(f"uncached argmax disagrees with cached greedy for {text!r}; pick another prompt")
        cases.append({
            "prompt": text,
            "prompt_ids": ids[0].tolist(),
            "tokens": want,
            "text": tok.decode(want),
            "min_top2_margin": round(float((top2[:, 0] - top2[:, 1]).min()), 4),
        })
    return {
        "description": "moespec.speculative.generate greedy tokens, shipped target+draft, no budget "
                       "(recorded by tests/data/make_spec_golden.py)",
        "settings": {"dtype": DTYPE, "device": "cpu", "draft": DRAFT_K, "drafter": "load_draft()",
                     "max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "budget": None,
                     "eos_token_id": None},
        "recorded_with": {"transformers": transformers.__version__, "torch": torch.__version__,
                          "python": platform.python_version()},
        "cases": cases,
    }


if __name__ == "__main__":
    data = record()
    text = json.dumps(data, indent=2)
    # One line per token list.
    text = re.sub(r"\[\s+([-0-9,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    json.loads(text)
    OUT.write_text(text + "\n")
    print(f"wrote {OUT}", file=sys.stderr)
    for c in data["cases"]:
        print(repr(c["prompt"]), "->", repr(c["text"]), "margin", c["min_top2_margin"], file=sys.stderr)
