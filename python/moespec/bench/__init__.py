"""Benchmarks and evaluation behind ``moespec bench`` (docs/design.md §5).

- `shapes`: model shape presets (docs/design.md §5 table) and the reduced CPU set.
- `routing_gen`: router-logit generators: i.i.d., Zipf, draft-tree-correlated, replay of a capture.
- `timing`: CUDA-event timing with L2 flush and CUDA graphs, wall-clock timing on CPU, copy bandwidth.
- `impls`: the implementations compared side by side (moespec CUDA, reference, transformers, torch).
- `layer`: the layer microbenchmark (`run_layer_bench`), importable by ``bench/bench_layer.py``.
- `capture`: record a real model's per-layer routing for replay.
- `generate`: end-to-end evaluation of speculative decoding modes (`run_generate_bench`).
- `report`: run metadata, terminal tables, JSON, Markdown and PNG output.
"""
