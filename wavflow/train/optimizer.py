"""The AdamW a training run steps: parameter groups as the reference forms them, and the
implementation (fused/foreach) training.optimizer_impl picks."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from wavflow.speed import SpeedOptions, make_adamw, resolve_optimizer_impl


def optimizer_groups(model: nn.Module, weight_decay: float, skip_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """no_decay (1-D, '.bias', 'diffloss') first, then decay; frozen parameters left out. With the
    spectral skip (docs/method.md §2.14) its log-power projection is a third group, without decay
    and at `skip_lr_scale` times the learning rate: its outputs are log-powers in nats, which must
    travel from the initial -5 to -10 and below for quiet tokens and near 0 for loud ones, and
    AdamW moves a parameter by about one learning rate per step."""
    skip = getattr(model, "spectral_skip", None)
    in_skip = {id(p) for p in skip.parameters()} if skip is not None else set()
    no_decay, decay, skip_params = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in in_skip:
            skip_params.append(p)
        elif p.ndim == 1 or name.endswith(".bias") or "diffloss" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": float(weight_decay)}]
    if skip_params:
        groups.append({"params": skip_params, "weight_decay": 0.0, "lr_scale": float(skip_lr_scale)})
    return groups


def build_optimizer(model: nn.Module, tr: DictConfig, speed: SpeedOptions, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95) over `optimizer_groups`; its lr is set every step (lr_schedule)."""
    return make_adamw(
        optimizer_groups(model, float(tr.weight_decay), float(tr.spectral_skip_lr_scale)),
        resolve_optimizer_impl(speed.optimizer_impl, device), lr=1e-3, betas=(0.9, 0.95),
    )
