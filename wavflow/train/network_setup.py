"""The network as training sees it: built from the config with the same initial weights on every
rank, its feature normalisation attached, its kernels chosen, and wrapped for data parallelism.
How the model is spread over processes is decided here and nowhere else."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from wavflow.distributed import DistInfo
from wavflow.errors import ConfigError
from wavflow.features.report import identity_tag
from wavflow.model import build_model_from_config
from wavflow.model.presets import PRESETS
from wavflow.speed import SpeedOptions, set_attention_impl, set_conv_impl
from wavflow.train.dataset import TrainRow
from wavflow.train.empty_string import resolve_empty_string_feat
from wavflow.train.feature_norm import resolve_feature_norm
from wavflow.train.fsdp import shard_model


def build_training_network(cfg: DictConfig, rows: Sequence[TrainRow], *, resuming: bool, device: torch.device,
                           speed: SpeedOptions, logger: logging.Logger) -> nn.Module:
    """The network in training mode: the same initial weights on every rank (seeded with
    training.seed; DDP also broadcasts rank 0's at wrap time), the empty-caption feature unless
    a checkpoint will bring its own, and the feature normalisation its features need."""
    tr = cfg.training
    torch.manual_seed(int(tr.seed))
    empty_string = None
    if not resuming:  # a resumed checkpoint carries its own copy
        empty_string, source = resolve_empty_string_feat(cfg, rows[0])
        logger.info("Empty string feature: %s", source)
    blocks = checkpointed_blocks(tr.gradient_checkpointing, PRESETS[str(cfg.model.name)].depth)
    model = build_model_from_config(cfg, empty_string_feat=empty_string, gradient_checkpointing=blocks).to(device)
    norm_stats, norm_why = resolve_feature_norm(cfg.data.feature_norm, [r.features_path.parent for r in rows])
    logger.info("Feature normalisation: %s", norm_why)
    if norm_stats is not None:  # before the optimizer and EMAs: its frozen parameters are saved with both
        model.attach_condition_norm().set_statistics(
            norm_stats.streams, identity_tag(norm_stats.encoder_identity),
            rms=OmegaConf.to_container(cfg.data.feature_norm_rms))
        # the empty clip/sync tokens start at zero: at the streams' means (cond_norm.py)
    if bool(OmegaConf.select(cfg, "model.spectral_skip", default=False)):
        model.attach_spectral_skip()  # before the optimizer and EMAs, like the normalisation
        logger.info("Spectral skip: on (model.spectral_skip; per-frequency Wiener skip, docs/method.md §2.14)")
    if bool(OmegaConf.select(cfg, "model.level_head", default=False)):
        model.attach_level_head()
        logger.info("Loudness head: on (model.level_head; each clip's loudness from its conditions, docs/method.md §2.15)")
    model.train()
    set_conv_impl(model, speed.conv_impl)
    set_attention_impl(model, speed.attention_backend)
    return model


def checkpointed_blocks(setting: Any, depth: int) -> list[int]:
    """training.gradient_checkpointing as block indices (joint blocks first, then fused, from 0):
    false none, true all, an integer k every k-th (0, k, 2k, ...), a list those blocks."""
    key = "training.gradient_checkpointing"
    if isinstance(setting, bool) or setting is None:
        return list(range(depth)) if setting else []
    if isinstance(setting, int):
        if setting < 1:
            raise ConfigError(f"{key}={setting}: an integer k checkpoints every k-th block and must be >= 1")
        return list(range(0, depth, setting))
    if isinstance(setting, str) or not hasattr(setting, "__iter__"):
        raise ConfigError(f"{key} must be true, false, an integer k (every k-th block) or a list of block indices, "
                          f"got {setting!r}")
    blocks = list(setting)
    bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < depth]
    if bad:
        raise ConfigError(f"{key}: {bad} are not block indices of this preset (0 to {depth - 1}: joint blocks "
                          "first, then fused)")
    return sorted(set(blocks))


def wrap_for_data_parallel(model: nn.Module, info: DistInfo, tr: DictConfig | None = None,
                           logger: logging.Logger | None = None) -> nn.Module:
    """training.strategy over the process group (the network itself on one process): DDP, or
    FSDP2 sharding the network in place (wavflow/train/fsdp.py; the caller then reshards the
    optimizer and EMAs with TrainState.shard_optimizer_and_emas). Rotary tables are buffers every rank builds
    alike, so they are not broadcast."""
    strategy = str(tr.get("strategy", "ddp")) if tr is not None else "ddp"
    if not info.is_distributed:
        if strategy == "fsdp" and logger is not None:
            logger.info("training.strategy=fsdp on one process without a process group: nothing to shard, "
                        "the network trains whole")
        return model
    if strategy == "fsdp":
        shard_model(model, info, tr.get("fsdp") or {})
        return model
    with warnings.catch_warnings():  # broadcast_buffers=False is still the way to keep rot tables local
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
