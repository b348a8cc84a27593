#!/usr/bin/env bash
# What do the newest releases on PyPI break?  Not a CI lane: it needs the network, and CI keeps pinned
# versions so that an upstream release never blocks a landing (docs/check-latest.md).
#
#   tools/check_latest.sh                   # newest transformers and vLLM; reports the newest torch
#   MOESPEC_CHECK_TORCH=1 tools/check_latest.sh   # also installs the newest torch (with its dependencies)
#
# PYTHON (default: python) is an interpreter where moespec (".[test]") and torch are installed. Each check
# runs in a scratch venv under a temp dir that sees PYTHON's packages behind its own, so only the package
# under test changes. The newest wheels come from `pip download --no-deps`. The script prints one line per
# check and the tests that failed; it exits 1 if any check broke, 0 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
tmp=$(mktemp -d)
[ "${CHECK_LATEST_KEEP:-0}" = 1 ] && echo "check_latest: keeping $tmp" || trap 'rm -rf "$tmp"' EXIT
dl="$tmp/dl"
summary=()
broke=0

"$PY" -c 'import moespec, torch, pytest' 2>/dev/null || {
  echo "check_latest: $PY cannot import moespec, torch and pytest (install torch, then pip install -e '.[test]')" >&2
  exit 2
}

readme_block() {  # the first fenced block after <!-- MARKER in README.md (as .ci/run reads it)
  awk -v marker="<!-- $1" 'index($0, marker) {found=1; next}
    found && /^```/ {if (inblock) exit; inblock=1; next} inblock {print}' README.md
}

newest() {  # package -> version of the newest wheel pip finds (downloaded into $dl)
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$dl" "$1" >"$tmp/pip-$1.log" 2>&1 || {
    tail -n 3 "$tmp/pip-$1.log" >&2
    return 1
  }
  find "$dl" -name "$1-*.whl" -printf '%f\n' | sed -n "s/^$1-\([^-]*\)-.*/\1/p" | sort -V | tail -n 1
}

scratch() {  # dir -> a venv that finds its own packages first, then PYTHON's (moespec, torch, pytest)
  "$PY" -m venv "$1" || return 1
  local sp
  sp=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir (not a plain path line) also runs PYTHON's .pth files: an editable moespec is found that way.
  "$PY" -c 'import site; [print(f"import site; site.addsitedir({p!r})") for p in site.getsitepackages()]' \
    >"$sp/zz_check_latest_base.pth"
}

run_tests() {  # label, venv, extra env (VAR=value or ""), pytest args...
  local label=$1 vv=$2 extra=$3 log rc
  shift 3
  log="$tmp/$(tr -c 'A-Za-z0-9' _ <<<"$label").log"
  echo "check_latest: $label: python -m pytest $*"
  env $extra "$vv/bin/python" -m pytest -q -p no:cacheprovider -rfE "$@" >"$log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    summary+=("ok     $label: $(tail -n 1 "$log")")
  else
    broke=1
    summary+=("BROKE  $label (pytest exit $rc): $(tail -n 1 "$log")")
    grep -E '^(FAILED|ERROR) ' "$log" | head -n 40 | sed 's/^/         /' >"$log.failed"
    [ -s "$log.failed" ] || tail -n 20 "$log" | sed 's/^/         /' >"$log.failed"
    summary+=("$(cat "$log.failed")")
  fi
}

installed() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo none; }

# --- transformers: the drop-in and spec-engine tests (the compat lane's selection), on the newest release.
if tv=$(newest transformers) && [ -n "$tv" ]; then
  vv="$tmp/transformers"
  if scratch "$vv" && "$vv/bin/pip" install -q "$dl/transformers-$tv-py3-none-any.whl" >"$tmp/tf-install.log" 2>&1; then
    run_tests "transformers $tv (installed: $(installed transformers))" "$vv" "" \
      tests/test_hf_*.py tests/test_speculative_*.py tests/test_transformers_range.py
  else
    broke=1; summary+=("BROKE  transformers $tv: install failed: $(tail -n 1 "$tmp/tf-install.log")")
  fi
else
  broke=1; summary+=("BROKE  transformers: could not download the newest wheel")
fi

# --- vLLM: the plugin tests, as the CI vllm lane runs them (vLLM without its dependencies, the lane's pinned
# pure-Python packages, the newest transformers inside that vLLM's own range, PYTHON's torch).
if vl=$(newest vllm) && [ -n "$vl" ]; then
  vv="$tmp/vllm"
  whl=$(find "$dl" -name "vllm-$vl-*.whl" | head -n 1)
  # vLLM's own cap on transformers, from the wheel's metadata (e.g. "transformers<5.23.0,>=5.16.1").
  tf_req=$("$PY" -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist: transformers") and ";" not in line:
        print(line.split(":", 1)[1].strip().replace(" ", "")); break' "$whl")
  pins=$(readme_block ci:vllm-command | grep -oE '[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*' | grep -vE '^(vllm|transformers)==')
  # shellcheck disable=SC2086  # pins is a word list
  # transformers and requests with their dependencies (CI's lane gets those from the system site-packages).
  if scratch "$vv" && "$vv/bin/pip" install -q --no-deps "$whl" $pins >"$tmp/vllm-install.log" 2>&1 \
       && "$vv/bin/pip" install -q "${tf_req:-transformers}" requests >>"$tmp/vllm-install.log" 2>&1; then
    # The plugin refuses vLLM releases it was not written against; a newer one is let through here, and
    # the gate is reported on its own line, so the tests show what else would break.
    mm=$(cut -d. -f1,2 <<<"$vl")
    if ! "$vv/bin/python" -c "import sys, moespec.integrations.vllm as m; sys.exit('$mm' not in m.SUPPORTED_VLLM)"; then
      broke=1; summary+=("BROKE  vllm $vl: outside the plugin's supported releases (SUPPORTED_VLLM); tested below with it added")
      mkdir -p "$tmp/gate"
      printf '%s\n' "import moespec.integrations.vllm as m" \
        "m.SUPPORTED_VLLM = m.SUPPORTED_VLLM + ('$mm',)" >"$tmp/gate/check_latest_gate.py"
      run_tests "vllm $vl with transformers $("$vv/bin/python" -c 'import transformers; print(transformers.__version__)')" \
        "$vv" "VLLM_TARGET_DEVICE=cpu MOESPEC_REQUIRE_VLLM=1 PYTHONPATH=$tmp/gate" -p check_latest_gate tests/test_vllm_plugin.py
    else
      run_tests "vllm $vl with transformers $("$vv/bin/python" -c 'import transformers; print(transformers.__version__)')" \
        "$vv" "VLLM_TARGET_DEVICE=cpu MOESPEC_REQUIRE_VLLM=1" tests/test_vllm_plugin.py
    fi
  else
    broke=1; summary+=("BROKE  vllm $vl: install failed: $(tail -n 1 "$tmp/vllm-install.log")")
  fi
else
  broke=1; summary+=("BROKE  vllm: could not download the newest wheel")
fi

# --- torch: reported; installed and tested only on request (a CUDA torch and its libraries are gigabytes).
torch_new=$("$PY" -m pip index versions torch 2>/dev/null | sed -n 's/^torch (\(.*\))$/\1/p')
torch_have=$("$PY" -c 'import torch; print(torch.__version__)')
if [ -z "$torch_new" ]; then
  summary+=("?      torch: could not read the newest release (installed: $torch_have)")
elif [ "${MOESPEC_CHECK_TORCH:-0}" = 1 ]; then
  vv="$tmp/torch"
  if scratch "$vv" && "$vv/bin/pip" install -q "torch==$torch_new" >"$tmp/torch-install.log" 2>&1; then
    run_tests "torch $torch_new (installed: $torch_have)" "$vv" "" \
      tests/test_hf_*.py tests/test_speculative_*.py tests/test_experts.py tests/test_union.py tests/test_selection.py
  else
    broke=1; summary+=("BROKE  torch $torch_new: install failed: $(tail -n 1 "$tmp/torch-install.log")")
  fi
else
  summary+=("-      torch: newest $torch_new, installed $torch_have; not tested (MOESPEC_CHECK_TORCH=1 installs and tests it)")
fi

echo
echo "check_latest: newest releases on the package index against this checkout"
printf '%s\n' "${summary[@]}"
exit "$broke"
