#!/usr/bin/env bash
# GPU readiness check (docs/benchmarks.md "GPU"): on a CUDA machine,
#   1. scripts/bench/bench_model.py --device cuda for small_16k and medium_16k, bf16, with
#      torch.compile off and on: trainer step, forward, generate_batch, data loader, each against
#      today's eager path and against the GPU's bf16 dense matmul rate measured in the same run (MFU);
#   2. a 2-process NCCL training smoke run (torchrun, 2 GPUs) on a synthetic data set, which
#      must end with "Weights identical on all 2 rank(s)".
# Usage: bash scripts/bench/gpu_check.sh [OUT_DIR]   (JSON + logs go to OUT_DIR, default
# bench_output/gpu). PYTHON=... picks the interpreter. Nothing here runs in the test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-bench_output/gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"

for preset in small_16k medium_16k; do
  if [ "$preset" = small_16k ]; then dur=1; batch=16; else dur=8; batch=8; fi
  for compile in false true; do
    echo "== bench $preset compile=$compile"
    "$PY" scripts/bench/bench_model.py --device cuda --preset "$preset" --batch "$batch" --duration "$dur" \
      --dtype bf16 --sample-dtype bf16 --sample-batch 4 --sample-steps 25 --repeats 10 --warmup 3 --workers 4 \
      --fast "optimizer_impl=fused,ema_impl=foreach,conv_impl=native,attention_backend=auto,compile=$compile" \
      --out "$OUT/${preset}_bf16_compile_${compile}.json" 2>&1 | tee "$OUT/${preset}_bf16_compile_${compile}.log"
  done
done

ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -lt 2 ]; then
  echo "only $ngpu GPU(s): the 2-process NCCL smoke run needs 2; skipped" | tee "$OUT/nccl_smoke.log"
  exit 0
fi
echo "== 2-process NCCL training smoke run"
data="$OUT/nccl_data"
"$PY" scripts/bench/bench_model.py --preset small_16k --duration 1 --batch 8 --write-dataset "$data"
torchrun --standalone --nproc_per_node 2 -m wavflow.train \
  model.name=small_16k data.audio_duration=1.0 data.clip_seq_len=8 data.sync_seq_len=16 \
  "data.train_csv=$data/train.csv" training.device=cuda training.precision=bf16 training.batch_size=8 \
  training.epochs=2 training.repeat_factor=4 training.warmup_steps=2 training.gen_train_freq=0 \
  training.checkpoint_save_epoch=0 training.ema_checkpoint_save_epoch=0 training.tensorboard=false \
  training.optimizer_impl=fused training.ema_impl=foreach training.resume=false \
  "training.output_dir=$OUT/nccl_run" training.experiment_id=smoke 2>&1 | tee "$OUT/nccl_smoke.log"
grep -q "Weights identical on all 2 rank(s)" "$OUT/nccl_smoke.log" && echo "NCCL smoke run: OK" \
  || { echo "NCCL smoke run: weights were not reported identical on both ranks" >&2; exit 1; }
