"""One optimiser step (docs/method.md §8.3-8.4): the learning rate of the step, the micro-batches'
flow-matching losses under the precision policy, gradient accumulation (DDP `no_sync` on all
but the last), clipping, the skip of a non-finite gradient, AdamW and both EMAs.

`OptimizerStep.update` is what `python -m wavflow.train` runs per step and what
scripts/bench/bench_model.py times. It advances `TrainState.progress.global_step`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from wavflow.distributed import all_reduce_sum
from wavflow.errors import RuntimeFailure
from wavflow.model.level_head import level_loss
from wavflow.train.config_checks import drop_probs
from wavflow.train.fsdp import full_tensor, is_sharded, set_gradient_sync, unshard_root
from wavflow.train.lr_schedule import apply_lr, lr_at
from wavflow.train.step import (
    StepNoise,
    apply_label_drop,
    draw_step_noise,
    fill_missing_modalities,
    flow_matching_loss,
)
from wavflow.train.train_state import TrainState


class OptimizerStep:
    def __init__(self, state: TrainState, *, ddp_model: nn.Module, forward_model: nn.Module,
                 autocast_factory: Callable[[], ContextManager[Any]],
                 placeholder_batch: Callable[[], dict[str, Any]]) -> None:
        """`ddp_model`: the DDP wrapper (or the network itself on one process); `forward_model`
        what the loss calls (the wrapper, compiled or not); `placeholder_batch`: one zero row
        standing in for a batch whose rows all failed to read."""
        self.state = state
        self.tr = state.cfg.training
        self.sampling = state.cfg.sampling
        self.ddp_model = ddp_model
        self.forward_model = forward_model
        self.autocast_factory = autocast_factory
        self.placeholder_batch = placeholder_batch
        self.nonfinite_in_a_row = 0  # optimiser steps skipped for a non-finite gradient norm
        self.level_losses: list[float] = []  # the loudness head's loss of each real micro-batch of a step

    def draw_noise(self, x1: torch.Tensor) -> StepNoise:
        s = self.sampling
        return draw_step_noise(self.state.generator, x1, mean=float(s.mean), scale=float(s.scale),
                               noise_scale=float(s.noise_scale), uniform_frac=float(s.uniform_frac))

    def micro_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Loss of one micro-batch: (loss, per-sample loss, t_s, number of real rows). A batch
        without rows still runs forward/backward (every rank takes part in the collectives),
        on a zero row whose loss is multiplied by 0."""
        real = "audio_tokens" in batch
        if not real:
            batch = self.placeholder_batch()
        model, dev, s = self.state.model, self.state.info.device, self.sampling
        unshard_root(model)  # FSDP: the empty tokens are read outside forward
        x1 = batch["audio_tokens"].to(dev, non_blocking=True)
        clip_f, sync_f, text_f = (batch[k].to(dev, non_blocking=True) for k in ("clip_features", "sync_features", "text_features"))
        with self.autocast_factory():
            clip_f, sync_f, text_f = fill_missing_modalities(
                model, clip_f, sync_f, text_f, batch["video_exist"].to(dev), batch["text_exist"].to(dev)
            )
            noise = self.draw_noise(x1)
            clip_f, sync_f, text_f, _, _ = apply_label_drop(model, clip_f, sync_f, text_f, noise, *drop_probs(self.tr))
            out = flow_matching_loss(
                self.forward_model, x1, clip_f, sync_f, text_f, noise,
                prediction_type=str(s.prediction_type), loss_type=str(self.tr.loss_type),
                noise_shift=float(s.noise_shift), min_sigma=float(s.min_sigma),
            )
            # docs/method.md §2.15, beside the flow loss. After the forward: under FSDP the head is its
            # own unit, and the root must run (and initialise) first.
            level = (level_loss(model.predict_loudness(clip_f, sync_f, text_f), batch["loudness_lufs"])
                     if getattr(model, "level_head", None) is not None else None)
        loss = out.loss
        if level is not None:
            loss = loss + level
            if real:
                self.level_losses.append(float(level.detach()))
        loss = loss if real else loss * 0.0
        return loss, out.per_sample, out.t_s, (x1.shape[0] if real else 0)

    def learning_rate(self, lr_epoch: float) -> float:
        tr = self.tr
        return lr_at(global_step=self.state.progress.global_step, lr_epoch=lr_epoch, lr_base=self.state.lr_base,
                     warmup_steps=int(tr.warmup_steps), schedule=str(tr.lr_schedule), epochs=int(tr.epochs),
                     min_lr=float(tr.min_lr), milestones=list(tr.steps), gamma=float(tr.gamma))

    def update(self, micro_batches: Sequence[dict[str, Any]], lr_epoch: float,
               failed_in_epoch: int = 0) -> dict[str, Any]:
        """One optimiser step over `micro_batches` (gradient accumulation, DDP no_sync inside).
        `failed_in_epoch`: this rank's rows that failed to read so far this epoch; the stats'
        `failed_in_epoch` is that count summed over ranks (one all-reduce with the row count)."""
        state = self.state
        lr = self.learning_rate(lr_epoch)
        apply_lr(state.optimizer, lr)
        state.last_lr = lr
        state.optimizer.zero_grad(set_to_none=True)
        k = len(micro_batches)
        losses, per_samples, times, rows = [], [], [], 0
        self.level_losses = []
        sharded = is_sharded(state.model)
        for i, batch in enumerate(micro_batches):
            inner = state.info.is_distributed and i < k - 1
            if sharded:  # FSDP2: reduce-scatter on the last micro-batch only
                set_gradient_sync(state.model, not inner)
            with self.ddp_model.no_sync() if inner and not sharded else nullcontext():  # type: ignore[operator]
                loss, per, t_s, n = self.micro_step(batch)
                (loss / k).backward()
            if n:
                losses.append(float(per.float().mean()))  # the flow loss (the loudness head's is logged apart)
                per_samples.append(per.float().cpu())
                times.append(t_s.float().cpu())
                rows += n
        # Every row of every rank failed to read: the gradients are all zero, but AdamW
        # (momentum, decay) and the EMAs would still move. All ranks agree, then skip.
        total_rows, failed = (int(x) for x in all_reduce_sum(state.info, [float(rows), float(failed_in_epoch)]))
        if total_rows == 0:
            state.optimizer.zero_grad(set_to_none=True)
            stats = {"skipped": True, "loss": float("nan"), "lr": lr, "grad_norm": 0.0, "rows": 0,
                     "per_sample": torch.zeros(0), "t_s": torch.zeros(0)}
        else:
            stats = self._step_on(lr, rows, losses, per_samples, times)
        return {**stats, "failed_in_epoch": failed}

    def _step_on(self, lr: float, rows: int, losses: list[float], per_samples: list[torch.Tensor],
                 times: list[torch.Tensor]) -> dict[str, Any]:
        """Clip, step the optimiser and the EMAs (gradients are in place, some rank had rows)."""
        state = self.state
        head = getattr(state.model, "level_head", None)
        head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
        head_ids = {id(p) for p in head_params}
        params = [p for p in state.model.parameters() if p.requires_grad and id(p) not in head_ids]
        max_norm = float(self.tr.clip_grad_norm)
        limit = max_norm if max_norm > 0 else float("inf")
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, limit))
        if head_params:  # clipped on its own: the loudness head's gradients never scale the flow network's
            head_norm = full_tensor(torch.nn.utils.clip_grad_norm_(head_params, limit))
            grad_norm = torch.where(torch.isfinite(head_norm), grad_norm, head_norm)
        if int(self.tr.max_nonfinite_steps) > 0 and not bool(torch.isfinite(grad_norm)):
            return self._skip_nonfinite_step(lr, float(grad_norm), losses)
        self.nonfinite_in_a_row = 0
        state.optimizer.step()
        state.ema1.update(state.model, state.progress.global_step)
        state.ema2.update(state.model, state.progress.global_step)
        state.progress.global_step += 1
        return {
            "skipped": False,
            # the mean over this rank's real micro-batches; NaN only when this rank had none
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "rows": rows,
            "per_sample": torch.cat(per_samples) if per_samples else torch.zeros(0),
            "t_s": torch.cat(times) if times else torch.zeros(0),
            **({"level_loss": sum(self.level_losses) / len(self.level_losses)} if self.level_losses else {}),
        }

    def _skip_nonfinite_step(self, lr: float, grad_norm: float, losses: list[float]) -> dict[str, Any]:
        """A non-finite gradient norm (an inf/NaN gradient: clipping would turn it into NaN
        weights for good) skips the optimiser and EMA step. Under DDP the gradients are already
        all-reduced, so every rank sees the same norm and skips together."""
        state = self.state
        state.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        limit = int(self.tr.max_nonfinite_steps)
        loss = sum(losses) / len(losses) if losses else float("nan")
        step = state.progress.global_step
        if state.info.is_main:
            state.logger.warning(
                "GlobalStep %d: gradient norm %s (loss %.4g); optimiser/EMA step skipped, weights unchanged "
                "(%d in a row, training.max_nonfinite_steps=%d)", step, grad_norm, loss, self.nonfinite_in_a_row, limit)
        if self.nonfinite_in_a_row >= limit:
            raise RuntimeFailure(
                f"{self.nonfinite_in_a_row} optimiser steps in a row had a non-finite gradient norm (at global "
                f"step {step}); stopping with the last saved checkpoint intact. Lower training.lr, "
                "check the data for inf/NaN samples, or raise training.max_nonfinite_steps")
        return {"skipped": True, "reason": "nonfinite", "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "rows": 0, "per_sample": torch.zeros(0), "t_s": torch.zeros(0)}
