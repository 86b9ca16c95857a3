#!/usr/bin/env bash
# Metrics of generated audio against a reference set (README "Evaluation", TRAINING.md).
#   bash scripts/launch/evaluate.sh --generated DIR --reference CSV [--infer-csv CSV] [--out DIR]
#        [--config PATH] [key=value ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$WAVFLOW_PYTHON" -m wavflow.evaluate "$@"
