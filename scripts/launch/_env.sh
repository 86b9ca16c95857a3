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
# torchrun from the same environment.
wavflow_torchrun() {
  "$WAVFLOW_PYTHON" -m torch.distributed.run "$@"
}
