#!/usr/bin/env bash
# Issue #9's acceptance on a GPU machine: `bash tests/gpu/run.sh` (docs/gpu.md, "Acceptance: tests/gpu/run.sh").
#
# Installs what the machine lacks into .gpu_site/<python>/ (pip --target, binary wheels only, each call
# time-boxed; QWENVL_WHEELS=DIR installs from a wheel folder, offline; Transformer Engine only with
# QWENVL_GPU_INSTALL_TE=1, as its torch extension compiles for many minutes), builds the C++ extension in
# place, then runs tests/gpu/checks.py: one line per check (PASS|FAIL|SKIP <check> <numbers>) and the
# numbers in $GPU_REPORT (default ./gpu_report.json). A package that does not install makes its checks
# SKIP with the reason. Without a GPU it says so and exits 0, writing nothing. Exit 1 if a check FAILs.
# Interpreter: ${PYTHON:-python3}. The whole run keeps within 8 minutes (470 s; QWENVL_GPU_BUDGET_S).
set -uo pipefail
start=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REPORT="${GPU_REPORT:-gpu_report.json}"
case "$REPORT" in /*) ;; *) REPORT="$PWD/$REPORT" ;; esac

source "$ROOT/tools/gpu_env.sh"
gpus=$(gpu_count)
if [ "$gpus" = 0 ]; then
  echo "no NVIDIA GPU found (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES hides them): nothing checked, no report written"
  exit 0
fi

use_gpu_site "$ROOT"  # PY, SITE; PYTHONPATH: the repo, then tests/gpu/site (.gpu_site after the machine's own)
mkdir -p "$SITE"
export QWENVL_GPU_SETUP_LOG="$SITE/setup.log"
export PYTHON="$PY"  # the interpreter of the stage scripts (examples/common.sh)
cd "$ROOT"
: > "$QWENVL_GPU_SETUP_LOG"
echo "[gpu] $gpus GPU(s); setting up with $PY in $SITE (log: $QWENVL_GPU_SETUP_LOG)" >&2

# install MODULE SECONDS PIP-ARGS...: pip into $SITE unless MODULE imports already; the outcome goes to the log.
install() {
  local mod=$1 secs=$2 rc=0
  shift 2
  if "$PY" -c "import $mod" >/dev/null 2>&1; then echo "$mod: present" >>"$QWENVL_GPU_SETUP_LOG"; return; fi
  local src=()
  [ -n "${QWENVL_WHEELS:-}" ] && src=(--no-index --find-links "$QWENVL_WHEELS")
  echo "[gpu] pip install $* (at most $secs s)" >&2
  timeout "$secs" "$PY" -m pip install --disable-pip-version-check -q --target "$SITE" ${src[@]+"${src[@]}"} "$@" \
    >>"$SITE/pip.log" 2>&1 || rc=$?
  if "$PY" -c "import $mod" >/dev/null 2>&1; then
    echo "$mod: installed ($*)" >>"$QWENVL_GPU_SETUP_LOG"
  else
    echo "$mod: NOT installed: pip exit $rc$([ "$rc" = 124 ] && echo " (timed out after $secs s)"), see $SITE/pip.log" \
      >>"$QWENVL_GPU_SETUP_LOG"
  fi
}
# --no-deps where a dependency is torch (pip --target would download torch again); DALI with its own.
install packaging 120 --no-deps --only-binary=:all: packaging
install psutil 120 --no-deps --only-binary=:all: psutil
install megatron.core 180 --no-deps --only-binary=:all: "megatron-core==0.16.1"
install nvidia.dali 240 --only-binary=:all: "${QWENVL_DALI:-nvidia-dali-cuda120==2.4.0}"
install setuptools 120 --no-deps --only-binary=:all: setuptools  # for build_ext on Pythons without it
if [ "${QWENVL_GPU_INSTALL_TE:-0}" = 1 ]; then
  cu=$("$PY" -c "import torch; print((torch.version.cuda or '12').split('.')[0])")
  install transformer_engine.pytorch "${QWENVL_TE_TIMEOUT_S:-1800}" --no-deps --no-build-isolation einops \
    "transformer-engine>=2.9,<2.12" "transformer-engine-cu$cu>=2.9,<2.12" "transformer-engine-torch>=2.9,<2.12"
fi

echo "[gpu] building the C++ extension in place" >&2
if timeout 300 "$PY" setup.py -q build_ext --inplace >"$SITE/build.log" 2>&1; then
  echo "C++ extension: built" >>"$QWENVL_GPU_SETUP_LOG"
else
  echo "C++ extension: build FAILED, see $SITE/build.log" >>"$QWENVL_GPU_SETUP_LOG"
fi
cat "$QWENVL_GPU_SETUP_LOG" >&2

left=$(( ${QWENVL_GPU_BUDGET_S:-470} - (SECONDS - start) ))
exec "$PY" tests/gpu/checks.py --report "$REPORT" --budget-s "$left"
