"""Where the windows of a long-form generation lie (docs/long_form.md).

A clip longer than the model's trained duration W is covered by windows of exactly W seconds:
window k starts at k * (W - overlap) samples, and the last window is moved back so that it ends
on the clip's last sample (its overlap with the one before is then larger). Window k > 0 is
sampled together with window k-1, sharing one prediction over their `known_samples(k)` common samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from wavflow.errors import ConfigError

LONG_FORM_MODES = ("auto", "off", "on")
# inference.window_overlap_sec=null: half the window, so every moment lies in two windows and the
# one that sees it nearer its centre weighs more (with a quarter, the demo's onsets came 1.5x
# later than per clip, though a 60 s video took 49 s instead of 74-79 s: docs/long_form.md)
DEFAULT_OVERLAP_FRACTION = 0.5


@dataclass(frozen=True)
class WindowPlan:
    """Window placement of one clip, in samples at `sample_rate`."""

    sample_rate: int
    total_samples: int
    window_samples: int
    starts: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.starts)

    def start_sec(self, k: int) -> float:
        return self.starts[k] / self.sample_rate

    def known_samples(self, k: int) -> int:
        """Samples at the start of window k that window k-1 already made (0 for the first)."""
        if k == 0:
            return 0
        return self.starts[k - 1] + self.window_samples - self.starts[k]

    def junctions(self) -> list[int]:
        """The middle of each overlap, where the later window's prediction starts to weigh more
        than the earlier one's: where a seam would show."""
        return [self.starts[k] + self.known_samples(k) // 2 for k in range(1, self.count)]

    def describe(self) -> str:
        """`count x W s, overlap O s` for logs and summary.csv."""
        ov = min((self.known_samples(k) for k in range(1, self.count)), default=0) / self.sample_rate
        return f"{self.count} x {self.window_samples / self.sample_rate:g} s, overlap {ov:g} s"


def resolve_overlap(overlap_sec: Optional[float], window_sec: float, key: str = "inference.window_overlap_sec") -> float:
    """The overlap in seconds: null -> half the window; must satisfy 0 < overlap < window."""
    if overlap_sec is None:
        return DEFAULT_OVERLAP_FRACTION * window_sec
    if isinstance(overlap_sec, bool) or not isinstance(overlap_sec, (int, float)) or not math.isfinite(overlap_sec):
        raise ConfigError(f"{key} must be a number of seconds or null, got {overlap_sec!r}")
    if not 0 < overlap_sec < window_sec:
        raise ConfigError(
            f"{key}={overlap_sec:g} must lie strictly between 0 and the window length {window_sec:g} s "
            "(the model's trained duration, data.audio_duration)"
        )
    return float(overlap_sec)


def check_long_form_mode(mode: object, key: str = "inference.long_form") -> str:
    value = str(mode).lower() if isinstance(mode, (str, bool)) else mode
    value = {"true": "on", "false": "off"}.get(value, value)  # YAML reads bare on/off as booleans
    if value not in LONG_FORM_MODES:
        raise ConfigError(f"{key} must be one of {', '.join(LONG_FORM_MODES)}, got {mode!r}")
    return str(value)


def wants_windows(mode: str, total_samples: int, window_samples: int) -> bool:
    """auto: windows only past the trained length; on: always (one window when it fits); off: never."""
    mode = check_long_form_mode(mode)
    return mode == "on" or (mode == "auto" and total_samples > window_samples)


def plan_windows(total_samples: int, window_samples: int, overlap_samples: int, sample_rate: int) -> WindowPlan:
    if total_samples <= 0:
        raise ConfigError(f"a long-form clip needs a positive length, got {total_samples} samples")
    if not 0 < overlap_samples < window_samples:
        raise ConfigError(
            f"window overlap of {overlap_samples} samples must lie strictly between 0 and the window's {window_samples}"
        )
    hop = window_samples - overlap_samples
    starts = [0]
    while starts[-1] + window_samples < total_samples:
        starts.append(min(starts[-1] + hop, total_samples - window_samples))
    return WindowPlan(sample_rate=int(sample_rate), total_samples=int(total_samples),
                      window_samples=int(window_samples), starts=tuple(starts))
