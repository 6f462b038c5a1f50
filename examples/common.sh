# Shared by pretrain_stage1.sh, pretrain_stage2.sh, finetune_stage3.sh (sourced, not run).
#
# Launch: torchrun over NNODES x GPUS_PER_NODE (NODE_RANK, MASTER_ADDR, MASTER_PORT as usual).
# Mode: GPU runs the paper's settings; without a GPU (or with QWENVL_DEMO=1) the same scripts run the tiny
# model on the synthetic demo corpus with gloo on 2 processes (prepared once under $DEMO_DIR).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python

if [ -z "${QWENVL_DEMO:-}" ]; then
  if "$PYTHON" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    QWENVL_DEMO=0
  else
    QWENVL_DEMO=1
  fi
fi

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ "$QWENVL_DEMO" = 1 ]; then
  GPUS_PER_NODE="${GPUS_PER_NODE:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
fi
CKPT_ROOT="${CKPT_ROOT:-$REPO/checkpoints}"
DEMO_DIR="${DEMO_DIR:-/tmp/qwenvl_demo}"

launch() {
  "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
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

prepare_demo() {  # synthetic corpus -> SentencePiece tokenizer -> tiny model config -> indexed datasets
  [ -f "$DEMO_DIR/ready" ] && return
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

# Flags every demo stage shares: tiny model, fp32, gloo, small batches.
demo_flags() {
  echo "--model-config $DEMO_DIR/model_config.json --tokenizer-type sentencepiece --tokenizer-model $DEMO_DIR/tok.model" \
       "--transformer-impl local --micro-batch-size 4 --global-batch-size 16 --log-interval 5 --save-interval 50" \
       "--image-backend pil"
}

# Flags every cluster stage shares: the 7B model in bf16, ZeRO-style optimizer, Qwen tokenizer, saves and
# TensorBoard under the stage's save dir ($1).
cluster_flags() {
  echo "--model ${MODEL:-qwen-vl-7b} --bf16 --use-distributed-optimizer" \
       "--tokenizer-type qwen --tokenizer-model ${TOKENIZER_MODEL:-$REPO/.venv/share/qwen.tiktoken}" \
       "--save $1 --save-interval ${SAVE_INTERVAL:-1000} --tensorboard-dir $1/tensorboard"
}
