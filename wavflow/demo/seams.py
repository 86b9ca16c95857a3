"""Seam measures of long-form clips (docs/long_form.md): is a window junction audible?

Per 10 ms frame: the level jump (|dB change| of the frame RMS from the frame before) and the
spectral flux (mean rise of the log-mel bins from the frame before). A junction's frames are
compared with the median of the frames away from every junction, and the same statistic is
taken of the real audio at the same places, whose own spread (the interquartile range of its
non-junction frames) is the yardstick. A click: the largest sample-to-sample step at a junction
(from its sample before to its sample) above the 99th percentile of the steps more than 5 ms
from any junction.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from wavflow.demo.audio_measures import log_mel

FRAME_SEC = 0.010
CLICK_WINDOW_SEC = 0.005


def frame_changes(wave: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
    """{"level_jump_db", "spectral_flux_db"} per frame boundary k (between frames k-1 and k)."""
    hop = int(round(FRAME_SEC * sample_rate))
    n = len(wave) // hop
    frames = np.asarray(wave[: n * hop], dtype=np.float64).reshape(n, hop)
    level = 20 * np.log10(np.sqrt(np.mean(frames ** 2, axis=1)) + 1e-5)
    mel = log_mel(wave, sample_rate)  # (bins, frames) at a 10 ms hop
    flux = np.maximum(np.diff(mel, axis=1), 0).mean(axis=0)
    m = min(n - 1, len(flux))
    return {"level_jump_db": np.abs(np.diff(level))[:m], "spectral_flux_db": flux[:m]}


def _near(length: int, centres: Sequence[int], radius: int, offset: int = 0) -> np.ndarray:
    """Mask of positions offset..offset+length-1 within `radius` of a centre."""
    mask = np.zeros(length, dtype=bool)
    for c in centres:
        lo, hi = max(c - radius - offset, 0), min(c + radius - offset + 1, length)
        if lo < hi:
            mask[lo:hi] = True
    return mask


def _rolling_max(values: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(values, radius, mode="edge")
    return np.max(np.stack([padded[k: k + len(values)] for k in range(2 * radius + 1)]), axis=0)


def seam_scores(generated: np.ndarray, real: np.ndarray, junctions: Sequence[int], sample_rate: int) -> dict[str, Any]:
    """Junction against non-junction frames, for the generated and the real audio of one clip.

    Each frame statistic is first maximised over ±1 frame (a junction falls anywhere inside a
    frame), at junctions and elsewhere alike; the junction figure is the median over junctions.
    """
    hop = int(round(FRAME_SEC * sample_rate))
    out: dict[str, Any] = {"junctions": len(junctions)}
    for name, wave in (("generated", generated), ("real", real)):
        for stat, values in frame_changes(wave, sample_rate).items():
            values = _rolling_max(values, 1)
            centres = [min(max(round(j / hop) - 1, 0), len(values) - 1) for j in junctions]  # value i: frames i, i+1
            away = values[~_near(len(values), centres, 2)]
            q1, q3 = np.percentile(away, [25, 75])
            out[f"{name}_{stat}"] = {"junction_median": float(np.median(values[centres])),
                                     "elsewhere_median": float(np.median(away)), "elsewhere_iqr": float(q3 - q1)}
    for stat in ("level_jump_db", "spectral_flux_db"):
        g, r = out[f"generated_{stat}"], out[f"real_{stat}"]
        excess = g["junction_median"] - g["elsewhere_median"]
        out[f"{stat}_excess"] = excess
        out[f"{stat}_within_real_spread"] = bool(excess <= r["elsewhere_iqr"])
    steps = np.abs(np.diff(np.asarray(generated, dtype=np.float64)))
    at = [j - 1 for j in junctions if 0 < j <= len(steps)]  # the step from sample j-1 to sample j
    near = _near(len(steps), at, int(round(CLICK_WINDOW_SEC * sample_rate)))
    out["click_step_at_junctions"] = float(steps[at].max()) if at else 0.0
    out["click_step_p99_elsewhere"] = float(np.percentile(steps[~near], 99))
    out["no_click"] = bool(out["click_step_at_junctions"] <= out["click_step_p99_elsewhere"])
    return out
