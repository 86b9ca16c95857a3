"""Exponential moving averages of the parameters (docs/method.md §8.3 step 9).

`e <- e + w (p - e)` with `w = 1 - decay`, once per optimiser step, over every named
parameter (the frozen `empty_string_feat` included), kept on the training device.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from wavflow.errors import CheckpointError
from wavflow.model.cond_norm import migrate_empty_tokens
from wavflow.train.fsdp import full_tensor


def ema_decay(decay: float, step: int, warmup: bool) -> float:
    """The decay used at optimiser step `step` (0-based): `min(d, (1+step)/(10+step))` with warm-up."""
    if warmup:
        return min(decay, (1.0 + step) / (10.0 + step))
    return decay


class ParamEMA:
    """One EMA over `model.named_parameters()` in their order."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, foreach: bool = False) -> None:
        self.decay = float(decay)
        self.warmup = bool(warmup)
        # foreach: one torch._foreach_lerp_ over all tensors instead of a Python loop of lerp_
        # (the same lerp per element: bit-identical on CPU; training.ema_impl).
        self.foreach = bool(foreach)
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for _, p in model.named_parameters()]
        # Frozen parameters (training.trainable, LoRA's base, frozen buffers-as-parameters) never
        # change, so averaging would leave their EMA where it is: only trained ones are averaged.
        self.trained = [i for i, (_, p) in enumerate(model.named_parameters()) if p.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - ema_decay(self.decay, step, self.warmup)
        params = list(model.parameters())
        shadow, live = [self.shadow[i] for i in self.trained], [params[i].detach() for i in self.trained]
        if self.foreach:
            torch._foreach_lerp_(shadow, live, weight)
            return
        for e, p in zip(shadow, live):
            e.lerp_(p, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{name: cpu tensor}: the reference `model_ema{1,2}` layout."""
        return {n: full_tensor(e).detach().to("cpu", copy=True) for n, e in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        state = migrate_empty_tokens(state)  # older feature-normalised checkpoints (cond_norm.py)
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CheckpointError(f"EMA in {source} lacks parameter(s) {', '.join(missing[:5])}")
        for n, e in zip(self.names, self.shadow):
            value = state[n]
            if tuple(value.shape) != tuple(e.shape):
                raise CheckpointError(
                    f"EMA in {source}: {n} has shape {tuple(value.shape)}, model has {tuple(e.shape)}"
                )
            e.copy_(value.to(e.device, e.dtype))

    @torch.no_grad()
    def reset_to(self, model: nn.Module) -> None:
        """EMA = current parameters (fresh start, or a flat checkpoint)."""
        for e, (_, p) in zip(self.shadow, model.named_parameters()):
            e.copy_(p.detach())
