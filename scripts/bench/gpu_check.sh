#!/usr/bin/env bash
# GPU readiness check (docs/benchmarks.md "GPU"): on a CUDA machine,
#   1. scripts/bench/bench_model.py --device cuda for small_16k and medium_16k, bf16, with
#      torch.compile off and on: trainer step, forward, generate_batch, data loader, each against
#      today's eager path and against the GPU's bf16 dense matmul rate measured in the same run (MFU);
#   2. a training smoke run through torchrun with the NCCL backend on a synthetic data set: 2
#      processes when 2 GPUs are there (it must end with "Weights identical on all 2 rank(s)"),
#      else 1 process (the CUDA/NCCL/bf16/fused-AdamW training path end to end, not DDP itself).
# Usage: bash scripts/bench/gpu_check.sh [OUT_DIR]   (JSON + logs go to OUT_DIR, default
# bench_output/gpu). PYTHON=... picks the interpreter. Each run is limited to a time (seconds,
# environment: T_SMALL, T_MEDIUM, T_SMALL_COMPILE, T_MEDIUM_COMPILE, T_SMOKE); one that fails or
# runs out of time is reported and the rest still run; the exit status says whether all passed.
# DEVICE=cpu DTYPE=fp32 runs the same plumbing on a CPU (a dry run of this script, not a benchmark);
# BENCH_ARGS adds words to every bench_model.py call (e.g. "--repeats 1 --warmup 1").
# Nothing here runs in the test suite.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench_output/gpu}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')" || exit 2
  "$PY" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())" \
    | tee "$OUT/device.txt"
fi
failed=()

# run NAME SECONDS CMD...: CMD's output to the screen and $OUT/NAME.log, stopped after SECONDS
run() {
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit} s)"
  timeout --signal=INT --kill-after=20 "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "== $name: FAILED (exit $rc)"; failed+=("$name"); fi
  return 0
}

ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count() if '$DEVICE' == 'cuda' else 0)")
nproc=$(( ngpu >= 2 ? 2 : 1 ))
smoke() {
  local data="$OUT/smoke_data"
  "$PY" scripts/bench/bench_model.py --preset small_16k --duration 1 --batch 8 --write-dataset "$data" >/dev/null &&
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m wavflow.train \
    model.name=small_16k data.audio_duration=1.0 data.clip_seq_len=8 data.sync_seq_len=16 \
    "data.train_csv=$data/train.csv" "training.device=$DEVICE" "training.precision=$DTYPE" training.batch_size=8 \
    training.epochs=2 training.repeat_factor=4 training.warmup_steps=2 training.gen_train_freq=0 \
    training.checkpoint_save_epoch=0 training.ema_checkpoint_save_epoch=0 training.tensorboard=false \
    training.optimizer_impl=fused training.ema_impl=foreach training.resume=false \
    "training.output_dir=$OUT/smoke_run" training.experiment_id=smoke &&
  grep -q "Weights identical on all $nproc rank(s)" "$OUT/smoke_run/smoke/training.log"
}

bench() {  # bench PRESET COMPILE
  local preset=$1 compile=$2 dur=1 batch=16
  if [ "$preset" = medium_16k ]; then dur=8; batch=8; fi
  "$PY" scripts/bench/bench_model.py --device "$DEVICE" --preset "$preset" --batch "$batch" --duration "$dur" \
    --dtype "$DTYPE" --sample-dtype "$DTYPE" --sample-batch 4 --sample-steps 25 --repeats 10 --warmup 3 --workers 4 \
    --fast "optimizer_impl=fused,ema_impl=foreach,conv_impl=native,attention_backend=auto,compile=$compile" \
    --out "$OUT/${preset}_${DTYPE}_compile_${compile}.json" ${BENCH_ARGS:-}
}

export -f bench smoke  # `timeout` runs them in a child bash
export PY OUT DEVICE DTYPE nproc BENCH_ARGS=${BENCH_ARGS:-}

# Cheapest and most telling first, so a short lease still brings the eager numbers back.
run small_16k_${DTYPE}_compile_false "${T_SMALL:-120}" bench small_16k false
run smoke_nccl_${nproc}proc "${T_SMOKE:-120}" smoke
run medium_16k_${DTYPE}_compile_false "${T_MEDIUM:-180}" bench medium_16k false
run small_16k_${DTYPE}_compile_true "${T_SMALL_COMPILE:-300}" bench small_16k true
run medium_16k_${DTYPE}_compile_true "${T_MEDIUM_COMPILE:-400}" bench medium_16k true
[ "$DEVICE" = cuda ] && [ "$nproc" -lt 2 ] && echo "only $ngpu GPU: the smoke run used 1 process; the 2-process DDP/NCCL run still needs 2 GPUs"
if [ ${#failed[@]} -ne 0 ]; then echo "GPU check: failed or out of time: ${failed[*]}"; exit 1; fi
echo "GPU check: all runs passed"
