# Shared by pretrain_stage1.sh, pretrain_stage2.sh, finetune_stage3.sh (sourced, not run).
#
# Mode: with DATA_PATH set the scripts run the paper's settings on GPUs (no GPU is an error, never a silent
# fallback to the demo); with QWENVL_DEMO=1 or DATA_PATH unset they run the tiny model on the synthetic demo
# corpus with gloo on CPU (prepared once under $DEMO_DIR) and say so on their first output line.
# Launch: torchrun over NNODES x GPUS_PER_NODE (NODE_RANK, MASTER_ADDR, MASTER_PORT as usual). Started by
# torchrun itself (`torchrun --nnodes N --nproc-per-node 8 --no-python examples/pretrain_stage1.sh`), a
# script is one rank and runs its trainer directly.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python

# torchrun exports these to every worker it starts.
UNDER_TORCHRUN=0
if [ -n "${TORCHELASTIC_RUN_ID:-}" ] && [ -n "${LOCAL_RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ]; then
  UNDER_TORCHRUN=1
fi

say() {  # once per node: from the launcher, or from local rank 0 under torchrun
  if [ "$UNDER_TORCHRUN" = 0 ] || [ "$LOCAL_RANK" = 0 ]; then echo "$@"; fi
}

if [ "${QWENVL_DEMO:-}" = 1 ] || { [ -z "${DATA_PATH:-}" ] && [ "${QWENVL_DEMO:-}" != 0 ]; }; then
  reason="DATA_PATH unset"; [ "${QWENVL_DEMO:-}" = 1 ] && reason="QWENVL_DEMO=1"
  QWENVL_DEMO=1
  say "demo mode: tiny model on the synthetic corpus, CPU/gloo ($reason)"
  export CUDA_VISIBLE_DEVICES=""  # the demo is the CPU path, also on a machine with GPUs
else
  if [ -z "${DATA_PATH:-}" ]; then
    echo "error: QWENVL_DEMO=0 but DATA_PATH is unset: set DATA_PATH (indexed dataset prefixes, optional" \
         "weights) for a cluster run" >&2
    exit 1
  fi
  QWENVL_DEMO=0
  if ! "$PYTHON" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: DATA_PATH is set but $PYTHON sees no CUDA GPU (torch.cuda.is_available() is false); the" \
         "cluster stages need GPUs. Unset DATA_PATH or set QWENVL_DEMO=1 for the CPU demo." >&2
    exit 1
  fi
fi

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ "$QWENVL_DEMO" = 1 ]; then
  GPUS_PER_NODE="${GPUS_PER_NODE:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
elif [ "$UNDER_TORCHRUN" = 0 ]; then
  GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
fi
CKPT_ROOT="${CKPT_ROOT:-$REPO/checkpoints}"
DEMO_DIR="${DEMO_DIR:-/tmp/qwenvl_demo}"

# The trainer: this rank's process when torchrun started the script, else torchrun over this node's GPUs.
# exec, so that a signal for the script (Slurm's pre-emption SIGTERM) reaches torchrun or the trainer itself.
launch() {
  if [ "$UNDER_TORCHRUN" = 1 ]; then
    exec "$PYTHON" -m qwenvl_megatron.training.train "$@"
  fi
  exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m qwenvl_megatron.training.train "$@"
}

# --load for a stage: resume its own checkpoint if it has one, else the previous stage's weights only.
load_flags() {  # $1 = this stage's save dir, $2 = previous stage's dir (may be empty)
  if [ -f "$1/latest_checkpointed_iteration.txt" ]; then
    echo "--load $1"
  elif [ -n "$2" ]; then
    echo "--load $2 --load-weights-only"
  fi
}

# Synthetic corpus -> SentencePiece tokenizer -> tiny model config -> indexed datasets, once per $DEMO_DIR.
# Under torchrun local rank 0 prepares and the other ranks wait for its ready file (no two writers).
prepare_demo() {
  [ -f "$DEMO_DIR/ready" ] && return
  if [ "$UNDER_TORCHRUN" = 1 ] && [ "$LOCAL_RANK" != 0 ]; then
    wait_for_demo
    return
  fi
  mkdir -p "$DEMO_DIR"
  "$PYTHON" "$REPO/tools/make_synthetic_dataset.py" --out "$DEMO_DIR/raw" --num-train 400 --num-heldout 20 \
    --image-size 112 --seed 1 --quiet
  "$PYTHON" "$REPO/tools/train_tokenizer.py" --input "$DEMO_DIR/raw/corpus.txt" --vocab-size 600 \
    --output "$DEMO_DIR/tok"
  "$PYTHON" - "$DEMO_DIR" <<'PY'
import json, sys
from qwenvl_megatron.data.tokenizer import build_tokenizer
from qwenvl_megatron.models.config import tiny
d = sys.argv[1]
tok = build_tokenizer("sentencepiece", f"{d}/tok.model")
cfg = tiny(vocab_size=tok.vocab_size, image_start_id=tok.img_start_id)
json.dump(cfg.to_hf_config(), open(f"{d}/model_config.json", "w"), indent=2)
PY
  for s in 1 2 3; do
    input="$DEMO_DIR/raw/stage$s.jsonl"; [ "$s" = 3 ] && input="$DEMO_DIR/raw/stage3.json"
    "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$input" --tokenizer-type sentencepiece \
      --tokenizer-model "$DEMO_DIR/tok.model" --output-prefix "$DEMO_DIR/stage$s" --workers 2 \
      --seq-length 160 --num-image-tokens 16 --too-long truncate
  done
  touch "$DEMO_DIR/ready"
}

wait_for_demo() {
  local limit="${DEMO_PREPARE_TIMEOUT:-600}" start=$SECONDS
  until [ -f "$DEMO_DIR/ready" ]; do
    if [ $((SECONDS - start)) -ge "$limit" ]; then
      echo "error: local rank $LOCAL_RANK waited ${limit} s for $DEMO_DIR/ready (local rank 0 prepares the demo" \
           "data: see its output; DEMO_PREPARE_TIMEOUT sets the wait)" >&2
      exit 1
    fi
    sleep 1
  done
}

# Flags every demo stage shares: tiny model, fp32, gloo, small batches.
demo_flags() {
  echo "--model-config $DEMO_DIR/model_config.json --tokenizer-type sentencepiece --tokenizer-model $DEMO_DIR/tok.model" \
       "--transformer-impl local --micro-batch-size 4 --global-batch-size 16 --log-interval 5 --save-interval 50" \
       "--image-backend pil"
}

# Flags every cluster stage shares: the 7B model in bf16, ZeRO-style optimizer, Qwen tokenizer, saves and
# TensorBoard under the stage's save dir ($1).
cluster_flags() {
  echo "--model ${MODEL:-qwen-vl-7b} --bf16 --use-distributed-optimizer --overlap-grad-reduce" \
       "--tokenizer-type qwen --tokenizer-model ${TOKENIZER_MODEL:-$REPO/.venv/share/qwen.tiktoken}" \
       "--save $1 --save-interval ${SAVE_INTERVAL:-1000} --tensorboard-dir $1/tensorboard"
}
