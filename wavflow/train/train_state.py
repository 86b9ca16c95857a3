"""What a run's checkpoint holds and how a run starts from one (docs/method.md §8.5).

`TrainState` owns everything a full checkpoint saves: the network, AdamW, the two EMAs, this
rank's training generator, the position in the run (`Progress`) and the learning rates. It
builds the checkpoint dict, writes it through the run folder (rank 0 writes, all ranks take
part) and restores it at start-up: a resume of this run (every rank must read the same point)
or `checkpoint.initial_load_path` (weights, or a full state unless model-only), or the weights
of `training.init_from` for a new run (wavflow/train/finetune.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from wavflow.distributed import DistInfo
from wavflow.errors import CheckpointError, ConfigError, WavFlowError
from wavflow.io_utils import atomic_torch_save
from wavflow.model.checkpoint import load_weights, resolve_checkpoint_path
from wavflow.speed import with_kernel_flags_of
from wavflow.train.checkpointing import (
    CHECKPOINT_FORMAT,
    load_initial_checkpoint,
    load_latest_checkpoint,
    model_state_cpu,
)
from wavflow.train.ema import ParamEMA
from wavflow.train.fsdp import full_optimizer_state_dict, is_sharded, reshard_optimizer, shard_shadows
from wavflow.train.finetune import (InitRecord, check_feature_norm, check_pinned_hash, file_sha256, initial_weights,
                                    with_added_parts)
from wavflow.train.lora import ADAPTER_FORMAT, adapter_state
from wavflow.train.resume import RunFolder, restore_rank_rng, restore_weights, weights_digest


@dataclass
class Progress:
    """Where the run is. `epoch` counts completed epochs (= the epoch in progress, 0-based)."""

    epoch: int = 0
    global_step: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained (this rank)
    samples_in_epoch: int = 0  # samples of the epoch's global order already trained (all ranks)

    def start_next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.samples_in_epoch = 0


@dataclass
class TrainState:
    cfg: DictConfig
    info: DistInfo
    logger: logging.Logger
    folder: RunFolder
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema1: ParamEMA
    ema2: ParamEMA
    generator: torch.Generator  # this rank's training generator (seed + global rank)
    seed: int
    lr_base: float
    last_lr: float
    progress: Progress = field(default_factory=Progress)
    init_from: dict[str, str] | None = None  # InitRecord.as_dict() of a run started by training.init_from

    # ------------------------------------------------------------------ writing
    def checkpoint_dict(self, rng_states: list[Any]) -> dict[str, Any]:
        p = self.progress
        return {
            "model": model_state_cpu(self.model),
            "optimizer": full_optimizer_state_dict(self.optimizer) if is_sharded(self.model) else self.optimizer.state_dict(),
            "epoch": p.epoch,
            "global_step": p.global_step,
            "model_ema1": self.ema1.state_dict(),
            "model_ema2": self.ema2.state_dict(),
            "batch_in_epoch": p.batch_in_epoch,
            "samples_in_epoch": p.samples_in_epoch,
            "sampler_epoch": p.epoch,
            "rng": rng_states,
            "lr": {"base": float(self.lr_base), "last": float(self.last_lr)},
            "world_size": self.info.world_size,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "format": CHECKPOINT_FORMAT,
            **({"init_from": dict(self.init_from)} if self.init_from else {}),
        }

    def save(self, names: Sequence[str]) -> None:
        """Write the full checkpoint under each name (rank 0; all ranks must call), and with
        LoRA the adapters alone beside each (`adapter_<name>`)."""
        p = self.progress
        sharded = is_sharded(self.model)  # gathering the shards is collective: every rank builds
        self.folder.save(names, self.checkpoint_dict, self.generator, epoch=p.epoch,
                         batch_in_epoch=p.batch_in_epoch, global_step=p.global_step, collective=sharded)
        if getattr(self.model, "lora", None) is not None and (self.info.is_main or sharded):
            adapters = self.adapter_dict()
            for name in names if self.info.is_main else ():
                path = atomic_torch_save(adapters, self.folder.exp_dir / f"adapter_{name}")
                self.logger.info("Adapters saved to %s", path)

    def shard_optimizer_and_emas(self, build_optimizer: Callable[[], torch.optim.Optimizer]) -> None:
        """After FSDP sharded the network (wavflow/train/fsdp.py): AdamW rebuilt on the sharded
        parameters with its loaded moments cut to this rank's shards, the EMA copies cut alike."""
        self.optimizer = reshard_optimizer(self.optimizer, build_optimizer)
        for ema in (self.ema1, self.ema2):
            ema.shadow = shard_shadows(ema.shadow, self.model)

    def adapter_dict(self) -> dict[str, Any]:
        """An adapter checkpoint: the adapters, and the other parameters `training.trainable`
        named (raw and EMA-1 each), their settings, and the base they adapt."""
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {
            "format": ADAPTER_FORMAT,
            "lora": self.model.lora_settings.as_dict(),
            "adapter": adapter_state(model_state_cpu(self.model), trained),
            "adapter_ema1": adapter_state(self.ema1.state_dict(), trained),
            "base": dict(self.init_from or {}),
            "epoch": self.progress.epoch,
            "global_step": self.progress.global_step,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def save_ema(self, epoch: int) -> None:
        self.folder.save_ema(self.ema1.state_dict(), epoch)

    # ------------------------------------------------------------------ reading
    def load_start(self, resuming: bool) -> None:
        """The run's starting point: its own latest checkpoint, an initial load, or nothing."""
        if resuming:
            self._resume()
            return
        latest = self.folder.latest_path
        if latest.exists():
            self.logger.warning("training.resume=false: ignoring (and later overwriting) %s", latest)
        init_from, initial = self.cfg.training.get("init_from"), self.cfg.checkpoint.initial_load_path
        if init_from and initial:
            raise ConfigError(
                f"training.init_from={init_from} and checkpoint.initial_load_path={initial} both name starting "
                "weights: set one (init_from starts a new run at step 0; initial_load_path can also restore the optimiser)"
            )
        if getattr(self.model, "lora", None) is not None and not init_from:
            raise ConfigError("training.lora adapts trained weights: set training.init_from to the checkpoint it adapts")
        if init_from:
            self._init_from()
        elif initial:
            self._initial_load()

    def _resume(self) -> None:
        latest, p = self.folder.latest_path, self.progress
        failure: WavFlowError | None = None
        try:
            self._load_full(load_latest_checkpoint(latest), model_only=False, source=str(latest))
            mine: dict[str, Any] = {
                "global_step": p.global_step, "epoch": p.epoch,
                "batch_in_epoch": p.batch_in_epoch, "digest": weights_digest(self.model),
            }
        except WavFlowError as exc:
            failure, mine = exc, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        self.folder.check_same_resume_point(mine, failure)
        self.logger.info(
            "Resumed from %s: %d completed epoch(s), global step %d, batch %d of epoch %d",
            latest, p.epoch, p.global_step, p.batch_in_epoch, p.epoch + 1,
        )

    def _init_from(self) -> None:
        """training.init_from: the network of this new run (step 0, fresh optimiser) and its EMAs."""
        tr = self.cfg.training
        path = resolve_checkpoint_path(str(tr.init_from), key="training.init_from")
        if not path.is_file():
            raise CheckpointError(f"training.init_from {path} does not exist")
        digest = file_sha256(path)
        check_pinned_hash(path, digest, tr.get("init_from_sha256"))
        weights, which = initial_weights(load_initial_checkpoint(path, key="training.init_from"),
                                         use_ema=bool(tr.get("init_from_ema", False)), source=str(path))
        check_feature_norm(weights, self.model, source=str(path), feature_norm_setting=self.cfg.data.feature_norm)
        weights = {**adapter_state(self.model.state_dict()), **weights}  # new adapters start as built (B = 0)
        weights = with_added_parts(weights, self.model, source=str(path))
        load_weights(self.model, weights, source=f"training.init_from {path}")
        self.ema1.reset_to(self.model)
        self.ema2.reset_to(self.model)
        self.init_from = InitRecord(str(path), digest, which).as_dict()
        tr.init_from_sha256 = digest  # recorded in config.yaml and in every checkpoint's config
        self.logger.info("Started from the %s weights of %s (SHA-256 %s): step 0, fresh optimiser and schedule",
                         which, path, digest)

    def _initial_load(self) -> None:
        ck = self.cfg.checkpoint
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
        self.logger.info("Loaded initial weights from %s (%d completed epoch(s), global step %d)",
                         path, self.progress.epoch, self.progress.global_step)

    def _load_full(self, ckpt: dict[str, Any], *, model_only: bool, source: str) -> None:
        restore_weights(ckpt, self.model, (self.ema1, self.ema2), source=source,
                        feature_norm_setting=self.cfg.data.feature_norm)
        if isinstance(ckpt.get("init_from"), dict):  # a resumed fine-tuning run keeps its origin
            self.init_from = {str(k): str(v) for k, v in ckpt["init_from"].items()}
            tr = self.cfg.training
            if self.init_from.get("sha256"):
                check_pinned_hash(Path(self.init_from.get("path", "?")), self.init_from["sha256"],
                                  tr.get("init_from_sha256"))
                tr.init_from_sha256 = self.init_from["sha256"]  # config.yaml is rewritten at every start
        if model_only or "optimizer" not in ckpt or "epoch" not in ckpt:
            return
        try:
            self.optimizer.load_state_dict(with_kernel_flags_of(self.optimizer, ckpt["optimizer"]))
        except Exception as exc:
            raise CheckpointError(f"optimizer state in {source} does not fit this model: {exc}") from exc
        for group in self.optimizer.param_groups:  # the saved groups' settings replace the config's
            if "lr_scale" in group:
                group["lr_scale"] = float(self.cfg.training.spectral_skip_lr_scale)
        self._restore_progress(ckpt, source)
        info = self.info
        reseed = self.seed + info.rank + 1_000_003 * self.progress.global_step
        restore_rank_rng(ckpt.get("rng"), self.generator, info=info, reseed=reseed, source=source,
                         logger=self.logger)

    def _restore_progress(self, ckpt: dict[str, Any], source: str) -> None:
        p, world = self.progress, self.info.world_size
        p.epoch = int(ckpt["epoch"])
        p.global_step = int(ckpt.get("global_step", 0))
        p.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        saved_world = int(ckpt.get("world_size", world))
        # Older checkpoints: every rank had trained batch_in_epoch full batches.
        p.samples_in_epoch = int(ckpt.get(
            "samples_in_epoch", p.batch_in_epoch * int(self.cfg.training.batch_size) * saved_world))
        if p.samples_in_epoch and saved_world != world and self.info.is_main:
            self.logger.warning(
                "%s stopped mid-epoch after %d sample(s) of epoch %d on %d rank(s); this run (%d rank(s)) "
                "trains the epoch's remaining samples in the same global order, none repeated or skipped",
                source, p.samples_in_epoch, p.epoch + 1, saved_world, world,
            )
