"""The network as training sees it: built from the config with the same initial weights on every
rank, its feature normalisation attached, its kernels chosen, and wrapped for data parallelism.
How the model is spread over processes is decided here and nowhere else."""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from wavflow.distributed import DistInfo
from wavflow.features.report import identity_tag
from wavflow.model import build_model_from_config
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
    model = build_model_from_config(
        cfg, empty_string_feat=empty_string, gradient_checkpointing=bool(tr.gradient_checkpointing)
    ).to(device)
    norm_stats, norm_why = resolve_feature_norm(cfg.data.feature_norm, [r.features_path.parent for r in rows])
    logger.info("Feature normalisation: %s", norm_why)
    if norm_stats is not None:  # before the optimizer and EMAs: its frozen parameters are saved with both
        model.attach_condition_norm().set_statistics(
            norm_stats.streams, identity_tag(norm_stats.encoder_identity),
            rms=OmegaConf.to_container(cfg.data.feature_norm_rms))
        # the empty clip/sync tokens start at zero: at the streams' means (cond_norm.py)
    model.train()
    set_conv_impl(model, speed.conv_impl)
    set_attention_impl(model, speed.attention_backend)
    return model


def wrap_for_data_parallel(model: nn.Module, info: DistInfo, tr: DictConfig | None = None,
                           logger: logging.Logger | None = None) -> nn.Module:
    """training.strategy over the process group (the network itself on one process): DDP, or
    FSDP2 sharding the network in place (wavflow/train/fsdp.py; the caller then reshards the
    optimizer and EMAs with shard_training_state). Rotary tables are buffers every rank builds
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
