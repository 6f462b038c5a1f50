#!/usr/bin/env bash
# Stage 2 (paper): multi-task pretraining, everything trainable; 448px, seq 2048, global batch 4096,
# 19k iterations, LR 5e-5 -> 1e-5 (400 warmup), model parallel 2, activation recompute.
# Starts from stage 1's weights (fresh optimizer), resumes $CKPT_ROOT/stage2 when it has a checkpoint.
#   GPU:  DATA_PATH="..." NNODES=... bash examples/pretrain_stage2.sh
#   CPU demo (DATA_PATH unset, or QWENVL_DEMO=1): bash examples/pretrain_stage2.sh
#   DATA_PATH set without a GPU is an error.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SAVE="$CKPT_ROOT/stage2"
if [ "$QWENVL_DEMO" = 1 ]; then
  prepare_demo
  launch --stage 2 $(demo_flags) --image-size 112 --seq-length 128 --train-iters "${TRAIN_ITERS:-40}" \
    --lr-warmup-iters 4 --lr 5e-4 --min-lr 1e-5 --data-path "$DEMO_DIR/stage2" --save "$SAVE" \
    $(load_flags "$SAVE" "$CKPT_ROOT/stage1") "$@"
else
  # The paper packs each task's samples into rows of 2048 tokens: give DATA_PATH one prefix per task
  # ("W1 caption W2 vqa ..."); the global batch then counts rows (4096 x 2048).
  launch --stage 2 $(SAVE_INTERVAL="${SAVE_INTERVAL:-500}" cluster_flags "$SAVE") --recompute-activations \
    --pack-sequences --pack-same-task \
    --tensor-model-parallel-size "${TP:-2}" --pipeline-model-parallel-size "${PP:-1}" \
    --micro-batch-size "${MBS:-2}" --data-path ${DATA_PATH:?set DATA_PATH} \
    $(load_flags "$SAVE" "$CKPT_ROOT/stage1") "$@"
fi
