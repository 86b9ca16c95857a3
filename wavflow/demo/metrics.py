"""Metrics of generated audio against the demo data set (wavflow.demo.make_dataset).

    python -m wavflow.demo.metrics --generated DIR --reference DATASET_DIR_OR_EVENTS_JSON --out DIR

Generated files are `<id>.wav` (or .flac/.ogg/.mp3/.mp4) in DIR, named by the data set's clip
ids. Every figure is reported per mode (VT2A, T2A, V2A) with its row count, never pooled across
modes: a mode that learns nothing cannot hide behind one that does. `overall` (all rows) carries
only the distribution figures (Fréchet, level, noise floor), which need many clips. Each figure
sits beside baselines that give it a scale (the real held-out clips of the same ids, white noise):

- class accuracy: a linear discriminant (shrunk pooled covariance) on time-pooled log-mel
  statistics (mean, std, max per mel band relative to the clip's peak, so gain-invariant;
  standardised), fitted on the real train clips. Chance (1/num_classes) is reported beside it in every mode;
  the real held-out clips give the ceiling.
- onset timing: onsets detected in the energy envelope (see `detect_onsets`), less the lag
  the detector shows on the real train clips of the row's class (`class_onset_lags`: slow
  attacks reach half power late; ~0 for the procedural set); each reference
  onset is matched to the nearest detected onset of its clip; median and 90th percentile of
  |error| in ms over EVERY reference onset, a missed one (no detection, or none within
  MISS_MS) counting MISS_MS, so silence cannot score well; and the detection rate (share of
  reference onsets with a detection within `tolerance_ms`). Only VT2A and V2A rows see the
  video; T2A's figure is what timing without the video scores.
- level and noise floor (dBFS): per clip the RMS of the whole clip and the 10th percentile of
  the RMS of 10 ms frames (`clip_levels`); per group their medians, and the differences
  generated minus real held-out clips of the same ids (`level_diff_db`, `noise_floor_diff_db`).
- Fréchet distance between Gaussians fitted to per-frame log-mel vectors of the clips and of
  the real train clips; `frechet_ratio` divides it by real-vs-real (the train clips split in
  two halves); white noise-vs-real gives the other end. Like FID it is biased by sample size:
  the real held-out clips of the same ids (`baselines.real_same_ids`) give it at the same n.

`nearest_reference` gives the log-mel distance matrix for memorisation checks.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from wavflow.audio import load_audio
from wavflow.demo.make_dataset import MODES, DatasetInfo, load_dataset_info
from wavflow.errors import AudioError, ManifestError
from wavflow.evaluate.metrics import frechet_from_statistics
from wavflow.io_utils import atomic_write_text

N_MELS = 64
LOG_FLOOR = 1e-10  # power floor before log: -100 dB
MISS_MS = 1000.0  # error scored for a reference onset with no generated onset near it
# Row groups of the tables: each mode on its own rows (never pooled), and `overall` (all rows),
# which carries only the distribution figures (Fréchet, level, noise floor).
GROUPS = (*MODES, "overall")
OVERALL_LABEL = "all rows (Fréchet)"
LEVEL_FLOOR_DB = -120.0  # dBFS given to digital silence
NOISE_FLOOR_FRAME_SEC = 0.010
NOISE_FLOOR_PERCENTILE = 10.0
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".mp4", ".m4a")



# ----------------------------------------------------------------------------------------------
# Features


@lru_cache(maxsize=4)
def _mel_transform(sample_rate: int):
    import torchaudio

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
        "onset_median_ms": _num(np.median(scored)) if scored.size else None,
        "onset_p90_ms": _num(np.percentile(scored, 90)) if scored.size else None,
        "onset_detection_rate": _num(np.mean(np.nan_to_num(flat * 1000.0, nan=np.inf)
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


def _fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
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
        lm = log_mel(_fit_length(wave, num), sample_rate)
        if dynamic_range_db is not None:
            lm = np.maximum(lm - lm.max(), -float(dynamic_range_db))
        return lm.ravel()

    ref_feats = np.stack([feature(r) for r in refs])
    gen_feats = np.stack([feature(_as_wave(g, sample_rate)) for g in generated_wavs])
    sq = ((gen_feats**2).sum(1)[:, None] + (ref_feats**2).sum(1)[None, :]
          - 2.0 * gen_feats @ ref_feats.T)
    return np.sqrt(np.maximum(sq, 0.0) / ref_feats.shape[1])


# ----------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ReferenceModel:
    """What generated clips are scored against, fitted once on the real clips of a data set."""

    info: DatasetInfo
    classifier: LinearDiscriminantClassifier
    train_logmels: list[np.ndarray]
    real_logmels: dict[str, np.ndarray]  # every clip of the data set, by id
    onset_lags: dict[str, float]  # per class, the detector's lag on the real train clips (s)

    def classify(self, wave: np.ndarray) -> str:
        return self.classifier.predict(clip_embedding(log_mel(wave, self.sample_rate))[None])[0]

    def onsets(self, wave: np.ndarray, label: str) -> np.ndarray:
        """Onsets detected in `wave`, less the lag of the class's attack (class_onset_lags)."""
        return detect_onsets(wave, self.sample_rate) - self.onset_lags.get(label, 0.0)

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate


def fit_reference(info: DatasetInfo, *, progress: bool = False) -> ReferenceModel:
    """Log-mels of every real clip; the classifier and the onset lags are fitted on the train
    split."""
    real: dict[str, np.ndarray] = {}
    train = info.split("train") or info.clips
    train_ids = {c.id for c in train}
    detections = []
    for clip in tqdm(info.clips, desc="real clips", disable=not progress):
        wave = _fit_length(load_audio(info.root / clip.audio_path, info.sample_rate).numpy(),
                           _num_samples(info))
        real[clip.id] = log_mel(wave, info.sample_rate)
        if clip.id in train_ids:
            detections.append((clip.label, clip.onsets, detect_onsets(wave, info.sample_rate)))
    classifier = LinearDiscriminantClassifier().fit(
        np.stack([clip_embedding(real[c.id]) for c in train]), [c.label for c in train])
    return ReferenceModel(info, classifier, [real[c.id] for c in train], real,
                          class_onset_lags(detections))


def _num_samples(info: DatasetInfo) -> int:
    return int(round(info.duration * info.sample_rate))


def score_waves(waves: Mapping[str, np.ndarray], ref: ReferenceModel, *,
                tolerance_ms: float = 100.0) -> dict[str, Any]:
    """Score clips (id -> waveform at ref.sample_rate) per mode, the distribution figures
    (level, noise floor, Fréchet) also over all rows (`overall`), plus per-clip rows."""
    clips = ref.info.by_id()
    unknown = sorted(i for i in waves if i not in clips)
    if unknown:
        raise ManifestError(f"generated ids not in the reference data set {ref.info.events_path}: "
                            f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    per_clip: list[dict[str, Any]] = []
    logmels: dict[str, np.ndarray] = {}
    errors: dict[str, np.ndarray] = {}
    levels: dict[str, tuple[float, float]] = {}
    for clip_id in sorted(waves):
        clip = clips[clip_id]
        wave = _fit_length(np.asarray(waves[clip_id], dtype=np.float64).reshape(-1),
                           _num_samples(ref.info))
        logmels[clip_id] = log_mel(wave, ref.sample_rate)
        predicted = ref.classifier.predict(clip_embedding(logmels[clip_id])[None])[0]
        detected = ref.onsets(wave, clip.label)
        errors[clip_id] = onset_errors(clip.onsets, detected)
        level_db, noise_floor_db = clip_levels(wave, ref.sample_rate)
        per_clip.append({
            "id": clip_id, "mode": clip.mode, "label": clip.label, "predicted": predicted,
            "reference_onsets": [round(t, 4) for t in clip.onsets],
            "detected_onsets": [round(float(t), 4) for t in detected],
            "errors_ms": [None if not np.isfinite(e) else round(float(e) * 1000, 2)
                          for e in errors[clip_id]],
            "level_db": round(level_db, 2), "noise_floor_db": round(noise_floor_db, 2),
        })
        levels[clip_id] = (level_db, noise_floor_db)  # unrounded, for the group medians
    groups = {group: _group_figures(
        [r for r in per_clip if group == "overall" or r["mode"] == group], group, errors, logmels,
        levels, ref, tolerance_ms) for group in GROUPS}
    return {"groups": groups, "per_clip": per_clip}


def _group_figures(rows: Sequence[Mapping[str, Any]], group: str, errors: Mapping[str, np.ndarray],
                   logmels: Mapping[str, np.ndarray], levels: Mapping[str, tuple[float, float]],
                   ref: ReferenceModel, tolerance_ms: float) -> dict[str, Any]:
    """The figures of one group of rows; a mode with no rows keeps every key, valued None, so
    metrics.json has one schema."""
    ids = [r["id"] for r in rows]
    figures: dict[str, Any] = {"n": len(rows)}
    if group != "overall":  # per-row figures only per mode: pooling hides a mode that fails
        figures.update({
            "chance_accuracy": 1.0 / len(ref.info.classes),
            "class_accuracy": _num(np.mean([r["predicted"] == r["label"] for r in rows]))
            if rows else None,
            **summarise_onsets([errors[i] for i in ids], tolerance_ms)})
    figures.update({
        "level_db": _num(np.median([levels[i][0] for i in ids])) if ids else None,
        "noise_floor_db": _num(np.median([levels[i][1] for i in ids])) if ids else None,
        "frechet": _num(frechet_between([logmels[i] for i in ids], ref.train_logmels))
        if ids else None})
    return figures


def _add_relative(groups: dict[str, dict[str, Any]], real: Mapping[str, Mapping[str, Any]],
                  frechet_rvr: float | None) -> None:
    """Add to each group its level / noise-floor differences to the real clips of the same
    ids (dB, this minus real) and its Fréchet distance in units of real-vs-real."""
    for name, g in groups.items():
        r = real.get(name, {})
        for key in ("level_db", "noise_floor_db"):
            mine, theirs = g.get(key), r.get(key)
            g[key.replace("_db", "_diff_db")] = (None if mine is None or theirs is None
                                                 else _num(mine - theirs))
        g["frechet_ratio"] = (None if g.get("frechet") is None or not frechet_rvr
                              else _num(g["frechet"] / frechet_rvr))


def evaluate_waves(waves: Mapping[str, np.ndarray], ref: ReferenceModel, *,
                   tolerance_ms: float = 100.0, seed: int = 0) -> dict[str, Any]:
    """Scores of `waves` beside the baselines: real held-out audio of the same ids, white
    noise, and the Fréchet distances real-vs-real (train halves) and noise-vs-real. Every
    group gains level / noise-floor differences to the real clips and `frechet_ratio`."""
    info = ref.info
    ids = sorted(waves)
    by_id = info.by_id()
    generated = score_waves(waves, ref, tolerance_ms=tolerance_ms)
    real_waves = {i: load_audio(info.root / by_id[i].audio_path, info.sample_rate).numpy()
                  for i in ids}
    real = score_waves(real_waves, ref, tolerance_ms=tolerance_ms)
    noise = score_waves(dict(zip(ids, noise_baseline(len(ids), info.duration, info.sample_rate,
                                                     seed=seed))), ref, tolerance_ms=tolerance_ms)
    half_a, half_b = ref.train_logmels[0::2], ref.train_logmels[1::2]
    rvr = _num(frechet_between(half_a, half_b)) if half_a and half_b else None
    noise_half = [log_mel(w, info.sample_rate)
                  for w in noise_baseline(max(1, len(half_b)), info.duration, info.sample_rate,
                                          seed=seed + 1)]
    # real_same_ids gets them too: its frechet_ratio is what real audio scores at the group's n
    for groups in (generated["groups"], real["groups"], noise["groups"]):
        _add_relative(groups, real["groups"], rvr)
    return {
        "num_classes": len(info.classes),
        "classes": list(info.classes),
        "chance_accuracy": 1.0 / len(info.classes),
        "tolerance_ms": tolerance_ms,
        "groups": generated["groups"],
        "baselines": {
            "real_same_ids": real["groups"],
            "white_noise": noise["groups"],
            "frechet_real_vs_real": rvr,  # the unit of frechet_ratio
            "frechet_real_vs_real_clips": [len(half_a), len(half_b)],
            "frechet_noise_vs_real": _num(frechet_between(noise_half, half_a or ref.train_logmels)),
        },
        "per_clip": generated["per_clip"],
    }


def _collect_generated(generated_dir: Path) -> dict[str, Path]:
    if not generated_dir.is_dir():
        raise AudioError(f"generated audio folder not found: {generated_dir}")
    found: dict[str, Path] = {}
    # one file per id; plain audio (.wav first) wins over a muxed .mp4 of the same clip
    rank = {suffix: i for i, suffix in enumerate(AUDIO_SUFFIXES)}
    candidates = [p for p in generated_dir.iterdir()
                  if p.suffix.lower() in rank and p.is_file()]
    for path in sorted(candidates, key=lambda p: (p.stem, rank[p.suffix.lower()])):
        found.setdefault(path.stem, path)
    return found


def evaluate(generated_dir: str | Path, reference: str | Path, out_dir: str | Path | None = None,
             *, tolerance_ms: float = 100.0, seed: int = 0,
             progress: bool = True) -> tuple[dict[str, Any], str]:
    """Score `<id>.wav` files of `generated_dir` against the data set at `reference`.

    Files whose stem is not a clip id of the data set are listed under `ignored_files`;
    holdout ids without a file under `missing_ids`. Writes metrics.json and metrics.txt to
    `out_dir` when given; returns (metrics dict, readable table).
    """
    generated_dir = Path(generated_dir)
    info = load_dataset_info(reference)
    files = _collect_generated(generated_dir)
    clip_ids = set(info.by_id())
    matched = {i: p for i, p in files.items() if i in clip_ids}
    if not matched:
        raise ManifestError(
            f"no generated audio in {generated_dir} is named after a clip id of "
            f"{info.events_path} (expected files like {info.clips[0].id}.wav)")
    ref = fit_reference(info, progress=progress)
    waves = {i: load_audio(p, info.sample_rate).numpy()
             for i, p in tqdm(matched.items(), desc="generated clips", disable=not progress)}
    metrics = evaluate_waves(waves, ref, tolerance_ms=tolerance_ms, seed=seed)
    metrics["generated_dir"] = str(generated_dir)
    metrics["reference"] = str(info.events_path)
    metrics["ignored_files"] = sorted(str(p.name) for i, p in files.items() if i not in clip_ids)
    metrics["missing_ids"] = sorted(c.id for c in info.split("holdout") if c.id not in matched)
    table = format_table(metrics)
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
        atomic_write_text(out / "metrics.txt", table)
    return metrics, table


# ----------------------------------------------------------------------------------------------
# Report


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _cell(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


_COLUMNS = (("n", 4), ("class_acc", 10), ("chance", 7), ("onset_med_ms", 13), ("onset_p90_ms", 13),
            ("detected", 9), ("level_dB", 9), ("Δlevel", 7), ("floor_dB", 9), ("Δfloor", 7),
            ("frechet", 9), ("×rvr", 7))
_LABEL_WIDTH = 31


def _table_line(name: str, g: Mapping[str, Any], *, relative: bool = True) -> str:
    """One row; cells a group does not have (per-row figures of `overall`) print '-'.
    `relative=False` blanks the differences to real audio (the real rows are that reference)."""
    if not g.get("n"):
        return f"{name:<{_LABEL_WIDTH}}{0:>4}"
    keys = (("class_accuracy", ".3f"), ("chance_accuracy", ".3f"), ("onset_median_ms", ".1f"),
            ("onset_p90_ms", ".1f"), ("onset_detection_rate", ".2f"), ("level_db", ".1f"),
            ("level_diff_db", "+.1f"), ("noise_floor_db", ".1f"), ("noise_floor_diff_db", "+.1f"),
            ("frechet", ".1f"), ("frechet_ratio", ".2f"))
    cells = [_cell(None if not relative and k.endswith("_diff_db") else g.get(k), fmt)
             for k, fmt in keys]
    return f"{name:<{_LABEL_WIDTH}}{g['n']:>4}" + "".join(
        f"{c:>{w}}" for c, (_, w) in zip(cells, _COLUMNS[1:]))


def format_table(metrics: Mapping[str, Any]) -> str:
    """A fixed-width text table: per mode the generated rows above the real audio of the same
    ids; then the all-rows distribution figures and the white-noise baseline."""
    head = f"{'rows':<{_LABEL_WIDTH}}" + "".join(f"{name:>{w}}" for name, w in _COLUMNS)
    base = metrics["baselines"]
    real, noise = base["real_same_ids"], base["white_noise"]
    halves = base.get("frechet_real_vs_real_clips") or ["?", "?"]
    out = [
        "WavFlow demo metrics (per mode, never pooled)",
        f"  generated: {metrics.get('generated_dir', '(in memory)')}",
        f"  reference: {metrics.get('reference', '(in memory)')}",
        f"  {metrics['num_classes']} classes, chance accuracy {metrics['chance_accuracy']:.3f}; "
        f"onsets detected within {metrics['tolerance_ms']:.0f} ms; Fréchet vs real train clips",
        "",
        head,
        "-" * len(head),
    ]
    for mode in MODES:
        out += [_table_line(f"{mode} generated", metrics["groups"][mode]),
                _table_line(f"{mode} real audio", real[mode], relative=False)]
    out += ["-" * len(head),
            _table_line(f"{OVERALL_LABEL} generated", metrics["groups"]["overall"]),
            _table_line(f"{OVERALL_LABEL} real audio", real["overall"], relative=False),
            _table_line("white noise (all rows)", noise["overall"]),
            "-" * len(head),
            f"class_acc per mode beside chance; onsets: VT2A and V2A follow the video, T2A has "
            f"none to follow; a missed onset counts {MISS_MS:.0f} ms",
            "level_dB / floor_dB: medians of clip RMS / 10th percentile of 10 ms frame RMS (dBFS); "
            "Δ = generated minus the real clips of the same ids",
            f"×rvr = frechet / real vs real (train halves, {halves[0]}+{halves[1]} clips): "
            f"{_cell(base['frechet_real_vs_real'], '.1f')}; the real-audio rows give Fréchet at "
            f"the same n; white noise vs real: {_cell(base['frechet_noise_vs_real'], '.1f')}"]
    if metrics.get("missing_ids"):
        out.append(f"holdout clips without generated audio: {len(metrics['missing_ids'])}")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Score generated audio against the demo data set.")
    parser.add_argument("--generated", required=True, help="folder of <id>.wav generated clips")
    parser.add_argument("--reference", required=True,
                        help="the data set folder (or its events.json)")
    parser.add_argument("--out", required=True, help="folder for metrics.json and metrics.txt")
    parser.add_argument("--tolerance-ms", type=float, default=100.0,
                        help="an onset counts as detected within this error")
    parser.add_argument("--seed", type=int, default=0, help="seed of the white-noise baseline")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # log-mels of short clips: extra threads only add overhead
    _, table = evaluate(args.generated, args.reference, args.out,
                        tolerance_ms=args.tolerance_ms, seed=args.seed)
    print(table, end="")


if __name__ == "__main__":
    main()
