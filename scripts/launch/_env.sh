# Sourced by the launchers: pick the Python environment and the number of processes.
# Logic beyond that lives in Python (python -m wavflow...), where tests can reach it.
WAVFLOW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${WAVFLOW_PYTHON:-}" ]; then
  if [ ! -x "$WAVFLOW_ROOT/.venv/bin/python" ]; then
    echo "[wavflow] no .venv yet: running scripts/setup.sh first" >&2
    bash "$WAVFLOW_ROOT/scripts/setup.sh"
  fi
  WAVFLOW_PYTHON="$WAVFLOW_ROOT/.venv/bin/python"
fi
export PYTHONPATH="$WAVFLOW_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Number of visible GPUs (0 on a CPU machine); launchers default NPROC_PER_NODE from it.
wavflow_gpu_count() {
  "$WAVFLOW_PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
}
# torchrun from the same environment, through wavflow.torchrun_guard: it dies with this launcher
# (and its ranks with it), and exits with the job's code (2 fatal, 1 rows failed, 0 ok) instead
# of torchrun's 1 for any failure.
wavflow_torchrun() {
  "$WAVFLOW_PYTHON" -m wavflow.torchrun_guard "$@"
}
# Run torchrun with its arguments so that SIGTERM/SIGINT reach the training processes
# (torchrun's children), not torchrun: each rank stops after its step, rank 0 writes
# checkpoint_latest.pth, and the run exits 0 (a signalled torchrun would instead exit 1 with a
# SignalException traceback). torchrun runs in its own session (--own-session) so a terminal's
# Ctrl-C reaches it only through this forwarding; it still dies with this launcher (see
# wavflow/torchrun_guard.py). Exits with the job's code.
wavflow_torchrun_forwarding_signals() {
  local torchrun_pid rc
  "$WAVFLOW_PYTHON" -m wavflow.torchrun_guard --own-session "$@" &
  torchrun_pid=$!
  trap "pkill -TERM -P $torchrun_pid 2>/dev/null || kill -TERM $torchrun_pid 2>/dev/null || true" TERM
  trap "pkill -INT -P $torchrun_pid 2>/dev/null || kill -INT $torchrun_pid 2>/dev/null || true" INT
  set +e
  while :; do
    wait "$torchrun_pid"; rc=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break  # wait returned early because a signal was trapped
  done
  exit "$rc"
}
# The body of extract_t2a.sh / extract_vt2a.sh: torchrun over the extraction job in MODE.
# extraction.mode=MODE is passed first, so a config file cannot switch the mode; an explicit
# extraction.mode=... word on the command line still can. NPROC_PER_NODE defaults to 2 with two
# or more GPUs, else 1.
wavflow_extract() {
  local mode="$1" gpus
  shift
  export CONFIG_PATH="${CONFIG_PATH:-$WAVFLOW_ROOT/configs/extract_$mode.yaml}"
  if [ -z "${NPROC_PER_NODE:-}" ]; then
    gpus="$(wavflow_gpu_count)"
    if [ "$gpus" -ge 2 ] 2>/dev/null; then NPROC_PER_NODE=2; else NPROC_PER_NODE=1; fi
  fi
  echo "[wavflow] torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m wavflow.features.extract extraction.mode=$mode $* (config $CONFIG_PATH unless --config is given)" >&2
  wavflow_torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m wavflow.features.extract "extraction.mode=$mode" "$@"
}
