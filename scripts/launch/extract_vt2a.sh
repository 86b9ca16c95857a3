#!/usr/bin/env bash
# Feature extraction (vt2a): CSV -> CLIP frame + Synchformer + CLIP text features (<id>.pth) + training CSV.
#   bash scripts/launch/extract_vt2a.sh [--config PATH] [key=value ...]
# Env: NPROC_PER_NODE (default: 2 with two or more GPUs, 1 with one GPU or on CPU),
# CONFIG_PATH (same as --config; default configs/extract_vt2a.yaml), WAVFLOW_PYTHON.
# See TRAINING.md, "Feature extraction"; the launch logic is wavflow_extract in _env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
wavflow_extract vt2a "$@"
