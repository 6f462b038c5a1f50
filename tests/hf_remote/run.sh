#!/usr/bin/env bash
# Issue #10's acceptance: `bash tests/hf_remote/run.sh CODE_DIR` (docs/conversion.md, "Checked against the
# official remote code"). CODE_DIR (or $QWENVL_QWEN_VL_CODE) holds the Hub repository Qwen/Qwen-VL's code:
# configuration_qwen.py, modeling_qwen.py, visual.py, qwen_generation_utils.py, tokenization_qwen.py. It is
# read, never copied into this repository.
#
# A venv for that code, $QWENVL_HF_VENV (default .hf_remote_venv/), is set up when it lacks transformers:
# torch==2.13.0 (pinned: an unpinned torch pulls CUDA), the release's transformers 4.32.0, tiktoken, einops,
# transformers_stream_generator, pillow, safetensors, matplotlib (tokenization_qwen.py imports it), numpy<2 and
# torchvision --no-deps (visual.py's transforms). Then tests/hf_remote/compare.py: `prepare` with the project's
# interpreter (${PYTHON:-.venv/bin/python}), `check` in that venv. It prints two lines,
# `PASS|FAIL hf_remote_logits max_abs_diff=...` and `PASS|FAIL hf_remote_greedy ...`, and exits 1 if the logits
# differ by more than 1e-4 or the greedy tokens differ. Without CODE_DIR, transformers or the Qwen vocabulary
# it says so and exits 0, claiming nothing. QWENVL_HF_REMOTE_KEEP=1 keeps the work directory.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CODE="${1:-${QWENVL_QWEN_VL_CODE:-}}"
if [ -z "$CODE" ]; then
  echo "no official Qwen-VL code directory given (argument or QWENVL_QWEN_VL_CODE): nothing compared"
  exit 0
fi
CODE="$(cd "$CODE" 2>/dev/null && pwd)" || { echo "FAIL setup code directory ${1:-$QWENVL_QWEN_VL_CODE} not found"; exit 1; }
for f in configuration_qwen modeling_qwen visual qwen_generation_utils tokenization_qwen; do
  [ -f "$CODE/$f.py" ] || { echo "FAIL setup $CODE/$f.py missing"; exit 1; }
done

PY="${PYTHON:-$ROOT/.venv/bin/python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
vocab=$("$PY" -c "from qwenvl_megatron.data.tokenizer import default_qwen_vocab_path as p; print(p())") || exit 1
if [ ! -f "$vocab" ]; then
  echo "no Qwen vocabulary at $vocab (QWEN_TIKTOKEN; tools/setup_env.sh installs it): nothing compared"
  exit 0
fi

VENV="${QWENVL_HF_VENV:-$ROOT/.hf_remote_venv}"
HPY="$VENV/bin/python"
if ! "$HPY" -c "import transformers" >/dev/null 2>&1; then
  echo "[hf_remote] setting up $VENV (log: $VENV.log)" >&2
  { "${QWENVL_HF_PYTHON:-python3}" -m venv "$VENV" &&
    "$HPY" -m pip install torch==2.13.0 &&
    "$HPY" -m pip install transformers==4.32.0 tiktoken einops transformers_stream_generator pillow safetensors \
      matplotlib "numpy<2" &&
    "$HPY" -m pip install --no-deps torchvision==0.28.0; } >"$VENV.log" 2>&1
fi
if ! "$HPY" -c "import importlib.util as u, transformers, tiktoken, einops; assert u.find_spec('torchvision')" \
     >/dev/null 2>&1; then
  echo "transformers (with tiktoken, einops, torchvision) is not usable in $VENV (see $VENV.log): nothing compared"
  exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/hf_remote.XXXXXX")"
[ "${QWENVL_HF_REMOTE_KEEP:-0}" = 1 ] && echo "[hf_remote] work directory: $WORK" >&2 || trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"
"$PY" tests/hf_remote/compare.py prepare "$WORK" >"$WORK/prepare.log" 2>&1 ||
  { tail -20 "$WORK/prepare.log"; echo "FAIL hf_remote_logits: our side failed (above)"; exit 1; }
"$HPY" tests/hf_remote/compare.py check "$WORK" "$CODE" >"$WORK/check.out" 2>"$WORK/check.log"
rc=$?
cat "$WORK/check.out"
if [ $rc != 0 ] && ! grep -q "^FAIL hf_remote_" "$WORK/check.out"; then
  tail -20 "$WORK/check.log"
  echo "FAIL hf_remote_logits: the official side failed (above)"
fi
exit $(( rc != 0 ))
