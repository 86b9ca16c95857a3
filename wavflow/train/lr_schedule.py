"""Learning rate: base value and the warm-up + constant/cosine/step schedule (docs/method.md §8.4)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from wavflow.errors import ConfigError

SCHEDULES = ("constant", "cosine", "step")


def base_lr(lr: float | None, blr: float, effective_batch: int) -> float:
    """`lr` when set, else `blr * effective_batch / 256`."""
    if lr is not None:
        return float(lr)
    return float(blr) * effective_batch / 256


def lr_at(
    *,
    global_step: int,
    lr_epoch: float,
    lr_base: float,
    warmup_steps: int,
    schedule: str,
    epochs: int,
    min_lr: float = 0.0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
) -> float:
    """LR of the optimiser step taken at `global_step` (before its increment).

    Warm-up is step based: `lr_base * (global_step + 1) / warmup_steps`. After it the schedule
    uses the fractional epoch `lr_epoch = batch_index / num_batches + epoch`.
    """
    if global_step < warmup_steps:
        return lr_base * (global_step + 1) / warmup_steps
    if schedule == "constant":
        return lr_base
    if schedule == "cosine":
        return min_lr + (lr_base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * lr_epoch / epochs))
    if schedule == "step":
        return lr_base * gamma ** sum(1 for m in milestones if lr_epoch >= m)
    raise ConfigError(f"training.lr_schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write `lr` to every param group (times its `lr_scale`, if it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
