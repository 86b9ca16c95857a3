#!/usr/bin/env bash
# Train on one node with torchrun (DDP): one process per GPU, or NPROC_PER_NODE processes.
#   bash scripts/launch/train_single_node.sh [--config PATH] [key=value ...]
#   bash scripts/launch/train_single_node.sh -m training.lr=1e-4,3e-4 [key=value ...]   (a sweep)
# Env: NPROC_PER_NODE (default: number of GPUs, 1 on a CPU-only machine), CONFIG_PATH
# (same as --config; default configs/train.yaml), WAVFLOW_PYTHON (interpreter to use).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$(wavflow_gpu_count)"
  [ "$NPROC_PER_NODE" -ge 1 ] 2>/dev/null || NPROC_PER_NODE=1
fi
# -m / --multirun: a sweep. It is expanded here, outside torchrun, and each point runs as its own
# torchrun job in turn (wavflow/train/sweep.py): torchrun is never nested.
for arg in "$@"; do
  case "$arg" in
    -m|--multirun)
      echo "[wavflow] sweep: one torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m wavflow.train per point" >&2
      exec "$WAVFLOW_PYTHON" -m wavflow.train.sweep --nproc "$NPROC_PER_NODE" "$@" ;;
  esac
done
echo "[wavflow] torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m wavflow.train $*" >&2
# SIGTERM/SIGINT reach the ranks, which checkpoint and exit 0 (see _env.sh).
wavflow_torchrun_forwarding_signals --standalone --nproc_per_node="$NPROC_PER_NODE" -m wavflow.train "$@"
