"""The value checks every job shares once its config is composed (wavflow.config.load_config
runs them): the preset exists, durations and rates are positive and within one clip's reach,
the condition shapes are the preset's, the sampling keys are in range. ConfigError names the key."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from wavflow.errors import ConfigError

_MISSING = object()


def required_key(cfg: DictConfig, key: str, hint: str = "") -> Any:
    """`cfg`'s value at the dotted `key`; ConfigError naming the key (and `hint`) when absent."""
    value = OmegaConf.select(cfg, key, default=_MISSING)
    if value is _MISSING:
        raise ConfigError(f"required config key '{key}' is missing{f' ({hint})' if hint else ''}")
    return value


MAX_CLIP_SECONDS = 600  # one clip's length: 10 minutes is already ~48 k waveform tokens at 16 kHz


def validate_config(cfg: DictConfig) -> None:
    """Shape and value checks shared by every job (each job adds its own)."""
    from wavflow.model.presets import PRESETS  # late import: the model package is heavy

    name = required_key(cfg, "model.name")
    if name not in PRESETS:
        raise ConfigError(f"model.name '{name}' is not a known preset ({', '.join(sorted(PRESETS))})")
    preset = PRESETS[name]
    sr, dur = required_key(cfg, "data.target_sample_rate"), required_key(cfg, "data.audio_duration")
    if not isinstance(sr, int) or sr <= 0:
        raise ConfigError(f"data.target_sample_rate must be a positive integer, got {sr!r}")
    if not (isinstance(dur, (int, float)) and dur > 0):
        raise ConfigError(f"data.audio_duration must be a positive number of seconds, got {dur!r}")
    if dur > MAX_CLIP_SECONDS:  # the network attends over the whole clip: memory grows with its square
        raise ConfigError(f"data.audio_duration={dur!r} s is longer than one clip can be (at most "
                          f"{MAX_CLIP_SECONDS} s; the reference presets train on 8 s)")
    if required_key(cfg, "data.audio_dim") != preset.latent_dim:
        raise ConfigError(
            f"data.audio_dim={required_key(cfg, 'data.audio_dim')} disagrees with model.name '{name}' "
            f"(patch width {preset.latent_dim})"
        )
    if required_key(cfg, "data.audio_scale") <= 0:
        raise ConfigError("data.audio_scale must be > 0")
    for stream in ("clip", "sync", "text"):
        for what in ("seq_len", "dim"):
            key = f"data.{stream}_{what}"
            got = required_key(cfg, key)
            want = getattr(preset, f"{stream}_{what}")
            if not isinstance(got, int) or got <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {got!r}")
            if want is not None and got != want:
                raise ConfigError(f"{key}={got} disagrees with model.name '{name}', which expects {want}")
    if required_key(cfg, "sampling.prediction_type") not in ("x", "v"):
        raise ConfigError(f"sampling.prediction_type must be 'x' or 'v', got {required_key(cfg, 'sampling.prediction_type')!r}")
    if not required_key(cfg, "sampling.noise_shift") > 0:
        raise ConfigError("sampling.noise_shift must be > 0")
    if not 0.0 <= required_key(cfg, "sampling.min_sigma") < 1.0:
        raise ConfigError("sampling.min_sigma must lie in [0, 1)")
    _check_adaptive(cfg)


ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def _check_adaptive(cfg: DictConfig) -> None:
    """sampling.adaptive_solver / rtol / atol / adaptive_t_end (docs/method.md §3)."""
    solver = required_key(cfg, "sampling.adaptive_solver")
    if solver not in ADAPTIVE_SOLVERS:
        raise ConfigError(f"sampling.adaptive_solver must be one of {', '.join(ADAPTIVE_SOLVERS)}, got {solver!r}")
    for key in ("sampling.rtol", "sampling.atol"):
        value = required_key(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{key} must be a number > 0, got {value!r}")
    t_end, top = required_key(cfg, "sampling.adaptive_t_end"), 1.0 - float(required_key(cfg, "sampling.min_sigma"))
    if isinstance(t_end, bool) or not isinstance(t_end, (int, float)) or not 0.0 < t_end < top:
        raise ConfigError(f"sampling.adaptive_t_end must lie in (0, {top:g}) (below 1 - sampling.min_sigma), got {t_end!r}")
