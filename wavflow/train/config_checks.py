"""The training job's config values, checked up front (ConfigError naming the key), and the
few values derived from them."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from wavflow.errors import ConfigError, ManifestError
from wavflow.io_utils import check_safe_id
from wavflow.row_policy import POLICY_KEY, max_failed_fraction
from wavflow.speed import SpeedOptions
from wavflow.train.fsdp import check_strategy
from wavflow.train.lr_schedule import SCHEDULES


def _int_key(tr: DictConfig, key: str, minimum: int, *, nullable: bool = False) -> int | None:
    """training.<key> as an int >= minimum (ConfigError naming the key otherwise)."""
    value = tr[key]
    if value is None and nullable:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, str):  # OmegaConf keeps quoted/odd CLI values as strings
        ok = value.strip().lstrip("-").isdigit()
        value = int(value) if ok else value
    if not ok or value < minimum:  # type: ignore[operator]
        null = "null or " if nullable else ""
        raise ConfigError(f"training.{key} must be {null}an integer >= {minimum}, got {tr[key]!r}")
    return int(value)  # type: ignore[arg-type]


def _float_key(tr: DictConfig, key: str) -> float:
    try:
        if isinstance(tr[key], bool):
            raise TypeError
        return float(tr[key])
    except (TypeError, ValueError):
        raise ConfigError(f"training.{key} must be a number, got {tr[key]!r}") from None


def check_experiment_id(value: Any) -> str:
    """A non-empty name usable as one folder inside training.output_dir."""
    text = "" if value is None else str(value)
    try:
        check_safe_id(text, where="training.experiment_id")
    except ManifestError as exc:
        raise ConfigError(
            f"training.experiment_id={value!r} must be a non-empty folder name without '/', '\\' or '..' "
            f"(outputs go to <training.output_dir>/<training.experiment_id>/): {exc}"
        ) from None
    return text


def check_training_config(cfg: DictConfig) -> None:
    """Every training.* value the trainer uses, checked before a process group or model exists."""
    tr = cfg.training
    check_strategy(tr)
    if tr.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"training.precision={tr.precision!r} is not one of auto, fp32, bf16")
    if tr.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"training.device={tr.device!r} is not one of auto, cpu, cuda")
    if tr.lr_schedule not in SCHEDULES:
        raise ConfigError(f"training.lr_schedule={tr.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
    if tr.loss_type not in ("x", "v"):
        raise ConfigError(f"training.loss_type={tr.loss_type!r} is not one of x, v")
    for key in ("batch_size", "grad_accum_steps", "epochs", "repeat_factor", "log_freq"):
        _int_key(tr, key, 1)
    _int_key(tr, "max_steps", 1, nullable=True)
    for key in ("num_workers", "warmup_steps", "gen_train_freq", "checkpoint_freq", "checkpoint_save_epoch",
                "ema_checkpoint_save_epoch", "save_every_steps", "seed", "max_nonfinite_steps"):
        _int_key(tr, key, 0)
    for key in ("label_drop_prob", "video_drop_prob", "text_drop_prob"):
        if key != "label_drop_prob" and tr[key] is None:
            continue  # null: label_drop_prob
        if not 0.0 <= _float_key(tr, key) <= 1.0:
            raise ConfigError(f"training.{key} must lie in [0, 1], got {tr[key]}")
    if not 0.0 <= float(cfg.sampling.uniform_frac) <= 1.0:
        raise ConfigError(f"sampling.uniform_frac must lie in [0, 1], got {cfg.sampling.uniform_frac}")
    for key in ("ema_decay1", "ema_decay2"):
        if not 0.0 <= _float_key(tr, key) < 1.0:
            raise ConfigError(f"training.{key} must lie in [0, 1), got {tr[key]}")
    for key in ("min_lr", "weight_decay", "clip_grad_norm", "gamma"):
        _float_key(tr, key)
    if not _float_key(tr, "spectral_skip_lr_scale") > 0:
        raise ConfigError(f"training.spectral_skip_lr_scale must be > 0, got {tr.spectral_skip_lr_scale}")
    max_failed_fraction(OmegaConf.select(cfg, POLICY_KEY, default=None))
    if tr.lr is None and tr.blr is None:
        raise ConfigError("set training.lr or training.blr")
    if tr.lr is not None and _float_key(tr, "lr") <= 0:
        raise ConfigError(f"training.lr must be > 0 (or null to use training.blr), got {tr.lr}")
    check_experiment_id(tr.experiment_id)
    SpeedOptions.from_config(tr, "training")


REFERENCE_PRESET_PREFIXES = ("medium_", "large_")


def cpu_reference_preset_warning(model_name: str, device: torch.device) -> str | None:
    """The start-up warning for a reference-size preset trained on CPU, or None."""
    if device.type != "cpu" or not str(model_name).startswith(REFERENCE_PRESET_PREFIXES):
        return None
    size = "624 M" if str(model_name).startswith("medium_") else "1032 M"
    return (
        f"model.name={model_name} is a reference preset: {size} parameters on CPU: ~minutes per step and "
        ">20 GB RAM; use model.name=small_16k/tiny_16k for CPU runs"
    )


def drop_probs(tr: DictConfig) -> tuple[float, float]:
    """(video, text) drop probabilities: `training.video_drop_prob` / `text_drop_prob`, each
    defaulting to `training.label_drop_prob` (the reference's one rate for both)."""
    base = float(tr.label_drop_prob)
    video, text = tr.get("video_drop_prob"), tr.get("text_drop_prob")
    return (base if video is None else float(video)), (base if text is None else float(text))
