# Sourced by tests/gpu/run.sh and tools/bench_gpu.sh: how many GPUs there are, the interpreter and site
# folder (.gpu_site/<python>/) both use, and the set-up of what a GPU machine lacks (gpu_setup).

# gpu_count: the NVIDIA GPUs nvidia-smi lists; 0 without nvidia-smi or when CUDA_VISIBLE_DEVICES="" hides
# them (as it hides them from CUDA).
gpu_count() {
  if [ "${CUDA_VISIBLE_DEVICES-unset}" != "" ] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU '
  else
    echo 0
  fi
}

# use_gpu_site ROOT: sets PY (${PYTHON:-python3}) and SITE, and exports QWENVL_GPU_SITE and a PYTHONPATH
# with the repo and tests/gpu/site (whose sitecustomize adds SITE after the machine's own packages).
use_gpu_site() {
  PY="$(command -v "${PYTHON:-python3}")" || { echo "FAIL setup no ${PYTHON:-python3} to run"; exit 1; }
  SITE="$1/.gpu_site/$("$PY" -c 'import sys; print("py%d.%d" % sys.version_info[:2])')"
  export QWENVL_GPU_SITE="$SITE" PYTHONPATH="$1:$1/tests/gpu/site${PYTHONPATH:+:$PYTHONPATH}"
}

# gpu_install MODULE SECONDS PIP-ARGS...: pip into $SITE unless MODULE imports already (offline from
# $QWENVL_WHEELS when set); the outcome goes to $QWENVL_GPU_SETUP_LOG.
gpu_install() {
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

# gpu_setup: what run.sh and bench_gpu.sh need on a GPU machine, in the repo root: the packages it lacks
# into $SITE (megatron-core, psutil, DALI; Transformer Engine with QWENVL_GPU_INSTALL_TE=1) and the C++
# extension built in place. Quick when all is there. Needs PY, SITE (use_gpu_site), QWENVL_GPU_SETUP_LOG.
gpu_setup() {
  mkdir -p "$SITE"
  # --no-deps where a dependency is torch (pip --target would download torch again); DALI with its own.
  gpu_install packaging 120 --no-deps --only-binary=:all: packaging
  gpu_install psutil 120 --no-deps --only-binary=:all: psutil
  gpu_install megatron.core 180 --no-deps --only-binary=:all: "megatron-core==0.16.1"
  gpu_install nvidia.dali 240 --only-binary=:all: "${QWENVL_DALI:-nvidia-dali-cuda120==2.4.0}"
  gpu_install setuptools 120 --no-deps --only-binary=:all: setuptools  # for build_ext on Pythons without it
  if [ "${QWENVL_GPU_INSTALL_TE:-0}" = 1 ]; then
    local cu
    cu=$("$PY" -c "import torch; print((torch.version.cuda or '12').split('.')[0])")
    gpu_install transformer_engine.pytorch "${QWENVL_TE_TIMEOUT_S:-1800}" --no-deps --no-build-isolation einops \
      "transformer-engine>=2.9,<2.12" "transformer-engine-cu$cu>=2.9,<2.12" "transformer-engine-torch>=2.9,<2.12"
  fi
  echo "[gpu] building the C++ extension in place" >&2
  if timeout 300 "$PY" setup.py -q build_ext --inplace >"$SITE/build.log" 2>&1; then
    echo "C++ extension: built" >>"$QWENVL_GPU_SETUP_LOG"
  else
    echo "C++ extension: build FAILED, see $SITE/build.log" >>"$QWENVL_GPU_SETUP_LOG"
  fi
}
