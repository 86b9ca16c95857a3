#!/usr/bin/env bash
# Does WavFlow learn? Memorise (4 clips / 4 captions) and generalise (procedural set, held-out
# clips) on the real pipeline, with a metric-vs-step curve, metrics.json and the git revision.
#   bash scripts/bench/learning_benchmark.sh [--config PATH] [key=value ...]
# e.g. bench.stages=[memorise] bench.memorise.max_steps=1500, or on a GPU bench.precision=auto.
# Results and the steps/wall time needed are recorded in docs/benchmarks.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/_env.sh"
exec "$WAVFLOW_PYTHON" -m wavflow.demo.learning_benchmark "$@"
