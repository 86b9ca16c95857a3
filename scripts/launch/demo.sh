#!/usr/bin/env bash
# The whole WavFlow pipeline on built-in procedural data, on CPU or GPU:
# make data -> extract features (tiny encoders) -> train -> predict -> mux mp4 -> metrics -> figure.
#   bash scripts/launch/demo.sh [--config PATH] [key=value ...]     (e.g. demo.train.max_steps=600)
# Env: DEMO_OUT (output folder, default demo_output), NPROC_PER_NODE (processes for extraction
# and training), CONFIG_PATH (default configs/demo.yaml). Sets up .venv on first use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
extra=()
[ -n "${DEMO_OUT:-}" ] && extra+=("demo.out_dir=$DEMO_OUT")
[ -n "${NPROC_PER_NODE:-}" ] && extra+=("demo.nproc=$NPROC_PER_NODE")
exec "$WAVFLOW_PYTHON" -m wavflow.demo "${extra[@]}" "$@"
