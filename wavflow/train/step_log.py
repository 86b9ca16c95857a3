"""The training log line and TensorBoard scalars of a step: loss, lr, gradient norm,
throughput since the last line, and the loss per quarter of the flow time t_s."""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any

import torch

from wavflow.train.logging_utils import TensorBoard

T_BUCKETS = 4  # loss is also logged per t_s quarter


class StepLog:
    """Accumulates the steps of one epoch between log lines (rank 0 writes)."""

    def __init__(self, logger: logging.Logger, tb: TensorBoard, *, epochs: int, num_batches: int) -> None:
        self.logger, self.tb = logger, tb
        self.epochs, self.num_batches = epochs, num_batches
        self.last_log = time.time()
        self.rows = 0
        self.bucket_sum = torch.zeros(T_BUCKETS, dtype=torch.float64)
        self.bucket_count = torch.zeros(T_BUCKETS, dtype=torch.float64)

    def add(self, stats: dict[str, Any]) -> None:
        """Count a step's rows and sort its per-sample losses into the t_s quarters."""
        self.rows += stats["rows"]
        if stats["rows"]:
            idx = torch.clamp((stats["t_s"] * T_BUCKETS).long(), 0, T_BUCKETS - 1)
            self.bucket_sum.index_add_(0, idx, stats["per_sample"].double())
            self.bucket_count.index_add_(0, idx, torch.ones_like(stats["per_sample"], dtype=torch.float64))

    def skipped_step(self, epoch: int, step: int, global_step: int) -> None:
        self.logger.warning(
            "Epoch [%d/%d] Step [%d/%d]: every row of this step failed to read on every rank; "
            "no optimiser/EMA step (global step stays %d)", epoch + 1, self.epochs, step, self.num_batches, global_step,
        )

    def write(self, stats: dict[str, Any], epoch: int, step: int, global_step: int) -> None:
        """One log line and the scalars, then start the next interval."""
        now = time.time()
        throughput = self.rows / max(now - self.last_log, 1e-9)
        # the loudness head (model.level_head): its loss is in (10 dB)², so its RMS error is 10 * sqrt(loss) dB
        level = (f" LevelLoss: {stats['level_loss']:.4f} ({10.0 * stats['level_loss'] ** 0.5:.1f} dB)"
                 if "level_loss" in stats else "")
        self.logger.info(
            "Epoch [%d/%d] Step [%d/%d] GlobalStep %d Loss: %.4f LR: %.2e GradNorm: %.4f Throughput: %.1f samples/s%s",
            epoch + 1, self.epochs, step, self.num_batches, global_step,
            stats["loss"], stats["lr"], stats["grad_norm"], throughput, level,
        )
        scalars = {
            "train/loss": stats["loss"], "train/lr": stats["lr"],
            "train/grad_norm": stats["grad_norm"], "train/samples_per_sec": throughput,
        }
        if "level_loss" in stats:
            scalars["train/level_loss"] = stats["level_loss"]
        for b in range(T_BUCKETS):
            if self.bucket_count[b] > 0:
                scalars[f"train/loss_t{b / T_BUCKETS:.2f}-{(b + 1) / T_BUCKETS:.2f}"] = float(
                    self.bucket_sum[b] / self.bucket_count[b])
        self.tb.scalars(scalars, global_step)
        self.last_log, self.rows = now, 0
        self.bucket_sum.zero_()
        self.bucket_count.zero_()


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: CUDA memory allocated by torch on a GPU, else the
    resident set (what a user sizes a machine by; logged when a run stops or completes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS: bytes, Linux: KiB
