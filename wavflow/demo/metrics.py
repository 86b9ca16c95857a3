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

This module scores and reports: the reference fitted on a data set's real clips, the
per-clip rows, the per-group figures beside their baselines, the table and the command line.
The measurements it combines (log-mel and classifier, onset detector, level and noise floor,
Fréchet, and `nearest_reference`, the log-mel distance matrix for memorisation checks) live in
wavflow.demo.audio_measures; their names stay importable from here.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from wavflow.audio import load_audio
from wavflow.demo.audio_measures import (
    LEVEL_FLOOR_DB,
    LOG_FLOOR,
    MISS_MS,
    N_MELS,
    NOISE_FLOOR_FRAME_SEC,
    NOISE_FLOOR_PERCENTILE,
    ONSET_LAG_MATCH_SEC,
    LinearDiscriminantClassifier,
    amplitude_db,
    class_onset_lags,
    clip_embedding,
    clip_levels,
    detect_onsets,
    energy_envelope,
    finite_or_none,
    fit_length,
    frame_statistics,
    frechet_between,
    log_mel,
    nearest_reference,
    noise_baseline,
    onset_errors,
    summarise_onsets,
)
from wavflow.demo.long_clip import score_long_clip
from wavflow.demo.make_dataset import MODES, DatasetInfo, load_dataset_info
from wavflow.errors import AudioError, ManifestError
from wavflow.io_utils import atomic_write_text

# The measurements keep their old import path (wavflow.demo.metrics.<name>) beside the scoring.
__all__ = [
    "AUDIO_SUFFIXES", "GROUPS", "LEVEL_FLOOR_DB", "LOG_FLOOR", "MISS_MS", "N_MELS",
    "NOISE_FLOOR_FRAME_SEC", "NOISE_FLOOR_PERCENTILE", "ONSET_LAG_MATCH_SEC", "OVERALL_LABEL",
    "LinearDiscriminantClassifier", "ReferenceModel", "amplitude_db", "class_onset_lags",
    "clip_embedding", "clip_levels", "detect_onsets", "energy_envelope", "evaluate",
    "evaluate_waves", "fit_reference", "format_table", "frame_statistics", "frechet_between",
    "log_mel", "main", "nearest_reference", "noise_baseline", "onset_errors", "score_waves",
    "summarise_onsets",
]

# Row groups of the tables: each mode on its own rows (never pooled), and `overall` (all rows),
# which carries only the distribution figures (Fréchet, level, noise floor).
GROUPS = (*MODES, "overall")
OVERALL_LABEL = "all rows (Fréchet)"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".mp4", ".m4a")


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
        wave = fit_length(load_audio(info.root / clip.audio_path, info.sample_rate).numpy(),
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
        wave = fit_length(np.asarray(waves[clip_id], dtype=np.float64).reshape(-1),
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
            "class_accuracy": finite_or_none(np.mean([r["predicted"] == r["label"] for r in rows]))
            if rows else None,
            **summarise_onsets([errors[i] for i in ids], tolerance_ms)})
    figures.update({
        "level_db": finite_or_none(np.median([levels[i][0] for i in ids])) if ids else None,
        "noise_floor_db": finite_or_none(np.median([levels[i][1] for i in ids])) if ids else None,
        "frechet": finite_or_none(frechet_between([logmels[i] for i in ids], ref.train_logmels))
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
                                                 else finite_or_none(mine - theirs))
        g["frechet_ratio"] = (None if g.get("frechet") is None or not frechet_rvr
                              else finite_or_none(g["frechet"] / frechet_rvr))


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
    rvr = finite_or_none(frechet_between(half_a, half_b)) if half_a and half_b else None
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
            "frechet_noise_vs_real": finite_or_none(
                frechet_between(noise_half, half_a or ref.train_logmels)),
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
             *, tolerance_ms: float = 100.0, seed: int = 0, progress: bool = True,
             long_wav: str | Path | None = None, window_sec: float | None = None,
             overlap_sec: float | None = None, match_level: bool = False) -> tuple[dict[str, Any], str]:
    """Score `<id>.wav` files of `generated_dir` against the data set at `reference`.

    Files whose stem is not a clip id of the data set are listed under `ignored_files`;
    holdout ids without a file under `missing_ids`. `long_wav`: the long video's generated
    audio (wavflow.demo.long_clip), made in windows of `window_sec` overlapping by
    `overlap_sec` (None: the default half window), scored under `long_form`. Writes metrics.json
    and metrics.txt to `out_dir` when given; returns (metrics dict, readable table).
    `match_level` (a diagnostic) first scales every generated clip to the RMS of its real clip:
    the figures a model would get if it knew each clip's level, which amplitude lifting removes
    from its training targets (docs/benchmarks.md, "The demo").
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
    if match_level:
        by_id = info.by_id()
        waves = {i: _scaled_to_rms_of(w, info.root / by_id[i].audio_path, info.sample_rate)
                 for i, w in waves.items()}
    metrics = evaluate_waves(waves, ref, tolerance_ms=tolerance_ms, seed=seed)
    metrics["match_level"] = bool(match_level)
    metrics["generated_dir"] = str(generated_dir)
    metrics["reference"] = str(info.events_path)
    metrics["ignored_files"] = sorted(str(p.name) for i, p in files.items() if i not in clip_ids)
    metrics["missing_ids"] = sorted(c.id for c in info.split("holdout") if c.id not in matched)
    if long_wav is not None:
        if not Path(long_wav).is_file():
            raise AudioError(f"the long video's generated audio {long_wav} is missing (its predict stage wrote none)")
        metrics["long_form"] = score_long_clip(Path(long_wav), info, ref, window_sec=float(window_sec or info.duration),
                                               overlap_sec=overlap_sec, tolerance_ms=tolerance_ms)
    table = format_table(metrics)
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
        atomic_write_text(out / "metrics.txt", table)
    return metrics, table


def _scaled_to_rms_of(wave: np.ndarray, real_path: Path, sample_rate: int) -> np.ndarray:
    """`wave` scaled to the RMS of the audio file at `real_path` (a silent wave is left as it is)."""
    real = load_audio(real_path, sample_rate).numpy()
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    return wave * (float(np.sqrt(np.mean(np.square(real, dtype=np.float64)))) / rms) if rms > 0 else wave


# ----------------------------------------------------------------------------------------------
# Report



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
        *(["  --match-level: each generated clip scaled to its real clip's RMS (a diagnostic)"]
          if metrics.get("match_level") else []),
        f"  {metrics['num_classes']} classes, chance accuracy {metrics['chance_accuracy']:.3f}; "
        f"onsets detected within {metrics['tolerance_ms']:.0f} ms; Fréchet vs real train clips",
        "",
        head,
        "-" * len(head),
    ]
    for mode in MODES:
        out += [_table_line(f"{mode} generated", metrics["groups"][mode]),
                _table_line(f"{mode} real audio", real[mode], relative=False)]
    long_form = metrics.get("long_form")
    if long_form:
        label = f"V2A long {long_form['seconds']:g} s/{long_form['windows']}w"
        out += [_table_line(label, long_form), _table_line("V2A long real audio", {**long_form["real_audio"],
                                                           "n": long_form["n"]}, relative=False)]
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
    if long_form:
        seams = long_form["seams"]
        out.append(
            f"V2A long: the held-out V2A clips joined, made in {long_form['windows']} windows; class per clip-long "
            f"segment; seams at {seams['junctions']} junctions, generated minus elsewhere (real spread): level jump "
            f"{seams['level_jump_db_excess']:+.2f} dB ({seams['real_level_jump_db']['elsewhere_iqr']:.2f}), "
            f"spectral flux {seams['spectral_flux_db_excess']:+.2f} dB ({seams['real_spectral_flux_db']['elsewhere_iqr']:.2f}); "
            f"largest step at a junction {seams['click_step_at_junctions']:.3f} vs p99 elsewhere "
            f"{seams['click_step_p99_elsewhere']:.3f}")
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
    parser.add_argument("--match-level", action="store_true",
                        help="diagnostic: scale each generated clip to its real clip's RMS before scoring")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # log-mels of short clips: extra threads only add overhead
    _, table = evaluate(args.generated, args.reference, args.out,
                        tolerance_ms=args.tolerance_ms, seed=args.seed, match_level=args.match_level)
    print(table, end="")


if __name__ == "__main__":
    main()
