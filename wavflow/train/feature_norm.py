"""Which feature normalisation a training run uses (`data.feature_norm`, docs/encoders.md).

null / `auto` (default): on when every feature directory of the training CSVs holds a
`feature_stats.pt` written by extraction with the built-in `tiny` encoders (where the learning
benchmark shows it helps), off otherwise, so reference presets and feature caches made by the
reference code train exactly as before. `true`: on, every directory must have its statistics.
`false`: off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from wavflow.errors import ConfigError
from wavflow.features.report import STATS_FILENAME, FeatureStats

MODES = ("auto", "true", "false")


def feature_norm_mode(value: Any) -> str:
    mode = "auto" if value is None else str(value).strip().lower()
    mode = {"on": "true", "yes": "true", "1": "true", "off": "false", "no": "false", "0": "false"}.get(mode, mode)
    if mode not in MODES:
        raise ConfigError(f"data.feature_norm must be null (auto), true or false, got {value!r}")
    return mode


def resolve_feature_norm(value: Any, feature_dirs: Sequence[Path]) -> tuple[FeatureStats | None, str]:
    """(pooled statistics or None, one line saying what was decided and why)."""
    mode = feature_norm_mode(value)
    if mode == "false":
        return None, "off (data.feature_norm=false)"
    dirs = sorted(set(feature_dirs))
    missing = [d for d in dirs if not (d / STATS_FILENAME).is_file()]
    if missing:
        if mode == "true":
            raise ConfigError(
                f"data.feature_norm=true but {missing[0] / STATS_FILENAME} does not exist"
                f"{f' (nor in {len(missing) - 1} more feature folder(s))' if len(missing) > 1 else ''}: re-run the "
                "extraction, or write it with `python -m wavflow.features.report --csv <training csv> --write-stats`"
            )
        return None, f"off (data.feature_norm auto and {missing[0]} has no {STATS_FILENAME})"
    stats = FeatureStats.merge([FeatureStats.load(d / STATS_FILENAME) for d in dirs],
                               where=f"data.feature_norm ({', '.join(map(str, dirs))})")
    if mode == "auto" and not stats.encoder_identity.startswith("tiny"):
        return None, (f"off (data.feature_norm auto: features made by '{stats.encoder_identity}', not the built-in "
                      "tiny encoders; set data.feature_norm=true to normalise them)")
    rows = ", ".join(f"{k} {v}" for k, v in stats.rows.items())
    return stats, f"on (statistics of '{stats.encoder_identity}' features from {len(dirs)} folder(s): {rows} rows)"
