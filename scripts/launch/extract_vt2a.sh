#!/usr/bin/env bash
# Feature extraction (vt2a): CSV -> CLIP frame + Synchformer + CLIP text features (<id>.pth) + training CSV.
#   bash scripts/launch/extract_vt2a.sh [--config PATH] [key=value ...]
# Env: NPROC_PER_NODE (default: 2 with two or more GPUs, 1 with one GPU or on CPU),
# CONFIG_PATH (same as --config; default configs/extract_vt2a.yaml), WAVFLOW_PYTHON.
# extraction.mode=vt2a is passed first, so a config file cannot switch the mode; an explicit
# extraction.mode=... word on this command line still can. See TRAINING.md, "Feature extraction".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
export CONFIG_PATH="${CONFIG_PATH:-$WAVFLOW_ROOT/configs/extract_vt2a.yaml}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  gpus="$(wavflow_gpu_count)"
  if [ "$gpus" -ge 2 ] 2>/dev/null; then NPROC_PER_NODE=2; else NPROC_PER_NODE=1; fi
fi
echo "[wavflow] torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m wavflow.features.extract extraction.mode=vt2a $* (config $CONFIG_PATH unless --config is given)" >&2
wavflow_torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m wavflow.features.extract extraction.mode=vt2a "$@"
