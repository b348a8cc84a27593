"""The issue-3 layer benchmark: `moespec bench layer` with every implementation side by side.

One budgeted MoE layer per model shape (Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B, DeepSeek-V3,
GPT-OSS-120B on a GPU), T in {1,2,4,8,16,32,64}, budgets {none,8,16,32,64}: µs per layer, GB/s and
the ratio to the byte floor (kept experts' weight bytes + activations over the measured
device-to-device copy bandwidth), with transformers' eager / grouped_mm / batched_mm experts,
``torch.nn.functional.grouped_mm`` and ``moespec.reference`` timed in the same run over the same
routing. The harness lives in ``moespec.bench`` (one implementation for this script and the CLI).

    python bench/bench_layer.py --out bench/results/<device> [any `moespec bench layer` option]
"""
import sys

from moespec.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "layer", "--impls", "all", "--policies", "substitute", *sys.argv[1:]]))
