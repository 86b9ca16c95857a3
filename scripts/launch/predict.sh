#!/usr/bin/env bash
# Generate audio for a CSV of videos / captions (README "Inference").
#   bash scripts/launch/predict.sh [--gpu N] [--config PATH] [key=value ...]
# GPU=N and CONFIG_PATH=... work as environment variables too. --gpu / GPU take device indices
# (0 or 0,1) and fail when CUDA is not available; leave them out to run on CPU (or on any GPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# --gpu / GPU pick the device (CUDA_VISIBLE_DEVICES) in Python: python -m wavflow.predict.
exec "$WAVFLOW_PYTHON" -m wavflow.predict "$@"
