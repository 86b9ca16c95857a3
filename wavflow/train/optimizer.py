"""The AdamW a training run steps: parameter groups as the reference forms them, and the
implementation (fused/foreach) training.optimizer_impl picks."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from wavflow.speed import SpeedOptions, make_adamw, resolve_optimizer_impl


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """no_decay (1-D, '.bias', 'diffloss') first, then decay; frozen parameters left out."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or "diffloss" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": float(weight_decay)}]


def build_optimizer(model: nn.Module, tr: DictConfig, speed: SpeedOptions, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95) over `optimizer_groups`; its lr is set every step (lr_schedule)."""
    return make_adamw(
        optimizer_groups(model, float(tr.weight_decay)),
        resolve_optimizer_impl(speed.optimizer_impl, device), lr=1e-3, betas=(0.9, 0.95),
    )
