#!/usr/bin/env bash
# Stage 1 (paper): ViT + adapter trained on image-text pairs, the whole LLM frozen; 224px, seq 512,
# global batch 30720, 50k iterations, LR 2e-4 -> 1e-6 (500 warmup), ViT layer decay 0.95.
# Starts from INIT_CHECKPOINT (OpenCLIP ViT-bigG + Qwen-7B converted by tools/convert_checkpoint.py; weights
# only) and resumes its own checkpoint in $CKPT_ROOT/stage1 when one exists.
#   GPU:  DATA_PATH="0.8 data/laion 0.2 data/coyo" INIT_CHECKPOINT=ckpt/init NNODES=32 NODE_RANK=... \
#         MASTER_ADDR=... bash examples/pretrain_stage1.sh
#    or:  DATA_PATH=... INIT_CHECKPOINT=... torchrun --nnodes 32 --nproc-per-node 8 --rdzv-endpoint ... \
#         --no-python examples/pretrain_stage1.sh      (each rank runs its trainer directly)
#   CPU demo (DATA_PATH unset, or QWENVL_DEMO=1): bash examples/pretrain_stage1.sh
#   DATA_PATH set without a GPU is an error.
# Extra arguments are passed to the trainer and override the defaults (e.g. --train-iters 100).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SAVE="$CKPT_ROOT/stage1"
if [ "$QWENVL_DEMO" = 1 ]; then
  prepare_demo
  launch --stage 1 $(demo_flags) --image-size 56 --seq-length 64 --train-iters "${TRAIN_ITERS:-40}" \
    --lr-warmup-iters 4 --lr 1e-3 --min-lr 1e-5 --data-path "$DEMO_DIR/stage1" --save "$SAVE" \
    $(load_flags "$SAVE" "${INIT_CHECKPOINT:-}") "$@"
else
  launch --stage 1 $(cluster_flags "$SAVE") \
    --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}" \
    --micro-batch-size "${MBS:-4}" --data-path ${DATA_PATH:?set DATA_PATH (indexed dataset prefixes, optional weights)} \
    $(load_flags "$SAVE" "${INIT_CHECKPOINT:-}") "$@"
fi
