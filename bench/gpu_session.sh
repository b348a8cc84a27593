#!/usr/bin/env bash
# One-call GPU session for moespec's CUDA kernels (issue 3): build, cuda tests, compute-sanitizer, benchmark.
#
# Run from the repository root on the GPU machine (no network there):
#     bash bench/gpu_session.sh            # all stages: test, sanitize, bench
#     bash bench/gpu_session.sh test       # build + pytest -m cuda only
#     bash bench/gpu_session.sh sanitize   # build + compute-sanitizer memcheck/racecheck/synccheck only
#     bash bench/gpu_session.sh bench      # build + benchmark only
# Needs: python with torch (CUDA), nvcc, scikit-build-core, pybind11, cmake, ninja; the
# wheels carried in .whl/ (optional): nvidia-cutlass 4.2.0.0 and transformers 5.23.0.
# compute-sanitizer (PATH, /usr/local/cuda/bin or $CUDA_HOME/bin) is optional: without it `sanitize` is skipped.
# Writes into $OUT (default ./gpu_out): session.log, build.log, pytest.txt, sanitize_{memcheck,racecheck,synccheck}.txt
# and bench_results.tgz (bench/bench_layer_<model>.{json,md,png}); the device tool returns at most 8 files.
# The device tool allows 600 s per command: the defaults (build ~1 min + 220 s + 90 s + 30 s plan timing + 170 s) fit one call; on a
# warm machine, the stages can also run as separate calls with larger limits (the build is incremental, or
# SKIP_BUILD=1 reuses the previous call's install).
# Tunables (env): TEST_TIMEOUT (s, default 220), SANITIZE_TIMEOUT (s, default 90, split evenly over the three tools),
# SANITIZE_TESTS (pytest -k selection of tests/test_cuda_kernels.py, default one moe_experts and one budget_routing
# case), SANITIZE_ARGS (extra compute-sanitizer args), BENCH_TIMEOUT (s, default 170, split over the models),
# BENCH_MODELS (space-separated presets), BENCH_ARGS (extra `moespec bench layer` args, e.g. "--tokens 1,8,64"),
# SKIP_BUILD=1 (skip the build). The build also runs the ptxas spill check (cmake/kernel_resources.cmake) for this
# GPU's architecture; CMAKE_ARGS=-DMOESPEC_RESOURCE_CHECK=OFF turns it off.
# Both expert-kernel generations (docs/kernels-v2.md) are covered: the cuda tests run every expert test for v1
# and v2 (the kgen fixture), the default SANITIZE_TESTS selection matches both generations' ids, and the
# benchmark (--impls all) times moespec / moespec-v2 and the experts-only v1 / v2 variants side by side.
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
if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
  echo "== build skipped (SKIP_BUILD=1)"
else
  echo "== build (MOESPEC_CUDA_ARCHS=$ARCHS)"
  start=$(date +%s)
  if ! MOESPEC_CUDA=ON MOESPEC_CUDA_ARCHS="$ARCHS" pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/build.log" 2>&1; then
    echo "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1
  fi
  echo "build took $(( $(date +%s) - start )) s"
fi
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
if [[ "$STAGE" == all || "$STAGE" == sanitize ]]; then
  echo "== compute-sanitizer: memcheck, racecheck, synccheck"
  san=""
  for c in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer \
           "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [[ -n "$c" && -x "$c" ]]; then san="$c"; break; fi
  done
  if [[ -z "$san" ]]; then
    echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin, \$CUDA_HOME/bin): sanitize stage skipped"
  else
    # A small selection: the sanitizers slow kernels 10-100x and load torch once per tool.
    sel="${SANITIZE_TESTS:-test_moe_experts_matches_reference and cuda-17-60-4-bfloat16 or test_budget_routing_matches_reference and cuda-17-256-8}"
    per_tool=$(( ${SANITIZE_TIMEOUT:-90} / 3 ))
    # Check moespec's kernels only (torch's own kernels would cost most of the time).
    filt=()
    "$san" --help 2>/dev/null | grep -q -- '--kernel-name' && filt=(--kernel-name kns=moespec)
    echo "$("$san" --version 2>/dev/null | tail -1); $per_tool s per tool; -k \"$sel\""
    for tool in memcheck racecheck synccheck; do
      # memcheck: without torch's caching allocator, so an out-of-bounds access cannot land in a pooled block.
      envs=(); [[ $tool == memcheck ]] && envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
      # shellcheck disable=SC2086
      env ${envs[@]+"${envs[@]}"} timeout -k 10 "$per_tool" "$san" --tool "$tool" --error-exitcode 1 \
        ${filt[@]+"${filt[@]}"} ${SANITIZE_ARGS:-} \
        python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_kernels.py -k "$sel" \
        >"$OUT/sanitize_$tool.txt" 2>&1
      src=$?
      summary="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.txt" | tail -1 | sed -E 's/^=+ *//')"
      tests="$(grep -E '^(=+ )?([0-9]+ [a-z]+,? )+in [0-9.]+s|no tests ran' "$OUT/sanitize_$tool.txt" | tail -1 | sed -E 's/^=+ *| *=+$//g')"
      note=""; [[ $src -eq 124 || $src -eq 137 ]] && note=" (timed out after $per_tool s)"
      [[ $src -eq 5 ]] && note=" (no test matched SANITIZE_TESTS)"
      echo "sanitize $tool: exit code $src$note; ${summary:-no sanitizer summary}; pytest: ${tests:-no summary}"
      [[ $src -ne 0 ]] && rc=$src
    done
  fi
fi
if [[ "$STAGE" == all || "$STAGE" == bench ]]; then
  echo "== benchmark"
  # The routing plan alone, v1 vs v2 (docs/kernels-v2.md, "Routing plan v2": the estimate it checks).
  timeout 30 python bench/plan_timing.py --out "$OUT/bench" || echo "plan_timing failed or timed out"
  # One run per model, each writing its own files, so a time limit keeps the models already done.
  budget_s="${BENCH_TIMEOUT:-170}"
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
