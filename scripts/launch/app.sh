#!/usr/bin/env bash
# The web page: generate audio from a checkpoint for an uploaded video and/or a caption
# (README "The web page").
#   bash scripts/launch/app.sh model.ckpt_path=RUN/checkpoint_latest.pth [--host H] [--port N] [--config PATH] [key=value ...]
# It serves http://127.0.0.1:7860 by default (loopback only); stop it with Ctrl-C.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$WAVFLOW_PYTHON" -m wavflow.app "$@"
