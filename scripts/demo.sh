#!/usr/bin/env bash
# The CPU demo: set up, build a small offline corpus (docs/data.md), train configs/tiny_deepseek.yaml with R_sp + R_cp
# (and megatron's load balancing) on 2 gloo processes with expert parallelism 2, print a first-vs-last
# table, then the HTML report (when the report command is installed).
#
#   scripts/demo.sh                      # a few minutes on 2 CPU cores
#   DEMO_ITERS=100 scripts/demo.sh       # shorter
#   MMS_MEGATRON_CORE=0.19.2 scripts/demo.sh   # on another megatron-core (scripts/_env.sh)
#   MMS_NO_SETUP=1 scripts/demo.sh       # use the python on PATH instead of .venv (scripts/_env.sh)
#   DEMO_RUN_DIR=runs/demo_lb scripts/demo.sh --set specialization.sp_coeff=0 --set specialization.cp_coeff=0
#                                        # extra --set arguments go to the training (here: a baseline)
#
# Writes data/demo/ (the corpus, reused on re-runs) and runs/demo/ (the run directory, replaced).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${MMS_NO_SETUP:-0}" != "1" ]; then
  # shellcheck disable=SC1091
  source "$ROOT/scripts/_env.sh"
fi
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DATA="${DEMO_DATA:-data/demo}"
RUN="${DEMO_RUN_DIR:-runs/demo}"
ITERS="${DEMO_ITERS:-300}"
NPROC="${DEMO_NPROC:-2}"

echo "== 1/3 data: a small offline corpus (prose / code / technical, 400 kB each) in $DATA"
# ~0.56 M train tokens with a 512-token BPE: 300 steps of 8 x 128 tokens see about half of them once.
"$PY" -m megatron_moe_spec.commands.prepare_data --output "$DATA" --vocab-size 512 \
  --max-bytes-per-domain 400000

echo "== 2/3 train: configs/tiny_deepseek.yaml, $ITERS steps, $NPROC processes, expert parallel $NPROC"
rm -rf "$RUN"
start=$(date +%s)
MMS_NO_SETUP=1 PYTHON="$PY" NPROC_PER_NODE="$NPROC" "$ROOT/scripts/pretrain.sh" configs/tiny_deepseek.yaml \
  --set data.type=indexed \
  --set "data.paths=[$DATA/indexed/corpus]" \
  --set "data.tokenizer_path=$DATA/tokenizer" \
  --set "parallel.ep=$NPROC" \
  --set model.moe_token_dispatcher_type=alltoall \
  --set "training.train_iters=$ITERS" \
  --set checkpoint.save_interval=0 \
  --set checkpoint.resume=none \
  --set logging.progress_bar=false \
  --set "logging.run_dir=$RUN" \
  "$@"
echo "training took $(( $(date +%s) - start ))s"

echo "== 3/3 summary ($RUN/metrics.jsonl)"
"$PY" -m megatron_moe_spec.training.summary "$RUN"
if [ -f "$ROOT/megatron_moe_spec/commands/report.py" ]; then
  "$PY" -m megatron_moe_spec.commands.report "$RUN"
fi
