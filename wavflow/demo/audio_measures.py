"""Measurements of audio clips that the demo metrics (wavflow.demo.metrics) are built from.

Each takes waveforms or their log-mels and knows nothing of data sets, modes or reports:

- features: `log_mel` (64 bands, 10 ms hop) and `clip_embedding` (time-pooled, gain-invariant),
  and `LinearDiscriminantClassifier`, the class scorer fitted on them.
- onsets: `detect_onsets` in the energy envelope, `class_onset_lags` (the detector's lag per
  class on real clips), `onset_errors` per reference onset and `summarise_onsets` (a miss
  counts MISS_MS).
- Fréchet distance between Gaussians of per-frame log-mel vectors (`frechet_between`).
- level and noise floor in dBFS (`clip_levels`).
- baselines and memorisation: white noise (`noise_baseline`) and the log-mel distance matrix
  of `nearest_reference`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchaudio

from wavflow.audio import load_audio
from wavflow.evaluate.metrics import frechet_from_statistics

N_MELS = 64
LOG_FLOOR = 1e-10  # power floor before log: -100 dB
MISS_MS = 1000.0  # error scored for a reference onset with no generated onset near it
LEVEL_FLOOR_DB = -120.0  # dBFS given to digital silence
NOISE_FLOOR_FRAME_SEC = 0.010
NOISE_FLOOR_PERCENTILE = 10.0


def finite_or_none(x: Any) -> float | None:
    """`x` as a float, None when NaN or infinite (JSON has no such numbers)."""
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------
# Features


@lru_cache(maxsize=4)
def _mel_transform(sample_rate: int):
    n_fft = 1 << max(8, int(round(math.log2(0.032 * sample_rate))))  # ~32 ms window
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=sample_rate // 100, n_mels=N_MELS,
        f_min=20.0, f_max=sample_rate / 2, power=2.0)


def log_mel(wave: np.ndarray | torch.Tensor, sample_rate: int) -> np.ndarray:
    """(N_MELS, T) log-mel power in dB (10 log10, floored at -100 dB), 10 ms hop."""
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32)).reshape(-1)
    with torch.no_grad():
        mel = _mel_transform(int(sample_rate))(x)
    return (10.0 * torch.log10(mel.clamp_min(LOG_FLOOR))).numpy().astype(np.float64)


def clip_embedding(logmel: np.ndarray) -> np.ndarray:
    """Time-pooled statistics of a log-mel (mean, std, max per band): a (3*N_MELS,) vector.

    Levels are taken relative to the clip's loudest bin, so a gain change (e.g. the loudness
    normalisation of generated audio) leaves the embedding unchanged.
    """
    rel = logmel - logmel.max()
    return np.concatenate([rel.mean(axis=1), rel.std(axis=1), rel.max(axis=1)])


class LinearDiscriminantClassifier:
    """Linear discriminant analysis with a shrunk pooled covariance, on standardised features.

    The class whose mean is nearest in the Mahalanobis distance of the pooled within-class
    covariance, shrunk towards its mean variance (`shrinkage`) because a clip embedding has more
    dimensions than a small data set has clips per class. Unlike a plain nearest centroid it
    discounts directions that vary within a class (the pitch of an instrument, the level of
    a band): on the instruments set the real held-out clips score 1.00 against 0.92 for a
    nearest centroid (docs/benchmarks.md)."""

    def __init__(self, shrinkage: float = 0.3) -> None:
        self.shrinkage = shrinkage

    def fit(self, features: np.ndarray, labels: Sequence[str]) -> "LinearDiscriminantClassifier":
        features = np.asarray(features, dtype=np.float64)
        self.mean_ = features.mean(axis=0)
        self.scale_ = np.maximum(features.std(axis=0), 1.0)  # dB features: 1 dB floor
        z = (features - self.mean_) / self.scale_
        self.classes_ = sorted(set(labels))
        labels_arr = np.asarray(labels)
        self.centroids_ = np.stack([z[labels_arr == c].mean(axis=0) for c in self.classes_])
        within = np.concatenate([z[labels_arr == c] - m for c, m in zip(self.classes_, self.centroids_)])
        cov = within.T @ within / max(len(within) - len(self.classes_), 1)
        dim = cov.shape[0]
        cov = (1.0 - self.shrinkage) * cov + self.shrinkage * np.trace(cov) / dim * np.eye(dim)
        self.precision_ = np.linalg.inv(cov)
        return self

    def predict(self, features: np.ndarray) -> list[str]:
        z = (np.atleast_2d(features) - self.mean_) / self.scale_
        diff = z[:, None, :] - self.centroids_[None]
        d = np.einsum("nci,ij,ncj->nc", diff, self.precision_, diff)
        return [self.classes_[i] for i in d.argmin(axis=1)]


# ----------------------------------------------------------------------------------------------
# Onsets


def energy_envelope(wave: np.ndarray, sample_rate: int, *, window_sec: float = 0.010,
                    hop_sec: float = 0.005) -> tuple[np.ndarray, float]:
    """Hann-weighted mean power of frames centred at k*hop (reflect-padded): (power, hop_sec)."""
    x = np.asarray(wave, dtype=np.float64).reshape(-1)
    win = max(2, int(round(window_sec * sample_rate)))
    hop = max(1, int(round(hop_sec * sample_rate)))
    half = win // 2
    padded = np.pad(x, (half, win - half), mode="reflect" if x.size > win else "constant")
    n_frames = 1 + x.size // hop
    idx = np.arange(win)[None, :] + hop * np.arange(n_frames)[:, None]
    w = np.hanning(win + 2)[1:-1]
    power = (padded[idx] ** 2 * w).sum(axis=1) / w.sum()
    return power, hop / sample_rate


def detect_onsets(wave: np.ndarray | torch.Tensor, sample_rate: int, *, rise_db: float = 10.0,
                  gate_db: float = 25.0, lookback_sec: float = 0.04,
                  refractory_sec: float = 0.1) -> np.ndarray:
    """Onset times (s) of the energy rises in `wave`.

    A frame starts an onset when its level is `rise_db` above the minimum of the preceding
    `lookback_sec` and within `gate_db` of the clip's loudest frame (so the noise floor never
    triggers). The onset time is where the power crosses halfway between that minimum and the
    peak of the next `lookback_sec` (linearly interpolated): for a Hann-weighted window this
    is exactly the start of a sudden step in power.
    """
    power, hop = energy_envelope(np.asarray(wave, dtype=np.float64), sample_rate)
    level = 10.0 * np.log10(power + LOG_FLOOR)
    span = max(1, int(round(lookback_sec / hop)))
    gate = level.max() - gate_db
    onsets: list[float] = []
    t = 1
    while t < level.size:
        lo = max(0, t - span)
        pre = int(lo + np.argmin(level[lo:t]))
        if level[t] - level[pre] >= rise_db and level[t] >= gate:
            hi = min(level.size, t + span + 1)
            p_lo, p_hi = power[pre], power[t:hi].max()
            mid = 0.5 * (p_lo + p_hi)
            j = pre + 1 + int(np.argmax(power[pre + 1:hi] >= mid))
            frac = (mid - power[j - 1]) / max(power[j] - power[j - 1], 1e-20)
            onset = (j - 1 + float(np.clip(frac, 0.0, 1.0))) * hop
            if not onsets or onset - onsets[-1] >= refractory_sec:
                onsets.append(onset)
            t = j + max(1, int(round(refractory_sec / hop)))
            continue
        t += 1
    return np.asarray(onsets, dtype=np.float64)


ONSET_LAG_MATCH_SEC = 0.1  # a detection this close to a note-on counts for its class's lag


def class_onset_lags(detections: Sequence[tuple[str, Sequence[float], Sequence[float]]]
                     ) -> dict[str, float]:
    """Per class, the median of (nearest detected - reference onset) in seconds over real clips
    given as (label, reference onsets, detected onsets); pairs further apart than
    ONSET_LAG_MATCH_SEC are left out. An instrument whose attack takes tens of ms to build
    (a bowed violin, a flute) reaches the detector's half-power point that long after its
    note-on; removing the lag measured on real clips scores generated clips against the
    timing the real sound has, not against the shape of its attack."""
    lags: dict[str, list[float]] = {}
    for label, reference, detected in detections:
        det = np.asarray(detected, dtype=np.float64)
        for onset in reference:
            if det.size:
                signed = det[np.argmin(np.abs(det - onset))] - onset
                if abs(signed) <= ONSET_LAG_MATCH_SEC:
                    lags.setdefault(label, []).append(float(signed))
    return {label: float(np.median(v)) for label, v in sorted(lags.items())}


def onset_errors(reference: Sequence[float], detected: Sequence[float]) -> np.ndarray:
    """|nearest detected - reference| in seconds for each reference onset (NaN if none detected)."""
    ref = np.asarray(reference, dtype=np.float64)
    det = np.asarray(detected, dtype=np.float64)
    if det.size == 0:
        return np.full(ref.shape, np.nan)
    return np.abs(ref[:, None] - det[None, :]).min(axis=1)


def summarise_onsets(errors: Sequence[np.ndarray], tolerance_ms: float) -> dict[str, Any]:
    """Median / p90 error (ms) over EVERY reference onset, an onset with no generated onset near
    it (none detected, or the nearest beyond MISS_MS) counting as a MISS_MS miss, so silence
    cannot score well; and the share of reference onsets detected within `tolerance_ms`."""
    flat = np.concatenate([np.asarray(e, dtype=np.float64).reshape(-1) for e in errors]) \
        if errors else np.zeros(0)
    scored = np.minimum(np.nan_to_num(flat * 1000.0, nan=MISS_MS), MISS_MS)
    return {
        "onset_median_ms": finite_or_none(np.median(scored)) if scored.size else None,
        "onset_p90_ms": finite_or_none(np.percentile(scored, 90)) if scored.size else None,
        "onset_detection_rate": finite_or_none(np.mean(np.nan_to_num(flat * 1000.0, nan=np.inf)
                                                       <= tolerance_ms)) if flat.size else None,
        "num_reference_onsets": int(flat.size),
    }


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def frame_statistics(logmels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the per-frame log-mel vectors of a set of clips."""
    frames = np.concatenate([m.T for m in logmels], axis=0)
    return frames.mean(axis=0), np.cov(frames, rowvar=False)


def frechet_between(logmels_a: Sequence[np.ndarray], logmels_b: Sequence[np.ndarray]) -> float:
    return frechet_from_statistics(*frame_statistics(logmels_a), *frame_statistics(logmels_b))


# ----------------------------------------------------------------------------------------------
# Level and noise floor


def amplitude_db(rms: float | np.ndarray) -> np.ndarray:
    """20 log10(rms) in dBFS (full scale = 1.0), floored at LEVEL_FLOOR_DB for silence."""
    rms = np.asarray(rms, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.maximum(20.0 * np.log10(rms), LEVEL_FLOOR_DB)


def clip_levels(wave: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """(level_db, noise_floor_db) of one clip in dBFS.

    level: the RMS of the whole clip. Noise floor: the NOISE_FLOOR_PERCENTILE-th percentile of
    the RMS of consecutive NOISE_FLOOR_FRAME_SEC frames (a trailing partial frame is dropped):
    the quiet background between events, which loudness normalisation does not set.
    """
    x = np.asarray(wave, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return LEVEL_FLOOR_DB, LEVEL_FLOOR_DB
    level = float(amplitude_db(np.sqrt(np.mean(x**2))))
    hop = max(1, int(round(NOISE_FLOOR_FRAME_SEC * sample_rate)))
    n_frames = x.size // hop
    if n_frames == 0:  # shorter than one frame: the whole clip is the frame
        return level, level
    frame_rms = np.sqrt(np.mean(x[:n_frames * hop].reshape(n_frames, hop) ** 2, axis=1))
    return level, float(amplitude_db(np.percentile(frame_rms, NOISE_FLOOR_PERCENTILE)))


# ----------------------------------------------------------------------------------------------
# Baselines and memorisation


def noise_baseline(n: int, duration: float, sample_rate: int, *, seed: int = 0,
                   rms: float = 0.1) -> list[np.ndarray]:
    """`n` clips of white Gaussian noise (float32) at the given RMS: the 'knows nothing' model."""
    rng = np.random.default_rng(seed)
    num = int(round(duration * sample_rate))
    return [(rms * rng.standard_normal(num)).astype(np.float32) for _ in range(n)]


def _as_wave(item: Any, sample_rate: int) -> np.ndarray:
    if isinstance(item, (str, Path)):
        return load_audio(item, sample_rate).numpy()
    return np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item,
                      dtype=np.float32).reshape(-1)


def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """`wave` cut or zero-padded to `num_samples`."""
    if wave.size >= num_samples:
        return wave[:num_samples]
    return np.pad(wave, (0, num_samples - wave.size))


def nearest_reference(generated_wavs: Sequence[Any], reference_wavs: Sequence[Any], *,
                      sample_rate: int = 16000, dynamic_range_db: float | None = None) -> np.ndarray:
    """(G, R) matrix of log-mel distances between generated and reference clips.

    Items are paths or 1-D waveforms at `sample_rate`. Every clip is cropped / zero-padded to
    the first reference's length; the distance is the RMS difference of the log-mel images
    in dB (L2 norm / sqrt(number of mel bins x frames)), so 0 means identical audio. A
    generated clip much closer to one training clip than real held-out clips are suggests
    memorisation.

    With `dynamic_range_db`, each log-mel is taken relative to its loudest bin and floored
    that many dB below it: gain differences (loudness normalisation) and the texture of quiet
    background noise no longer count, only the sound events do.
    """
    if not generated_wavs or not reference_wavs:
        raise ValueError("nearest_reference needs at least one generated and one reference clip")
    refs = [_as_wave(r, sample_rate) for r in reference_wavs]
    num = refs[0].size
    def feature(wave: np.ndarray) -> np.ndarray:
        lm = log_mel(fit_length(wave, num), sample_rate)
        if dynamic_range_db is not None:
            lm = np.maximum(lm - lm.max(), -float(dynamic_range_db))
        return lm.ravel()

    ref_feats = np.stack([feature(r) for r in refs])
    gen_feats = np.stack([feature(_as_wave(g, sample_rate)) for g in generated_wavs])
    sq = ((gen_feats**2).sum(1)[:, None] + (ref_feats**2).sum(1)[None, :]
          - 2.0 * gen_feats @ ref_feats.T)
    return np.sqrt(np.maximum(sq, 0.0) / ref_feats.shape[1])
