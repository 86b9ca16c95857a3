"""Peak training memory per model preset x strategy x gradient checkpointing, so a user can pick a
setting for their machine before launching (TRAINING.md, "Sharded training (FSDP) and memory").

    python scripts/bench/train_memory.py --demo DEMO_OUT [--presets tiny_16k,small_16k] [--nproc 2]
        [--steps 12] [--checkpointing false,true] [--json OUT]

Each cell is a fresh run of `scripts/launch/train_single_node.sh` on `--nproc` processes (gloo on
CPU, NCCL on GPUs) over the demo's training rows (`bash scripts/launch/demo.sh`), batch 16 per
rank, `--steps` optimiser steps; the figures are what the run's training.log states: rank 0's
peak memory (the resident set on CPU, CUDA memory allocated by torch on a GPU) and the median
step time. Not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wavflow.demo.finetune_stage import train_log_figures  # noqa: E402


def run_cell(demo: Path, preset: str, strategy: str, checkpointing: str, nproc: int, steps: int) -> dict:
    train_csvs = sorted((demo / "features").glob("train_*_features.csv"))
    if not train_csvs:
        raise SystemExit(f"no train_*_features.csv under {demo / 'features'}: run bash scripts/launch/demo.sh first")
    demo_cfg = next((demo / "train").glob("*/config.yaml"))
    with tempfile.TemporaryDirectory() as out:
        words = ["--config", str(demo_cfg), f"model.name={preset}", f"data.train_csv=[{','.join(map(str, train_csvs))}]",
                 f"training.output_dir={out}", "training.experiment_id=memory", f"training.max_steps={steps}",
                 "training.epochs=1000", "training.batch_size=16", "training.log_freq=2", "training.resume=false",
                 "training.gen_train_freq=0", "training.checkpoint_freq=0", "training.checkpoint_save_epoch=0",
                 "training.ema_checkpoint_save_epoch=0", "training.tensorboard=false", "training.init_from=null",
                 "training.init_from_sha256=null", f"training.strategy={strategy}",
                 f"training.gradient_checkpointing={checkpointing}"]
        env = dict(os.environ, NPROC_PER_NODE=str(nproc), WAVFLOW_PYTHON=sys.executable)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        proc = subprocess.run(["bash", str(ROOT / "scripts/launch/train_single_node.sh"), *words], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{preset} {strategy} checkpointing={checkpointing} failed:\n{proc.stderr}")
        figures = train_log_figures(Path(out) / "memory" / "training.log", 16)  # rank 0 logs its own rows/s
    return {"preset": preset, "strategy": strategy, "gradient_checkpointing": checkpointing, "nproc": nproc,
            "peak_mb": figures["peak_mb"], "state_mb": figures["state_mb"], "step_seconds": figures["step_seconds"],
            "params": figures["total_params"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, required=True)
    p.add_argument("--presets", default="tiny_16k,small_16k")
    p.add_argument("--strategies", default="ddp,fsdp")
    p.add_argument("--checkpointing", default="false,true")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    rows = []
    for preset in a.presets.split(","):
        for strategy in a.strategies.split(","):
            for ckpt in a.checkpointing.split(","):
                row = run_cell(a.demo, preset, strategy, ckpt, a.nproc, a.steps)
                rows.append(row)
                print(f"{preset:10s} {strategy:5s} checkpointing={ckpt:6s} ranks {a.nproc}  peak {row['peak_mb']} MB  "
                      f"state {row['state_mb']} MB  "
                      f"step {row['step_seconds']} s  ({row['params']:,d} parameters)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
