#!/usr/bin/env bash
# Train on a SLURM allocation: one torchrun per node, started by srun, joined through node 0.
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 scripts/launch/train_slurm.sh [--config PATH] [key=value ...]
# or, inside an allocation (salloc), the same line with bash instead of sbatch.
# As the batch script it runs itself once per node through srun; as an srun task (SLURM_STEP_ID
# set) it maps SLURM's variables onto scripts/launch/train_multi_node.sh's:
#   NNODES      <- SLURM_NNODES (or SLURM_JOB_NUM_NODES)
#   NODE_RANK   <- SLURM_NODEID
#   MASTER_ADDR <- the first host of SLURM_JOB_NODELIST (scontrol show hostnames)
#   MASTER_PORT <- MASTER_PORT if set, else 20000 + SLURM_JOB_ID % 20000 (jobs sharing a node differ)
#   NPROC_PER_NODE <- NPROC_PER_NODE if set, else SLURM_GPUS_ON_NODE, else the GPUs torch sees (1 on CPU)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
nnodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}"
if [ -z "$nodelist" ] || [ -z "$nnodes" ] || [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "[wavflow] train_slurm.sh: no SLURM allocation (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NNODES not set)." >&2
  echo "  Submit it with sbatch --nodes=N --ntasks-per-node=1 scripts/launch/train_slurm.sh [key=value ...]," >&2
  echo "  or outside SLURM use scripts/launch/train_single_node.sh / train_multi_node.sh." >&2
  exit 2
fi
if [ -z "${SLURM_STEP_ID:-}" ]; then
  # The batch script: one task per node; a failed node ends the whole step.
  exec srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$here/train_slurm.sh" "$@"
fi
if [ -z "${SLURM_NODEID:-}" ]; then
  echo "[wavflow] train_slurm.sh: SLURM_NODEID not set in this srun task." >&2
  exit 2
fi
master="$(scontrol show hostnames "$nodelist" | head -n 1)"
if [ -z "$master" ]; then
  echo "[wavflow] train_slurm.sh: scontrol show hostnames '$nodelist' gave no host." >&2
  exit 2
fi
export NNODES="$nnodes" NODE_RANK="$SLURM_NODEID" MASTER_ADDR="$master"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
if [ -z "${NPROC_PER_NODE:-}" ] && [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
  export NPROC_PER_NODE="$SLURM_GPUS_ON_NODE"
fi
exec bash "$here/train_multi_node.sh" "$@"
