#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv/ at the repo root and installs the
# package with its C++ extension. Idempotent: a second run only re-checks. Used by the README commands.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$py" -m venv .venv
fi
stamp=.venv/.qwenvl_setup_stamp
want="$( (cat setup.py pyproject.toml tools/setup_env.sh; cat csrc/*.cpp csrc/*.h 2>/dev/null || true) | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies into .venv (CPU torch pinned first so no CUDA build is pulled)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  # webdataset / megatron-energon: tools/preprocess_data.py reads WebDataset shards and energon datasets.
  .venv/bin/pip install -q --disable-pip-version-check "megatron-core==0.16.1" numpy psutil safetensors \
      tiktoken sentencepiece pillow pytest hypothesis pybind11 setuptools wheel tensorboard pycocoevalcap \
      "webdataset==1.0.2" "megatron-energon==7.4.1"
  # NVIDIA DALI runs its CPU pipelines here (the GPU decoder on clusters); the tests compare it to Pillow.
  .venv/bin/pip install -q --disable-pip-version-check "nvidia-dali-cuda120==2.4.0" \
    || echo "[setup] DALI not installed: the Pillow image path is used and DALI tests are skipped"
  echo "[setup] building qwenvl_megatron (C++ extension in csrc/)"
  .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
  echo "$want" > "$stamp"
fi
# The real Qwen vocabulary ships inside the `dashscope` wheel; tests use it. Fetch the wheel, keep the file.
vocab=.venv/share/qwen.tiktoken
if [ ! -f "$vocab" ]; then
  echo "[setup] fetching qwen.tiktoken from the dashscope wheel"
  tmp="$(mktemp -d)"
  .venv/bin/pip download -q --disable-pip-version-check --no-deps -d "$tmp" "dashscope==2.0.2"
  mkdir -p "$(dirname "$vocab")"
  .venv/bin/python - "$tmp" "$vocab" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/dashscope-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(sys.argv[2], "wb") as f:
    f.write(z.read("dashscope/resources/qwen.tiktoken"))
PY
  rm -rf "$tmp"
fi
