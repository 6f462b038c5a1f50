#!/usr/bin/env bash
# Stage 3 (paper): supervised fine-tuning on ChatML dialogues, ViT frozen; 448px, seq 2048, global batch 128,
# 8k iterations, LR 1e-5 -> 1e-6 (3000 warmup), model parallel 2, activation recompute.
# Starts from stage 2's weights (fresh optimizer), resumes $CKPT_ROOT/stage3 when it has a checkpoint.
#   GPU:  DATA_PATH="..." bash examples/finetune_stage3.sh
#   CPU demo (DATA_PATH unset, or QWENVL_DEMO=1): bash examples/finetune_stage3.sh
#   DATA_PATH set without a GPU is an error.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SAVE="$CKPT_ROOT/stage3"
if [ "$QWENVL_DEMO" = 1 ]; then
  prepare_demo
  launch --stage 3 $(demo_flags) --image-size 112 --seq-length 128 --train-iters "${TRAIN_ITERS:-40}" \
    --lr-warmup-iters 4 --lr 2e-4 --min-lr 1e-5 --data-path "$DEMO_DIR/stage3" --save "$SAVE" \
    $(load_flags "$SAVE" "$CKPT_ROOT/stage2") "$@"
else
  # Conversations packed into rows of 2048 tokens, each attending only to itself (the global batch counts rows).
  launch --stage 3 $(SAVE_INTERVAL="${SAVE_INTERVAL:-500}" cluster_flags "$SAVE") --recompute-activations \
    --pack-sequences \
    --tensor-model-parallel-size "${TP:-2}" --pipeline-model-parallel-size "${PP:-1}" \
    --micro-batch-size "${MBS:-1}" --data-path ${DATA_PATH:?set DATA_PATH} \
    $(load_flags "$SAVE" "$CKPT_ROOT/stage2") "$@"
fi
