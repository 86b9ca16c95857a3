"""The training loop (docs/method.md §8), read top to bottom: `Trainer.train` runs epochs,
`_train_epoch` feeds micro-batches to the optimiser step, logs, saves and stops.

`run_training(cfg)` works as a plain process (world size 1) and under torchrun. Everything
random in the optimisation comes from one generator per process, seeded with
`training.seed + global rank`; its state (and the global RNGs) is saved per rank in every
checkpoint, together with the position inside the epoch, so a stopped run resumes to the
same weights as an uninterrupted one (bit-identical on CPU fp32).

The pieces it composes, one job each: network_setup (the network, data parallelism),
train_state (what a checkpoint holds, resume and initial loads), optim_step (one optimiser
step: loss, accumulation, clipping, AdamW, EMA), epoch_data (rows, order, loaders), step_log
(logging/metrics), samples (in-training samples), signals, config_checks, and
wavflow.runtime (the precision/autocast policy).
"""

from __future__ import annotations

import functools
import math
import random
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from wavflow.config import save_config
from wavflow.distributed import DistInfo, cleanup, init_distributed
from wavflow.row_policy import RowFailures, check_rows, max_failed_fraction, policy_broken
from wavflow.runtime import autocast_context
from wavflow.speed import SpeedOptions
from wavflow.train.checkpointing import LATEST_NAME, epoch_checkpoint_name
from wavflow.train.config_checks import check_training_config, cpu_reference_preset_warning
from wavflow.train.dataset import TrainDataset, warn_if_audio_short
from wavflow.train.ema import ParamEMA
from wavflow.train.feature_checks import CHECKS_NAME
from wavflow.train.epoch_data import (
    LiveEpochOrder,
    RestOfEpochSampler,
    epoch_loader,
    gather_failures,
    placeholder_batch,
    prepare_rows,
)
from wavflow.train.logging_utils import TensorBoard, close_logging, setup_logging
from wavflow.train.lr_schedule import base_lr
from wavflow.train.finetune import configure_trainable
from wavflow.train.network_setup import build_training_network, wrap_for_data_parallel
from wavflow.train.optim_step import OptimizerStep
from wavflow.train.optimizer import build_optimizer
from wavflow.train.resume import RunFolder, weights_in_sync
from wavflow.train.run_dir import release_run_locks
from wavflow.train.fsdp import is_sharded, training_state_mb
from wavflow.train.samples import write_epoch_samples
from wavflow.train.signals import StopSignals
from wavflow.train.step_log import peak_memory_mb, StepLog
from wavflow.train.train_state import TrainState


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
        folder = RunFolder(self.exp_dir, self.info, self.logger)
        self.latest_path = folder.latest_path
        resuming = folder.agree_on_start(bool(tr.resume))

        rows = prepare_rows(self.cfg.data, self.info, self.exp_dir / CHECKS_NAME)
        if self.is_main:
            warn_if_audio_short(rows, float(cfg.data.audio_duration))
        self.dataset = TrainDataset(rows, cfg.data, repeat_factor=int(tr.repeat_factor),
                                    measure_loudness=bool(OmegaConf.select(cfg, "model.level_head", default=False)))
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                          drop_last=False, seed=0)
        self._persistent_loader: DataLoader | None = None  # training.persistent_workers: built at the first epoch

        self.model = build_training_network(cfg, rows, resuming=resuming, device=self.device, speed=self.speed,
                                            logger=self.logger)
        # before AdamW, the EMAs and DDP: each of them takes only the parameters that train
        self.trainable_params, self.total_params = configure_trainable(self.model, tr)
        self.optimizer = build_optimizer(self.model, tr, self.speed, self.device)
        self.eff_batch = int(tr.batch_size) * self.world_size * self.accum
        lr_base = base_lr(tr.lr, float(tr.blr), self.eff_batch)
        foreach_ema = self.speed.ema_impl == "foreach"
        self.ema1 = ParamEMA(self.model, float(tr.ema_decay1), bool(tr.ema_warmup), foreach=foreach_ema)
        self.ema2 = ParamEMA(self.model, float(tr.ema_decay2), bool(tr.ema_warmup), foreach=foreach_ema)

        # Per-process randomness: the training generator and the globals, per GLOBAL rank.
        generator = torch.Generator(self.device).manual_seed(self.seed + self.rank)
        random.seed(self.seed + self.rank)
        np.random.seed((self.seed + self.rank) % 2**32)
        torch.manual_seed(self.seed + self.rank)

        self.state = TrainState(cfg=cfg, info=self.info, logger=self.logger, folder=folder, model=self.model,
                                optimizer=self.optimizer, ema1=self.ema1, ema2=self.ema2, generator=generator,
                                seed=self.seed, lr_base=lr_base, last_lr=lr_base)
        self.progress = self.state.progress
        self.state.load_start(resuming)

        ddp_model = wrap_for_data_parallel(self.model, self.info, tr, self.logger)
        if is_sharded(self.model):  # AdamW and the EMAs follow the parameters onto their shards
            self.state.shard_optimizer_and_emas(lambda: build_optimizer(self.model, tr, self.speed, self.device))
            self.optimizer = self.state.optimizer
        self.step = OptimizerStep(
            self.state, ddp_model=ddp_model,
            forward_model=torch.compile(ddp_model) if bool(tr.compile) else ddp_model,
            autocast_factory=self.autocast_factory, placeholder_batch=lambda: placeholder_batch(self.dataset))

        self.tb = TensorBoard(self.exp_dir / "tensorboard", enabled=self.is_main and bool(tr.tensorboard))
        if self.is_main:
            self._log_start(len(rows))
        self.signals = StopSignals()
        self.last_batch: dict[str, Any] | None = None
        self.run_failures = RowFailures()  # read failures of this run (all ranks, all epochs)
        self.row_limit = max_failed_fraction(cfg.data.max_failed_fraction)

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    @property
    def forward_model(self) -> nn.Module:
        return self.step.forward_model

    def _log_start(self, n_rows: int) -> None:
        tr = self.tr
        save_config(self.cfg, self.exp_dir / "config.yaml")
        self.logger.info("Number of trainable parameters: %.6fM of %.6fM (%.2f %%)%s", self.trainable_params / 1e6,
                         self.total_params / 1e6, 100.0 * self.trainable_params / max(1, self.total_params),
                         f", training.trainable={list(tr.trainable)}" if tr.get("trainable") is not None else "")
        self.logger.info("Base lr: %s", "from training.lr" if tr.lr is not None else f"{float(tr.blr):.2e}")
        self.logger.info("Actual lr: %.2e", self.state.lr_base)
        self.logger.info("Effective batch size: %d", self.eff_batch)
        self.logger.info(
            "World size %d, device %s, precision %s, %d training rows (x%d repeat)",
            self.world_size, self.device, tr.precision, n_rows, int(tr.repeat_factor),
        )

    # ------------------------------------------------------------------------------ data
    def _rest_of_epoch(self, epoch: int) -> RestOfEpochSampler:
        return RestOfEpochSampler(len(self.dataset), epoch=epoch, consumed=self.progress.samples_in_epoch,
                                  rank=self.rank, world_size=self.world_size, seed=self.sampler.seed)

    def epoch_loader_of(self, epoch: int, sampler: Sampler | Sequence[int] | None = None) -> DataLoader:
        """The DataLoader of `epoch` (workers, seeds, collate as training uses them); `sampler`
        replaces the epoch's order (scripts/bench/bench_model.py reads a longer stream). With
        workers and training.persistent_workers, one DataLoader (and its worker processes)
        serves every epoch, pointed at the epoch's order."""
        self.sampler.set_epoch(epoch)
        workers = int(self.tr.num_workers)
        settings = dict(batch_size=int(self.tr.batch_size), num_workers=workers, seed=self.seed, rank=self.rank,
                        pin_memory=self.device.type == "cuda")
        if sampler is None and workers and bool(self.tr.get("persistent_workers", False)):
            if self._persistent_loader is None:
                order = LiveEpochOrder(len(self.dataset), rank=self.rank, world_size=self.world_size,
                                       seed=self.sampler.seed)
                self._persistent_loader = epoch_loader(self.dataset, order, epoch=epoch, persistent_workers=True,
                                                       **settings)
            self._persistent_loader.sampler.point_at(epoch, self.progress.samples_in_epoch)
            return self._persistent_loader
        if sampler is None:
            sampler = self._rest_of_epoch(epoch) if self.progress.samples_in_epoch else self.sampler
        return epoch_loader(self.dataset, sampler, epoch=epoch, **settings)

    def num_batches(self) -> int:
        return math.ceil(len(self.sampler) / int(self.tr.batch_size))

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
                self.state.save([LATEST_NAME])
                why = signal.Signals(self.signals.received).name if self.signals.received is not None else "training.max_steps"
                self.logger.info(
                    "Stopped by %s at epoch %d, global step %d; %s written. Run the same command to resume.",
                    why, self.epoch + 1, self.global_step, self.latest_path,
                )
            else:
                weights_in_sync(self.info, self.model, self.logger)
                total = int(time.time() - start)
                self.logger.info("Training completed. Total time: %s", str(timedelta(seconds=total)))
            if self.is_main:
                self.logger.info("Peak memory: %.0f MB (%s); training state %.1f MB on rank 0 (weights, gradients, "
                                 "AdamW, EMAs; training.strategy=%s)", peak_memory_mb(self.device),
                                 "CUDA, allocated by torch" if self.device.type == "cuda" else "resident set, rank 0",
                                 training_state_mb(self.model, self.optimizer, [*self.ema1.shadow, *self.ema2.shadow]),
                                 self.tr.get("strategy", "ddp"))
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
        consumed = self.progress.samples_in_epoch  # global samples of this epoch trained before a resume
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
            stats = self.step.update(pending, lr_epoch=data_iter_step / num_batches + epoch,
                                          failed_in_epoch=failures.count)
            if policy_broken(stats["failed_in_epoch"], len(self.dataset), self.row_limit):
                bar.close()
                self._stop_for_failed_rows(failures, stats["failed_in_epoch"])
            data_iter_step += len(pending)
            self.progress.batch_in_epoch = data_iter_step
            self.progress.samples_in_epoch = consumed + (data_iter_step - skip) * batch_size * self.world_size
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
                self.state.save([LATEST_NAME])
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
        self.progress.start_next_epoch()
        display_epoch = self.epoch
        last = display_epoch == epochs
        if int(tr.checkpoint_freq) > 0 and (display_epoch % int(tr.checkpoint_freq) == 0 or last):
            self.state.save([LATEST_NAME])
        if int(tr.gen_train_freq) > 0 and (display_epoch % int(tr.gen_train_freq) == 0 or last):
            self._write_samples(display_epoch)
        if int(tr.checkpoint_save_epoch) > 0 and display_epoch % int(tr.checkpoint_save_epoch) == 0:
            self.state.save([epoch_checkpoint_name(display_epoch)])
        if int(tr.ema_checkpoint_save_epoch) > 0 and display_epoch % int(tr.ema_checkpoint_save_epoch) == 0:
            self.state.save_ema(display_epoch)
        self.tb.flush()

    def _write_samples(self, epoch: int) -> None:
        batch = self.last_batch
        if batch is None and is_sharded(self.model):  # every rank must sample: the gathers are collective
            batch = placeholder_batch(self.dataset)
        if batch is not None:
            write_epoch_samples(self.model, batch, cfg=self.cfg, exp_dir=self.exp_dir, epoch=epoch,
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
