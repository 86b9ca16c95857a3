"""What fine-tuning costs per way of doing it: trainable parameters, step time, training-state
memory and peak memory, for full fine-tuning, the last blocks only and LoRA (TRAINING.md
"Fine-tuning").

    python scripts/bench/finetune_cost.py --demo DEMO_OUT [--steps 12] [--lora-rank 8] [--json OUT]

Each way runs in a fresh process: the demo's training run (`bash scripts/launch/demo.sh`) is
started again from its own checkpoint (`training.init_from`) on its own training rows for
--steps optimiser steps. Step time is the median of the steps after the first two; the
training state is what the run holds per parameter (weights, gradients, AdamW moments, two
EMAs); peak memory is the process's peak resident set. Not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WAYS = ("full", "last_blocks", "lora")


def way_overrides(way: str, fused_blocks: int, lora_rank: int) -> list[str]:
    if way == "full":
        return []
    if way == "last_blocks":
        return [f"training.trainable=[fused_blocks.{fused_blocks - 1}.*,final_layer.*]"]
    return [f"training.lora.rank={lora_rank}"]


def state_bytes(trainer) -> int:
    """Bytes of weights, gradients, AdamW moments and EMA shadows the run holds."""
    params = list(trainer.model.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for state in trainer.optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "numel") and t.ndim > 0)
    for ema in (trainer.ema1, trainer.ema2):
        total += sum(t.numel() * t.element_size() for t in ema.shadow)
    return total


def child(args: argparse.Namespace) -> None:
    import torch

    from wavflow.config import load_config
    from wavflow.model.presets import PRESETS
    from wavflow.train.trainer import Trainer

    torch.set_num_threads(2)
    run = sorted((args.demo / "train").glob("*/checkpoint_latest.pth"))[0].parent
    with tempfile.TemporaryDirectory() as out:
        probe = load_config(run / "config.yaml", [], job="train")
        overrides = [f"training.init_from={run / 'checkpoint_latest.pth'}", f"training.output_dir={out}",
                     "training.experiment_id=finetune_cost", f"training.max_steps={args.steps}",
                     "training.epochs=1000", "training.gen_train_freq=0", "training.checkpoint_freq=0",
                     "training.checkpoint_save_epoch=0", "training.ema_checkpoint_save_epoch=0",
                     "training.save_every_steps=0", "training.tensorboard=false", "training.resume=false"]
        overrides += way_overrides(args.child, PRESETS[str(probe.model.name)].fused_depth, args.lora_rank)
        trainer = Trainer(load_config(run / "config.yaml", overrides, job="train"))
        times: list[float] = []
        update = trainer.step.update

        def timed(*a, **k):
            t0 = time.perf_counter()
            out_ = update(*a, **k)
            times.append(time.perf_counter() - t0)
            return out_

        trainer.step.update = timed
        trainer.train()
        print(json.dumps({
            "way": args.child, "trainable_params": trainer.trainable_params, "total_params": trainer.total_params,
            "trainable_share": trainer.trainable_params / trainer.total_params,
            "step_seconds_median": statistics.median(times[2:] or times),
            "training_state_mb": state_bytes(trainer) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", choices=WAYS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for way in WAYS:
        cmd = [sys.executable, __file__, "--demo", str(args.demo), "--steps", str(args.steps),
               "--lora-rank", str(args.lora_rank), "--child", way]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(line))
        print(line, flush=True)
    full = rows[0]
    for r in rows:
        print(f"{r['way']:12s} trainable {r['trainable_params']:>9,d} ({100 * r['trainable_share']:.2f} %)  "
              f"step {r['step_seconds_median']:.3f} s ({r['step_seconds_median'] / full['step_seconds_median']:.2f}x full)  "
              f"state {r['training_state_mb']:.1f} MB  peak {r['peak_rss_mb']:.0f} MB "
              f"({r['peak_rss_mb'] - full['peak_rss_mb']:+.0f} MB vs full)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
