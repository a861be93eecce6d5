#!/usr/bin/env bash
# Example: Megatron-LM's own pretrain_gpt.py with the specialization losses (R_sp + R_cp) and the
# routing metrics, on one node. Apply the patch first:
#   scripts/apply_megatron_lm_patch.sh "$MEGATRON_LM_DIR"
# Then:
#   MEGATRON_LM_DIR=~/Megatron-LM NPROC=8 scripts/pretrain_megatron_lm.sh [extra pretrain_gpt.py flags]
# The model is a small vanilla top-k MoE (12 layers, 8 experts, top-2, SwiGLU), on Megatron's mock
# data unless DATA_PATH is set. Extra arguments are appended (and so override the ones below).
# docs/megatron_lm.md lists every --moe-spec-* flag.
set -euo pipefail

: "${MEGATRON_LM_DIR:?set MEGATRON_LM_DIR to a Megatron-LM checkout patched with scripts/apply_megatron_lm_patch.sh}"
here="$(cd "$(dirname "$0")/.." && pwd)"
NPROC="${NPROC:-8}"
EP="${EP:-$NPROC}"                      # expert parallel size (8 experts over the GPUs)
RUN_DIR="${RUN_DIR:-$PWD/runs/megatron_lm_sp_cp}"
mkdir -p "$RUN_DIR"

if ! grep -q "megatron-moe-spec" "$MEGATRON_LM_DIR/pretrain_gpt.py"; then
  echo "error: $MEGATRON_LM_DIR is not patched; run scripts/apply_megatron_lm_patch.sh $MEGATRON_LM_DIR" >&2
  exit 1
fi

if [ -n "${DATA_PATH:-}" ]; then
  DATA_ARGS=(--data-path "$DATA_PATH" --tokenizer-type "${TOKENIZER_TYPE:-GPT2BPETokenizer}"
             --vocab-file "${VOCAB_FILE:?set VOCAB_FILE}" --merge-file "${MERGE_FILE:?set MERGE_FILE}"
             --split 949,50,1)
else
  DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000)
fi

MODEL_ARGS=(
  --num-layers 12 --hidden-size 768 --num-attention-heads 12
  --ffn-hidden-size 1344 --swiglu --normalization RMSNorm --disable-bias-linear
  --position-embedding-type rope --untie-embeddings-and-output-weights
  --seq-length 1024 --max-position-embeddings 1024
)
MOE_ARGS=(
  --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 1344
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
  --moe-token-dispatcher-type alltoall --expert-model-parallel-size "$EP"
  --moe-grouped-gemm --moe-per-layer-logging
)
# The specialization losses (all off by default). Equivalent: --moe-spec-config a YAML file with a
# specialization: block, e.g. --moe-spec-config "$here/configs/variants/lb_sp_cp.yaml".
SPEC_ARGS=(
  --moe-spec-sp-coeff 2e-3
  --moe-spec-cp-coeff 1e-3
  --moe-spec-metrics --moe-spec-metrics-interval 10
)
TRAIN_ARGS=(
  --micro-batch-size 4 --global-batch-size 256 --train-iters 20000
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 500
  --weight-decay 0.1 --clip-grad 1.0 --bf16
  --log-interval 10 --eval-interval 1000 --eval-iters 10
  --save "$RUN_DIR/checkpoints" --save-interval 1000 --tensorboard-dir "$RUN_DIR/tensorboard"
)

cd "$MEGATRON_LM_DIR"
export PYTHONPATH="$here:$MEGATRON_LM_DIR:${PYTHONPATH:-}"
exec torchrun --nproc-per-node "$NPROC" pretrain_gpt.py \
  "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${SPEC_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" "$@"
