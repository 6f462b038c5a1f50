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

gpu_setup
cat "$QWENVL_GPU_SETUP_LOG" >&2

left=$(( ${QWENVL_GPU_BUDGET_S:-470} - (SECONDS - start) ))
exec "$PY" tests/gpu/checks.py --report "$REPORT" --budget-s "$left"
