#!/usr/bin/env bash
# One-call GPU session for moespec's CUDA kernels (issue 3): build, cuda tests, benchmark.
#
# Run from the repository root on the GPU machine (no network there):
#     bash bench/gpu_session.sh            # all stages
#     bash bench/gpu_session.sh test       # build + pytest -m cuda only
#     bash bench/gpu_session.sh bench      # build + benchmark only
# Needs: python with torch (CUDA), nvcc, scikit-build-core, pybind11, cmake, ninja; the
# wheels carried in .whl/ (optional): nvidia-cutlass 4.2.0.0 and transformers 5.23.0.
# Writes into $OUT (default ./gpu_out): session.log, build.log, pytest.txt and bench_results.tgz (bench/bench_layer_<model>.{json,md,png}).
# The device tool allows 600 s per command: the defaults (build ~1 min + 220 s + 280 s) fit one call; on a
# warm machine, `test` and `bench` can also run as two calls with larger limits (the build is incremental).
# Tunables (env): TEST_TIMEOUT (s, default 220), BENCH_TIMEOUT (s, default 280, split over the models),
# BENCH_MODELS (space-separated presets), BENCH_ARGS (extra `moespec bench layer` args, e.g. "--tokens 1,8,64").
# The device copy of the tree has no .git: pass MOESPEC_GIT_COMMIT=<sha> so results name their commit.
set -uo pipefail

STAGE="${1:-all}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT" "$OUT/bench"
exec > >(tee -a "$OUT/session.log") 2>&1
cd "$(dirname "$0")/.."
echo "== moespec gpu session: stage=$STAGE $(date -u +%FT%TZ) in $PWD"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader || true
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
nvcc --version | tail -1

# ---- build: only the architecture of this GPU, to keep the compile short.
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
case "$cap" in
  90) ARCHS="90a-real" ;;
  80|86|87|89) ARCHS="80-real" ;;
  100|103) ARCHS="80-real;90a-real" ;;  # no tuned path yet; sm_80 SASS does not run there, see report
  *) ARCHS="80-real;90a-real" ;;
esac
# Carried wheels (no network there): nvidia-cutlass (CUTLASS headers) and transformers 5.23 (the box has 5.17).
if compgen -G ".whl/*.whl" >/dev/null; then
  pip install --no-deps --no-index .whl/*.whl >>"$OUT/build.log" 2>&1 || echo "installing carried wheels failed (continuing)"
fi
echo "== build (MOESPEC_CUDA_ARCHS=$ARCHS)"
start=$(date +%s)
if ! MOESPEC_CUDA=ON MOESPEC_CUDA_ARCHS="$ARCHS" pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1
fi
echo "build took $(( $(date +%s) - start )) s"
python -m moespec info || moespec info || true
export MOESPEC_GIT_COMMIT="${MOESPEC_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

rc=0
if [[ "$STAGE" == all || "$STAGE" == test ]]; then
  echo "== pytest -m cuda"
  timeout "${TEST_TIMEOUT:-220}" python -m pytest -m cuda -q -rfEs -p no:cacheprovider tests >"$OUT/pytest.txt" 2>&1
  trc=$?
  tail -30 "$OUT/pytest.txt"
  echo "pytest exit code $trc"; [[ $trc -ne 0 ]] && rc=$trc
fi
if [[ "$STAGE" == all || "$STAGE" == bench ]]; then
  echo "== benchmark"
  # One run per model, each writing its own files, so a time limit keeps the models already done.
  budget_s="${BENCH_TIMEOUT:-280}"
  models="${BENCH_MODELS:-qwen3-30b-a3b mixtral-8x7b olmoe-1b-7b gpt-oss-120b deepseek-v3}"
  per_model=$(( budget_s / $(echo $models | wc -w) ))
  for m in $models; do
    # shellcheck disable=SC2086
    timeout "$per_model" python bench/bench_layer.py --models "$m" --name "bench_layer_$m" --quiet \
      --out "$OUT/bench" ${BENCH_ARGS:-}
    brc=$?
    echo "benchmark $m: exit code $brc (124 = its $per_model s share of the time limit ran out)"
    [[ -f "$OUT/bench/bench_layer_$m.md" ]] && cat "$OUT/bench/bench_layer_$m.md"
  done
fi
# The device tool returns at most 8 files from $OUT: pack the per-model results into one archive.
if compgen -G "$OUT/bench/*" >/dev/null; then
  tar -czf "$OUT/bench_results.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
fi
echo "== done $(date -u +%FT%TZ); unpack \$OUT/bench_results.tgz into bench/results/<device>/ to record the results"
exit $rc
