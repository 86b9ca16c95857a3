#!/usr/bin/env bash
# Feature extraction (t2a): CSV -> CLIP text features (<id>.pth) + training CSV (Synchformer is never loaded).
#   bash scripts/launch/extract_t2a.sh [--config PATH] [key=value ...]
# Env: NPROC_PER_NODE (default: 2 with two or more GPUs, 1 with one GPU or on CPU),
# CONFIG_PATH (same as --config; default configs/extract_t2a.yaml), WAVFLOW_PYTHON.
# See TRAINING.md, "Feature extraction"; the launch logic is wavflow_extract in _env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
wavflow_extract t2a "$@"
