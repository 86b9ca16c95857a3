"""What a trainer checkpoint records about its run, and how inference uses it: the network
and data settings it adopts for every key the user did not set, the one-line error for a key
the user set to another value, and the EMA-age warning (README, "The checkpoint's settings")."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterator, Mapping, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from wavflow.config import is_explicit
from wavflow.errors import ConfigError

log = logging.getLogger("wavflow.generator")

DEFAULT_EMA_DECAY = 0.9999
# Keys whose value in the training run's config the inference config takes, or must match where
# the user set it: the network shapes and the meaning of its input/output. Weight shapes alone
# cannot reveal most of them.
CHECKED_CONFIG_KEYS = (
    "model.name",
    "data.target_sample_rate",
    "data.audio_duration",
    "data.audio_dim",
    "data.audio_scale",
    "data.clip_seq_len",
    "data.sync_seq_len",
    "data.text_seq_len",
    "data.clip_dim",
    "data.sync_dim",
    "data.text_dim",
    "sampling.prediction_type",
    # The features the network was trained on: other encoders give other (wrong) conditions.
    "encoders.profile",
    "encoders.clip_model",
)
# encoders.clip_model is not used by these profiles (they build their own CLIP).
_PROFILES_WITHOUT_CLIP_MODEL = ("tiny",)
_MISSING = object()


def config_from_checkpoint(ckpt: Mapping[str, Any]) -> Optional[DictConfig]:
    """The training config a trainer checkpoint carries (dict, DictConfig or YAML text), if any."""
    raw = ckpt.get("config") if isinstance(ckpt, Mapping) else None
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError:
            return None
    if isinstance(raw, (dict, DictConfig)):
        return OmegaConf.create(OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else raw)
    return None


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=_MISSING)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    return a == b


def adopt_checkpoint_config(
    cfg: DictConfig, ckpt_cfg: DictConfig, explicit: frozenset[str] | None, ckpt_path: str | os.PathLike
) -> dict[str, Any]:
    """Set each CHECKED_CONFIG_KEYS key the user did not set (`explicit`, see
    wavflow.config.explicit_keys) to the checkpoint's recorded value, in place.

    Returns the keys whose value changed (logged in one line)."""
    adopted = {}
    with unlocked(cfg):
        for key in CHECKED_CONFIG_KEYS:
            trained = _select(ckpt_cfg, key)
            if trained is _MISSING or trained is None or is_explicit(key, explicit):
                continue
            current = _select(cfg, key)
            if current is _MISSING or not _same(trained, current):
                OmegaConf.update(cfg, key, trained, merge=False, force_add=True)
                adopted[key] = trained
    if adopted:
        log.info("adopted from the config recorded in %s: %s", ckpt_path,
                 ", ".join(f"{k}={v!r}" for k, v in adopted.items()))
    return adopted


def check_config_against_checkpoint(
    cfg: DictConfig, ckpt_cfg: DictConfig, ckpt_path: str | os.PathLike, *, allow_mismatch: bool
) -> list[str]:
    """Compare CHECKED_CONFIG_KEYS; a one-line ConfigError naming each differing key, the value
    given and the checkpoint's (after `adopt_checkpoint_config` only values the user set differ).

    With `allow_mismatch` the differences are only returned (and logged as warnings).
    """
    diffs = []
    profiles = {_select(ckpt_cfg, "encoders.profile"), _select(cfg, "encoders.profile")}
    for key in CHECKED_CONFIG_KEYS:
        trained, wanted = _select(ckpt_cfg, key), _select(cfg, key)
        if trained is _MISSING or wanted is _MISSING or trained is None:
            continue
        if key == "encoders.clip_model" and profiles & set(_PROFILES_WITHOUT_CLIP_MODEL):
            continue  # unused there; a profile difference is reported on its own
        if not _same(trained, wanted):
            diffs.append(f"{key}={wanted!r} is set but the checkpoint was trained with {key}={trained!r}")
    if diffs and not allow_mismatch:
        raise ConfigError(
            f"config disagrees with checkpoint {ckpt_path}: " + "; ".join(diffs) + ". Drop these settings "
            "(keys left unset take the checkpoint's values), or set inference.allow_config_mismatch=true "
            "if the difference is deliberate"
        )
    for d in diffs:
        log.warning("config differs from checkpoint %s (allowed): %s", ckpt_path, d)
    return diffs


def ema_warning(ckpt: Mapping[str, Any], ckpt_cfg: Optional[DictConfig], source: str) -> Optional[str]:
    """The EMA caveat: EMA weights of a run younger than the EMA horizon ~ their initialisation."""
    if not source.startswith("model_ema") or not isinstance(ckpt, Mapping):
        return None
    step = ckpt.get("global_step")
    if not isinstance(step, (int, float)) and not (isinstance(step, Tensor) and step.numel() == 1):
        return None
    step = int(step)
    decay, warmup = DEFAULT_EMA_DECAY, False
    if ckpt_cfg is not None:
        for key in ("training.ema_decay1", "training.ema_decay"):
            value = OmegaConf.select(ckpt_cfg, key, default=None)
            if isinstance(value, (int, float)) and 0 < value < 1:
                decay = float(value)
                break
        warmup = bool(OmegaConf.select(ckpt_cfg, "training.ema_warmup", default=False))
    horizon = int(round(1.0 / (1.0 - decay)))
    if warmup or step >= horizon:
        return None
    return (
        f"model.use_ema=true loads EMA weights of a run at global_step={step}, younger than the EMA "
        f"horizon of ~{horizon} steps (decay {decay}); they are still close to the initialisation "
        "and will sound like noise or silence. Use model.use_ema=false (live weights) or train "
        "with training.ema_warmup."
    )


# ----------------------------------------------------------------------------- the API


@contextlib.contextmanager
def unlocked(cfg: DictConfig) -> Iterator[DictConfig]:
    was = OmegaConf.is_struct(cfg)
    OmegaConf.set_struct(cfg, False)
    try:
        yield cfg
    finally:
        OmegaConf.set_struct(cfg, was)
