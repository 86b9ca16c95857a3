"""The training loop (docs/method.md §8): DDP, AdamW, EMA, exact resume, samples, logging.

`run_training(cfg)` works as a plain process (world size 1) and under torchrun. Everything
random in the optimisation comes from one generator per process, seeded with
`training.seed + global rank`; its state (and the global RNGs) is saved per rank in every
checkpoint, together with the position inside the epoch, so a stopped run resumes to the
same weights as an uninterrupted one (bit-identical on CPU fp32).

Here: the loop and the optimiser step. Elsewhere: config_checks, epoch_data (rows, order,
loaders), resume (run folder, rank agreement, checkpoint writes), checkpointing (file layout),
optimizer, ema, empty_string, step, step_log, samples, signals, wavflow.runtime (autocast).
"""

from __future__ import annotations

import functools
import math
import random
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from wavflow.config import save_config
from wavflow.distributed import DistInfo, all_reduce_sum, cleanup, init_distributed
from wavflow.errors import CheckpointError, RuntimeFailure, WavFlowError
from wavflow.features.report import identity_tag
from wavflow.model import build_model_from_config
from wavflow.model.checkpoint import load_weights, resolve_checkpoint_path
from wavflow.row_policy import RowFailures, check_rows, max_failed_fraction, policy_broken
from wavflow.runtime import autocast_context
from wavflow.speed import SpeedOptions, set_attention_impl, set_conv_impl, with_kernel_flags_of
from wavflow.train.checkpointing import (
    CHECKPOINT_FORMAT,
    LATEST_NAME,
    epoch_checkpoint_name,
    load_initial_checkpoint,
    load_latest_checkpoint,
    model_state_cpu,
)
from wavflow.train.config_checks import check_training_config, cpu_reference_preset_warning, drop_probs
from wavflow.train.dataset import TrainDataset, TrainRow, warn_if_audio_short
from wavflow.train.ema import ParamEMA
from wavflow.train.empty_string import resolve_empty_string_feat
from wavflow.train.epoch_data import RestOfEpochSampler, epoch_loader, gather_failures, prepare_rows
from wavflow.train.feature_norm import resolve_feature_norm
from wavflow.train.logging_utils import TensorBoard, close_logging, setup_logging
from wavflow.train.lr_schedule import apply_lr, base_lr, lr_at
from wavflow.train.optimizer import build_optimizer
from wavflow.train.resume import RunFolder, restore_rank_rng, restore_weights, weights_digest, weights_in_sync
from wavflow.train.run_dir import release_run_locks
from wavflow.train.samples import write_epoch_samples
from wavflow.train.signals import StopSignals
from wavflow.train.step_log import StepLog
from wavflow.train.step import (
    StepNoise,
    apply_label_drop,
    draw_step_noise,
    fill_missing_modalities,
    flow_matching_loss,
)


@dataclass
class TrainResult:
    exp_dir: Path
    epoch: int  # completed epochs
    global_step: int
    stopped_early: bool  # a signal or training.max_steps ended the run
    skipped_rows: int  # rows that failed at read time (all ranks, all epochs of this run)


class Trainer:
    def __init__(self, cfg: DictConfig, info: DistInfo | None = None) -> None:
        check_training_config(cfg)
        self.cfg = cfg
        tr = cfg.training
        self.tr = tr
        self.info = info or init_distributed(str(tr.device))
        self.rank, self.world_size = self.info.rank, self.info.world_size
        self.is_main = self.info.is_main
        self.device = self.info.device
        self.exp_dir = Path(str(tr.output_dir)).expanduser().absolute() / str(tr.experiment_id)
        self.logger = setup_logging(self.exp_dir, self.is_main, self.rank)
        self.speed = SpeedOptions.from_config(tr, "training")
        self.autocast_factory = functools.partial(autocast_context, self.device, str(tr.precision),
                                                  attention_backend=self.speed.attention_backend, key="training.precision")
        self.seed = int(tr.seed)
        self.accum = int(tr.grad_accum_steps)
        cpu_warning = cpu_reference_preset_warning(str(cfg.model.name), self.device)
        if cpu_warning and self.is_main:
            self.logger.warning(cpu_warning)
        self.folder = RunFolder(self.exp_dir, self.info, self.logger)
        self.latest_path = self.folder.latest_path
        resuming = self.folder.agree_on_start(bool(tr.resume))

        rows = prepare_rows(self.cfg.data, self.info)
        if self.is_main:
            warn_if_audio_short(rows, float(cfg.data.audio_duration))
        self.dataset = TrainDataset(rows, cfg.data, repeat_factor=int(tr.repeat_factor))
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                          drop_last=False, seed=0)

        self.model = self._build_network(rows, resuming)
        self.optimizer = build_optimizer(self.model, tr, self.speed, self.device)
        self.eff_batch = int(tr.batch_size) * self.world_size * self.accum
        self.lr_base = base_lr(tr.lr, float(tr.blr), self.eff_batch)
        self.last_lr = self.lr_base
        foreach_ema = self.speed.ema_impl == "foreach"
        self.ema1 = ParamEMA(self.model, float(tr.ema_decay1), bool(tr.ema_warmup), foreach=foreach_ema)
        self.ema2 = ParamEMA(self.model, float(tr.ema_decay2), bool(tr.ema_warmup), foreach=foreach_ema)

        # Per-process randomness: the training generator and the globals, per GLOBAL rank.
        self.generator = torch.Generator(self.device).manual_seed(self.seed + self.rank)
        random.seed(self.seed + self.rank)
        np.random.seed((self.seed + self.rank) % 2**32)
        torch.manual_seed(self.seed + self.rank)

        self.epoch = 0  # completed epochs = the epoch in progress
        self.global_step = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch already trained (this rank)
        self.samples_in_epoch = 0  # samples of the epoch's global order already trained (all ranks)
        self._load_start_state(resuming)

        self.ddp_model = self._wrap_for_ddp()
        self.forward_model: nn.Module = torch.compile(self.ddp_model) if bool(tr.compile) else self.ddp_model

        self.tb = TensorBoard(self.exp_dir / "tensorboard", enabled=self.is_main and bool(tr.tensorboard))
        if self.is_main:
            self._log_start(len(rows))
        self.signals = StopSignals()
        self.last_batch: dict[str, Any] | None = None
        self.run_failures = RowFailures()  # read failures of this run (all ranks, all epochs)
        self.row_limit = max_failed_fraction(cfg.data.max_failed_fraction)
        self.nonfinite_in_a_row = 0  # optimiser steps skipped for a non-finite gradient norm


    def _build_network(self, rows: Sequence[TrainRow], resuming: bool) -> nn.Module:
        """The network in training mode: the same initial weights on every rank (DDP also
        broadcasts rank 0's at wrap time), the empty-caption feature unless a checkpoint will
        bring its own, and the feature normalisation its features need."""
        cfg, tr = self.cfg, self.tr
        torch.manual_seed(self.seed)
        empty_string = None
        if not resuming:  # a resumed checkpoint carries its own copy
            empty_string, source = resolve_empty_string_feat(cfg, rows[0])
            self.logger.info("Empty string feature: %s", source)
        model = build_model_from_config(
            cfg, empty_string_feat=empty_string, gradient_checkpointing=bool(tr.gradient_checkpointing)
        ).to(self.device)
        norm_stats, norm_why = resolve_feature_norm(cfg.data.feature_norm, [r.features_path.parent for r in rows])
        self.logger.info("Feature normalisation: %s", norm_why)
        if norm_stats is not None:  # before the optimizer and EMAs: its frozen parameters are saved with both
            model.attach_condition_norm().set_statistics(
                norm_stats.streams, identity_tag(norm_stats.encoder_identity),
                rms=OmegaConf.to_container(cfg.data.feature_norm_rms))
            # the empty clip/sync tokens start at zero: at the streams' means (cond_norm.py)
        model.train()
        set_conv_impl(model, self.speed.conv_impl)
        set_attention_impl(model, self.speed.attention_backend)
        return model

    def _wrap_for_ddp(self) -> nn.Module:
        if not self.info.is_distributed:
            return self.model
        with warnings.catch_warnings():  # broadcast_buffers=False is still the way to keep rot tables local
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )

    def _log_start(self, n_rows: int) -> None:
        tr = self.tr
        save_config(self.cfg, self.exp_dir / "config.yaml")
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad) / 1e6
        self.logger.info("Number of trainable parameters: %.6fM", n_train)
        self.logger.info("Base lr: %s", "from training.lr" if tr.lr is not None else f"{float(tr.blr):.2e}")
        self.logger.info("Actual lr: %.2e", self.lr_base)
        self.logger.info("Effective batch size: %d", self.eff_batch)
        self.logger.info(
            "World size %d, device %s, precision %s, %d training rows (x%d repeat)",
            self.world_size, self.device, tr.precision, n_rows, int(tr.repeat_factor),
        )

    # ------------------------------------------------------------------------------ data
    def _rest_of_epoch(self, epoch: int) -> RestOfEpochSampler:
        return RestOfEpochSampler(len(self.dataset), epoch=epoch, consumed=self.samples_in_epoch,
                                  rank=self.rank, world_size=self.world_size, seed=self.sampler.seed)

    def epoch_loader_of(self, epoch: int, sampler: Sampler | Sequence[int] | None = None) -> DataLoader:
        """The DataLoader of `epoch` (workers, seeds, collate as training uses them); `sampler`
        replaces the epoch's order (scripts/bench/bench_model.py reads a longer stream)."""
        self.sampler.set_epoch(epoch)
        if sampler is None:
            sampler = self._rest_of_epoch(epoch) if self.samples_in_epoch else self.sampler
        return epoch_loader(self.dataset, sampler, batch_size=int(self.tr.batch_size),
                            num_workers=int(self.tr.num_workers), seed=self.seed, rank=self.rank, epoch=epoch,
                            pin_memory=self.device.type == "cuda")

    def num_batches(self) -> int:
        return math.ceil(len(self.sampler) / int(self.tr.batch_size))

    # -------------------------------------------------------------------- checkpoints
    def _load_start_state(self, resuming: bool) -> None:
        ck = self.cfg.checkpoint
        if resuming:
            failure: WavFlowError | None = None
            try:
                ckpt = load_latest_checkpoint(self.latest_path)
                self._load_full(ckpt, model_only=False, source=str(self.latest_path))
                mine: dict[str, Any] = {
                    "global_step": self.global_step, "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch, "digest": weights_digest(self.model),
                }
            except WavFlowError as exc:
                failure, mine = exc, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            self.folder.check_same_resume_point(mine, failure)
            self.logger.info(
                "Resumed from %s: %d completed epoch(s), global step %d, batch %d of epoch %d",
                self.latest_path, self.epoch, self.global_step, self.batch_in_epoch, self.epoch + 1,
            )
            return
        if self.latest_path.exists():
            self.logger.warning("training.resume=false: ignoring (and later overwriting) %s", self.latest_path)
        if ck.initial_load_path:
            path = resolve_checkpoint_path(str(ck.initial_load_path), key="checkpoint.initial_load_path")
            if not path.is_file():
                raise CheckpointError(f"checkpoint.initial_load_path {path} does not exist")
            ckpt = load_initial_checkpoint(path)
            if "model" in ckpt:
                self._load_full(ckpt, model_only=bool(ck.initial_load_model_only), source=str(path))
            else:
                load_weights(self.model, ckpt, source=str(path))
                self.ema1.reset_to(self.model)
                self.ema2.reset_to(self.model)
            self.logger.info(
                "Loaded initial weights from %s (%d completed epoch(s), global step %d)", path, self.epoch, self.global_step
            )

    def _load_full(self, ckpt: dict[str, Any], *, model_only: bool, source: str) -> None:
        restore_weights(ckpt, self.model, (self.ema1, self.ema2), source=source,
                        feature_norm_setting=self.cfg.data.feature_norm)
        if model_only or "optimizer" not in ckpt or "epoch" not in ckpt:
            return
        try:
            self.optimizer.load_state_dict(with_kernel_flags_of(self.optimizer, ckpt["optimizer"]))
        except Exception as exc:
            raise CheckpointError(f"optimizer state in {source} does not fit this model: {exc}") from exc
        self.epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt.get("global_step", 0))
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        saved_world = int(ckpt.get("world_size", self.world_size))
        # Older checkpoints: every rank had trained batch_in_epoch full batches.
        self.samples_in_epoch = int(ckpt.get(
            "samples_in_epoch", self.batch_in_epoch * int(self.tr.batch_size) * saved_world))
        if self.samples_in_epoch and saved_world != self.world_size and self.is_main:
            self.logger.warning(
                "%s stopped mid-epoch after %d sample(s) of epoch %d on %d rank(s); this run (%d rank(s)) "
                "trains the epoch's remaining samples in the same global order, none repeated or skipped",
                source, self.samples_in_epoch, self.epoch + 1, saved_world, self.world_size,
            )
        reseed = self.seed + self.rank + 1_000_003 * self.global_step
        restore_rank_rng(ckpt.get("rng"), self.generator, info=self.info, reseed=reseed, source=source,
                         logger=self.logger)

    def checkpoint_dict(self, rng_states: list[Any]) -> dict[str, Any]:
        return {
            "model": model_state_cpu(self.model),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model_ema1": self.ema1.state_dict(),
            "model_ema2": self.ema2.state_dict(),
            "batch_in_epoch": self.batch_in_epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "sampler_epoch": self.epoch,
            "rng": rng_states,
            "lr": {"base": float(self.lr_base), "last": float(self.last_lr)},
            "world_size": self.world_size,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "format": CHECKPOINT_FORMAT,
        }

    def save_checkpoints(self, names: Sequence[str]) -> None:
        """Write the full checkpoint under each name (rank 0; all ranks must call)."""
        self.folder.save(names, self.checkpoint_dict, self.generator, epoch=self.epoch,
                         batch_in_epoch=self.batch_in_epoch, global_step=self.global_step)

    def save_ema(self, epoch: int) -> None:
        self.folder.save_ema(self.ema1.state_dict(), epoch)

    # ------------------------------------------------------------------------------ step
    def draw_noise(self, x1: torch.Tensor) -> StepNoise:
        s = self.cfg.sampling
        return draw_step_noise(self.generator, x1, mean=float(s.mean), scale=float(s.scale),
                               noise_scale=float(s.noise_scale), uniform_frac=float(s.uniform_frac))

    def _dummy_batch(self) -> dict[str, Any]:
        """One zero row standing in for an all-failed batch, so every rank still runs the same
        collective forward/backward (its loss is multiplied by 0)."""
        shapes = self.dataset.shapes
        return {
            "audio_tokens": torch.zeros(1, self.dataset.num_tokens, self.dataset.audio_dim),
            "clip_features": torch.zeros(1, *shapes.clip),
            "sync_features": torch.zeros(1, *shapes.sync),
            "text_features": torch.zeros(1, *shapes.text),
            "video_exist": torch.zeros(1, dtype=torch.bool),
            "text_exist": torch.zeros(1, dtype=torch.bool),
        }

    def micro_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Loss of one micro-batch: (loss, per-sample loss, t_s, number of real rows)."""
        real = "audio_tokens" in batch
        if not real:
            batch = self._dummy_batch()
        dev = self.device
        x1 = batch["audio_tokens"].to(dev, non_blocking=True)
        clip_f, sync_f, text_f = (batch[k].to(dev, non_blocking=True) for k in ("clip_features", "sync_features", "text_features"))
        with self.autocast_factory():
            clip_f, sync_f, text_f = fill_missing_modalities(
                self.model, clip_f, sync_f, text_f, batch["video_exist"].to(dev), batch["text_exist"].to(dev)
            )
            noise = self.draw_noise(x1)
            clip_f, sync_f, text_f, _, _ = apply_label_drop(
                self.model, clip_f, sync_f, text_f, noise, *drop_probs(self.tr)
            )
            s = self.cfg.sampling
            out = flow_matching_loss(
                self.forward_model, x1, clip_f, sync_f, text_f, noise,
                prediction_type=str(s.prediction_type), loss_type=str(self.tr.loss_type),
                noise_shift=float(s.noise_shift), min_sigma=float(s.min_sigma),
            )
        loss = out.loss if real else out.loss * 0.0
        return loss, out.per_sample, out.t_s, (x1.shape[0] if real else 0)

    def optimizer_update(self, micro_batches: Sequence[dict[str, Any]], lr_epoch: float,
                         failed_in_epoch: int = 0) -> dict[str, Any]:
        """One optimiser step over `micro_batches` (gradient accumulation, DDP no_sync inside).
        `failed_in_epoch`: this rank's rows that failed to read so far this epoch; the stats'
        `failed_in_epoch` is that count summed over ranks (one all-reduce with the row count)."""
        lr = lr_at(
            global_step=self.global_step, lr_epoch=lr_epoch, lr_base=self.lr_base,
            warmup_steps=int(self.tr.warmup_steps), schedule=str(self.tr.lr_schedule),
            epochs=int(self.tr.epochs), min_lr=float(self.tr.min_lr),
            milestones=list(self.tr.steps), gamma=float(self.tr.gamma),
        )
        apply_lr(self.optimizer, lr)
        self.last_lr = lr
        self.optimizer.zero_grad(set_to_none=True)
        k = len(micro_batches)
        losses, per_samples, times, rows = [], [], [], 0
        for i, batch in enumerate(micro_batches):
            inner = self.info.is_distributed and i < k - 1
            with self.ddp_model.no_sync() if inner else nullcontext():  # type: ignore[operator]
                loss, per, t_s, n = self.micro_step(batch)
                (loss / k).backward()
            if n:
                losses.append(float(loss.detach()))
                per_samples.append(per.float().cpu())
                times.append(t_s.float().cpu())
                rows += n
        # Every row of every rank failed to read: the gradients are all zero, but AdamW
        # (momentum, decay) and the EMAs would still move. All ranks agree, then skip.
        total_rows, failed = (int(x) for x in all_reduce_sum(self.info, [float(rows), float(failed_in_epoch)]))
        if total_rows == 0:
            self.optimizer.zero_grad(set_to_none=True)
            stats = {"skipped": True, "loss": float("nan"), "lr": lr, "grad_norm": 0.0, "rows": 0,
                     "per_sample": torch.zeros(0), "t_s": torch.zeros(0)}
        else:
            stats = self._step_on(lr, rows, losses, per_samples, times)
        return {**stats, "failed_in_epoch": failed}

    def _step_on(self, lr: float, rows: int, losses: list[float], per_samples: list[torch.Tensor],
                 times: list[torch.Tensor]) -> dict[str, Any]:
        """Clip, step the optimiser and the EMAs (gradients are in place, some rank had rows)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = float(self.tr.clip_grad_norm)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if int(self.tr.max_nonfinite_steps) > 0 and not bool(torch.isfinite(grad_norm)):
            return self._skip_nonfinite_step(lr, float(grad_norm), losses)
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        self.ema1.update(self.model, self.global_step)
        self.ema2.update(self.model, self.global_step)
        self.global_step += 1
        return {
            "skipped": False,
            # the mean over this rank's real micro-batches; NaN only when this rank had none
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "rows": rows,
            "per_sample": torch.cat(per_samples) if per_samples else torch.zeros(0),
            "t_s": torch.cat(times) if times else torch.zeros(0),
        }

    def _skip_nonfinite_step(self, lr: float, grad_norm: float, losses: list[float]) -> dict[str, Any]:
        """A non-finite gradient norm (an inf/NaN gradient: clipping would turn it into NaN
        weights for good) skips the optimiser and EMA step. Under DDP the gradients are already
        all-reduced, so every rank sees the same norm and skips together."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        limit = int(self.tr.max_nonfinite_steps)
        loss = sum(losses) / len(losses) if losses else float("nan")
        if self.is_main:
            self.logger.warning(
                "GlobalStep %d: gradient norm %s (loss %.4g); optimiser/EMA step skipped, weights unchanged "
                "(%d in a row, training.max_nonfinite_steps=%d)", self.global_step, grad_norm, loss,
                self.nonfinite_in_a_row, limit)
        if self.nonfinite_in_a_row >= limit:
            raise RuntimeFailure(
                f"{self.nonfinite_in_a_row} optimiser steps in a row had a non-finite gradient norm (at global "
                f"step {self.global_step}); stopping with the last saved checkpoint intact. Lower training.lr, "
                "check the data for inf/NaN samples, or raise training.max_nonfinite_steps")
        return {"skipped": True, "reason": "nonfinite", "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "rows": 0, "per_sample": torch.zeros(0), "t_s": torch.zeros(0)}

    def _should_stop(self) -> bool:
        """All ranks agree: a signal on any rank, or training.max_steps reached."""
        flag = 1.0 if self.signals.requested else 0.0
        if self.info.is_distributed:
            t = torch.tensor([flag], device=self.device if self.info.backend == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = float(t.item())
        return flag > 0 or self._budget_spent()

    def _budget_spent(self) -> bool:
        """training.max_steps reached (the same answer on every rank: global_step is shared)."""
        max_steps = self.tr.max_steps
        return max_steps is not None and self.global_step >= int(max_steps)

    # ------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        tr = self.tr
        epochs = int(tr.epochs)
        start = time.time()
        stopped = False
        if self._budget_spent():
            # Checked before any step: a re-run of a finished run must not train past its budget.
            if self.is_main:
                self.logger.info(
                    "training.max_steps=%d already reached (global step %d in %s): nothing to train. "
                    "Raise training.max_steps to continue this run.",
                    int(tr.max_steps), self.global_step, self.latest_path,
                )
            self.tb.close()
            return TrainResult(self.exp_dir, self.epoch, self.global_step, True, 0)
        self.signals.install()
        try:
            while self.epoch < epochs and not stopped:
                stopped = self._train_epoch(epochs)
                if not stopped:
                    self._end_of_epoch(epochs)
            if stopped:
                self.save_checkpoints([LATEST_NAME])
                why = signal.Signals(self.signals.received).name if self.signals.received is not None else "training.max_steps"
                self.logger.info(
                    "Stopped by %s at epoch %d, global step %d; %s written. Run the same command to resume.",
                    why, self.epoch + 1, self.global_step, self.latest_path,
                )
            else:
                weights_in_sync(self.info, self.model, self.logger)
                total = int(time.time() - start)
                self.logger.info("Training completed. Total time: %s", str(timedelta(seconds=total)))
            if self.run_failures.count and self.is_main:
                self.logger.warning(
                    "%d row read(s) failed in this run, within data.max_failed_fraction=%g per epoch: %s",
                    self.run_failures.count, self.row_limit, self.run_failures.examples())
        finally:
            self.signals.restore()
            self.tb.close()
        return TrainResult(self.exp_dir, self.epoch, self.global_step, stopped, self.run_failures.count)

    def _train_epoch(self, epochs: int) -> bool:
        """Train the rest of the current epoch; True when a stop was requested."""
        tr = self.tr
        epoch = self.epoch
        num_batches = self.num_batches()
        batch_size = int(tr.batch_size)
        consumed = self.samples_in_epoch  # global samples of this epoch trained before a resume
        # Batches this rank counts as done: all but those left for the rest of the global order.
        skip = num_batches - math.ceil(len(self._rest_of_epoch(epoch)) / batch_size) if consumed else 0
        if self.is_main:
            self.logger.info("Starting epoch %d", epoch + 1)
        epoch_start = time.time()
        step_log = StepLog(self.logger, self.tb, epochs=epochs, num_batches=num_batches)
        failures = RowFailures()
        data_iter_step = skip
        pending: list[dict[str, Any]] = []
        bar = tqdm(total=num_batches, initial=skip, desc=f"epoch {epoch + 1}", disable=not self.is_main, leave=False)
        for batch in self.epoch_loader_of(epoch):
            for row_id, reason in batch.get("failed_rows", ()):
                failures.add(row_id, reason)
            if "audio_tokens" in batch:
                self.last_batch = batch
            pending.append(batch)
            if len(pending) < self.accum and data_iter_step + len(pending) < num_batches:
                continue
            stats = self.optimizer_update(pending, lr_epoch=data_iter_step / num_batches + epoch,
                                          failed_in_epoch=failures.count)
            if policy_broken(stats["failed_in_epoch"], len(self.dataset), self.row_limit):
                bar.close()
                self._stop_for_failed_rows(failures, stats["failed_in_epoch"])
            data_iter_step += len(pending)
            self.batch_in_epoch = data_iter_step
            self.samples_in_epoch = consumed + (data_iter_step - skip) * batch_size * self.world_size
            bar.update(len(pending))
            pending = []
            step_log.add(stats)
            last_of_epoch = data_iter_step >= num_batches
            if stats["skipped"]:
                if self.is_main and stats.get("reason") != "nonfinite":  # that one is logged where it happens
                    step_log.skipped_step(epoch, data_iter_step, self.global_step)
            elif self.is_main and (self.global_step % int(tr.log_freq) == 0 or last_of_epoch) and stats["rows"]:
                step_log.write(stats, epoch, data_iter_step, self.global_step)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            save_every = int(tr.save_every_steps)
            if save_every > 0 and self.global_step % save_every == 0 and not last_of_epoch:
                self.save_checkpoints([LATEST_NAME])
            if self._should_stop():
                bar.close()
                self._count_failed(failures)
                return True
        bar.close()
        self._count_failed(failures)
        if self.is_main:
            self.logger.info("Epoch %d completed in %.2fs", epoch + 1, time.time() - epoch_start)
        return False

    def _count_failed(self, failures: RowFailures) -> None:
        """End of an epoch (or a stop): log how many rows failed to read, and which."""
        merged = gather_failures(self.info, failures)
        self.run_failures.merge(merged)
        if merged.count and self.is_main:
            self.logger.warning("%d row(s) failed at read time this epoch and were skipped: %s",
                                merged.count, merged.examples())
        if policy_broken(merged.count, len(self.dataset), self.row_limit) and merged.count:
            self._stop_for_failed_rows(failures, merged.count)

    def _stop_for_failed_rows(self, failures: RowFailures, failed: int) -> None:
        """More rows failed this epoch than data.max_failed_fraction allows (the same verdict on
        every rank): stop without a checkpoint; the last one written stays the run's state."""
        merged = gather_failures(self.info, failures)
        merged.count = failed
        self.tb.close()
        check_rows(merged, len(self.dataset), self.row_limit,
                   what=f"row reads of epoch {self.epoch + 1} (rows x training.repeat_factor)",
                   where=str(self.exp_dir / "training.log"))

    def _end_of_epoch(self, epochs: int) -> None:
        """docs/method.md §8.6, in order: latest checkpoint, samples, epoch checkpoint, EMA checkpoint."""
        tr = self.tr
        display_epoch = self.epoch + 1
        last = display_epoch == epochs
        self.epoch = display_epoch
        self.batch_in_epoch = 0
        self.samples_in_epoch = 0
        if int(tr.checkpoint_freq) > 0 and (display_epoch % int(tr.checkpoint_freq) == 0 or last):
            self.save_checkpoints([LATEST_NAME])
        if int(tr.gen_train_freq) > 0 and (display_epoch % int(tr.gen_train_freq) == 0 or last):
            self._write_samples(display_epoch)
        if int(tr.checkpoint_save_epoch) > 0 and display_epoch % int(tr.checkpoint_save_epoch) == 0:
            self.save_checkpoints([epoch_checkpoint_name(display_epoch)])
        if int(tr.ema_checkpoint_save_epoch) > 0 and display_epoch % int(tr.ema_checkpoint_save_epoch) == 0:
            self.save_ema(display_epoch)
        self.tb.flush()

    def _write_samples(self, epoch: int) -> None:
        if self.last_batch is not None:
            write_epoch_samples(self.model, self.last_batch, cfg=self.cfg, exp_dir=self.exp_dir, epoch=epoch,
                                rank=self.rank, device=self.device, autocast=self.autocast_factory(),
                                logger=self.logger, tb=self.tb, global_step=self.global_step)

def run_training(cfg: DictConfig, info: DistInfo | None = None) -> TrainResult:
    """Build the trainer, train, and tear the process group down (when this call made it)."""
    check_training_config(cfg)  # before a process group exists: bad keys fail fast and alone
    own = info is None
    info = info or init_distributed(str(cfg.training.device))
    try:
        return Trainer(cfg, info).train()
    finally:
        close_logging()
        release_run_locks()
        if own:
            cleanup(info)
