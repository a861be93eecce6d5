#!/usr/bin/env bash
# Distributed pretraining with torchrun: one `megatron-moe-spec train` process per GPU (or per CPU rank).
#
#   scripts/pretrain.sh CONFIG [CONFIG ...] [--set KEY=VALUE ...]
#
# One node (default): NPROC_PER_NODE processes, default = the smallest world size the config runs on
# (tp*pp*cp, etp*ep*pp and the batch sizes). Several nodes: run the same command on every node with
#   NNODES=N NODE_RANK=<0..N-1> MASTER_ADDR=<node 0's address> MASTER_PORT=<port> NPROC_PER_NODE=<GPUs per node>
# Without a GPU the processes run on CPU with gloo (the driver says so once).
#
# Environment: sources scripts/_env.sh (creates / activates .venv) unless MMS_NO_SETUP=1 (use the
# python already on PATH, or $PYTHON, e.g. on a cluster with its own environment).
# Exit code: the training's (2 = configuration error, reported before anything is started).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$#" -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
if [ "${MMS_NO_SETUP:-0}" != "1" ]; then
  # shellcheck disable=SC1091
  source "$ROOT/scripts/_env.sh"
fi
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
if [ -z "${MASTER_PORT:-}" ]; then
  if [ "$NNODES" != "1" ]; then
    echo "error: MASTER_PORT must be set for a multi-node run (the same on every node)" >&2
    exit 2
  fi
  MASTER_PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  # Validates the config too (exit 2 with the message on an invalid one).
  world="$("$PY" -m megatron_moe_spec train "$@" --print-world-size)"
  NPROC_PER_NODE=$(( (world + NNODES - 1) / NNODES ))
fi

echo "[pretrain] torchrun: $NNODES node(s) x $NPROC_PER_NODE process(es), node rank $NODE_RANK, master $MASTER_ADDR:$MASTER_PORT" >&2
exec "$PY" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m megatron_moe_spec train "$@"
