#!/usr/bin/env bash
# The GPU figures of docs/performance.md (issue 11) in one call, on a machine with NVIDIA GPUs:
#
#     bash tools/bench_gpu.sh     # after `bash tests/gpu/run.sh`, or alone: it sets up what is missing as run.sh does
#
# Runs, each time-boxed (about 6 minutes in all on one GPU): kernels at the paper's shapes in bf16
# (bench_kernels --paper-shapes), a training step's phases for the tiny and small configs (bench_step),
# image decode (bench_image_decode: Pillow, DALI CPU, DALI GPU); with 2+ GPUs also NCCL collectives
# (bench_comm) and the pipeline bubble for PP 2 (and 4). JSON and PNG files go to ${BENCH_OUT:-gpu_bench}/,
# one line per benchmark (OK|FAIL|TIMEOUT name seconds file). Without a GPU it says so and exits 0, running
# nothing. Interpreter: ${PYTHON:-python3}; exit 1 if a benchmark failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${BENCH_OUT:-gpu_bench}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac

source "$ROOT/tools/gpu_env.sh"
gpus=$(gpu_count)
if [ "$gpus" = 0 ]; then
  echo "no NVIDIA GPU found (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES hides them): no GPU figures measured"
  exit 0
fi
use_gpu_site "$ROOT"  # what tests/gpu/run.sh installed (TE, DALI, megatron-core) is found through SITE
mkdir -p "$OUT"
cd "$ROOT"
export QWENVL_GPU_SETUP_LOG="$OUT/setup.log"
: > "$QWENVL_GPU_SETUP_LOG"
gpu_setup  # quick after run.sh on the same machine; on a fresh one as run.sh does it (QWENVL_WHEELS too)
failed=0

# bench NAME SECONDS ARGS...: one benchmark, its output in $OUT/NAME.log
bench() {
  local name=$1 secs=$2 t0=$SECONDS rc=0
  shift 2
  timeout "$secs" "$PY" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  local status=OK
  [ "$rc" = 124 ] && status=TIMEOUT
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && status=FAIL
  [ "$status" != OK ] && failed=1
  echo "$status $name $((SECONDS - t0))s $OUT/$name.json (log: $OUT/$name.log)"
}

echo "[bench_gpu] $gpus GPU(s), $PY, figures in $OUT" >&2
bench kernels 150 tools/bench_kernels.py --paper-shapes --json "$OUT/kernels.json"
bench step 120 tools/bench_step.py --configs tiny small --pp --json "$OUT/step.json"
bench image_decode 60 tools/bench_image_decode.py --num-images 256 --batch-size 32 --json "$OUT/image_decode.json"
if [ "$gpus" -ge 2 ]; then
  pp=(2)
  [ "$gpus" -ge 4 ] && pp=(2 4)
  bench comm 90 tools/bench_comm.py --nproc "$gpus" --json "$OUT/comm.json"
  bench bubble 120 tools/bench_step.py --configs --pp "${pp[@]}" --json "$OUT/bubble.json"
fi
exit $failed
