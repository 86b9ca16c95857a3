#!/usr/bin/env bash
# Does WavFlow learn? Memorise (4 clips / 4 captions), generalise (procedural set, held-out
# clips, judged per mode) and robustness (the demo's recipe on data-set variations nobody tuned
# it to) on the real pipeline, with metric-vs-step curves, metrics.json and the git revision.
#   bash scripts/bench/learning_benchmark.sh [--config PATH] [key=value ...]
# e.g. bench.stages=[robustness], bench.stages=[memorise] bench.memorise.max_steps=1500, or on a GPU bench.precision=auto.
# Results and the steps/wall time needed are recorded in docs/benchmarks.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/_env.sh"
exec "$WAVFLOW_PYTHON" -m wavflow.demo.learning_benchmark "$@"
