#!/usr/bin/env bash
# Train on one node with torchrun (DDP): one process per GPU, or NPROC_PER_NODE processes.
#   bash scripts/launch/train_single_node.sh [--config PATH] [key=value ...]
# Env: NPROC_PER_NODE (default: number of GPUs, 1 on a CPU-only machine), CONFIG_PATH
# (same as --config; default configs/train.yaml), WAVFLOW_PYTHON (interpreter to use).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="$(wavflow_gpu_count)"
  [ "$NPROC_PER_NODE" -ge 1 ] 2>/dev/null || NPROC_PER_NODE=1
fi
echo "[wavflow] torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m wavflow.train $*" >&2
# SIGTERM/SIGINT go to the training processes (torchrun's children), not to torchrun: each
# rank stops after its step, rank 0 writes checkpoint_latest.pth, and the run exits 0 (a
# signalled torchrun would instead exit 1 with a SignalException traceback). torchrun runs in
# its own session (setsid) so a terminal's Ctrl-C reaches it only through this forwarding.
session=(); command -v setsid >/dev/null 2>&1 && session=(setsid)
"${session[@]}" "$WAVFLOW_PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" -m wavflow.train "$@" &
torchrun_pid=$!
forward() { pkill -"$1" -P "$torchrun_pid" 2>/dev/null || kill -"$1" "$torchrun_pid" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
set +e
while :; do
  wait "$torchrun_pid"; rc=$?
  kill -0 "$torchrun_pid" 2>/dev/null || break  # wait returned early because a signal was trapped
done
exit "$rc"
