# Sourced by tests/gpu/run.sh and tools/bench_gpu.sh: how many GPUs there are, and the interpreter and
# site folder (.gpu_site/<python>/, where run.sh installs what the machine lacks) that both use.

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
