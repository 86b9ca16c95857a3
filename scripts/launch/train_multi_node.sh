#!/usr/bin/env bash
# Train on several nodes with torchrun (DDP). Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash scripts/launch/train_multi_node.sh [--config PATH] [key=value ...]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 bash scripts/launch/train_multi_node.sh [--config PATH] [key=value ...]
# Env: NNODES, NODE_RANK, MASTER_ADDR (required), MASTER_PORT (default 29500),
# NPROC_PER_NODE (default: number of GPUs, 1 on a CPU-only machine), CONFIG_PATH, WAVFLOW_PYTHON.
set -euo pipefail
for arg in "$@"; do
  case "$arg" in
    -m|--multirun)
      echo "[wavflow] train_multi_node.sh: -m sweeps run on one node (scripts/launch/train_single_node.sh -m ...);" >&2
      echo "  for a multi-node sweep, run this launcher once per point with training.experiment_id set." >&2
      exit 2 ;;
  esac
done
missing=()
for var in NNODES NODE_RANK MASTER_ADDR; do
  [ -n "${!var:-}" ] || missing+=("$var")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[wavflow] train_multi_node.sh: ${missing[*]} not set." >&2
  echo "  Set NNODES (number of nodes), NODE_RANK (0..NNODES-1, this node) and MASTER_ADDR (host of node 0), e.g." >&2
  echo "  NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash scripts/launch/train_multi_node.sh --config configs/train.yaml" >&2
  echo "  For a single node use scripts/launch/train_single_node.sh." >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$(wavflow_gpu_count)"
  [ "$NPROC_PER_NODE" -ge 1 ] 2>/dev/null || NPROC_PER_NODE=1
fi
echo "[wavflow] node $NODE_RANK/$NNODES -> $MASTER_ADDR:$MASTER_PORT, $NPROC_PER_NODE process(es): wavflow.train $*" >&2
# SIGTERM/SIGINT reach the ranks, which checkpoint and exit 0 (see _env.sh).
wavflow_torchrun_forwarding_signals --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" -m wavflow.train "$@"
