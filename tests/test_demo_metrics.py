"""Demo metrics: each piece against an independent formula, then real vs noise vs shifted clips."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from wavflow.demo.make_dataset import make_dataset
from wavflow.demo.make_dataset import MODES
from wavflow.demo.metrics import (
    N_MELS,
    LinearDiscriminantClassifier,
    clip_levels,
    detect_onsets,
    evaluate,
    evaluate_waves,
    fit_reference,
    frechet_between,
    log_mel,
    main,
    nearest_reference,
    noise_baseline,
    onset_errors,
    summarise_onsets,
)
from wavflow.errors import ManifestError
from wavflow.evaluate.metrics import frechet_distance, frechet_from_statistics

SR = 16000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 24 clips, a quarter held out: 18 train clips (3 per class) fit the classifier, 6 are scored
    root = tmp_path_factory.mktemp("demo_metrics_ds")
    return make_dataset(root, 24, 5, duration=2.0, holdout_frac=0.25, progress=False)


@pytest.fixture(scope="module")
def reference(dataset):
    return fit_reference(dataset)


def _real_waves(dataset, clips):
    return {c.id: sf.read(dataset.root / c.audio_path, dtype="float32")[0] for c in clips}


# ------------------------------------------------------------------------------ pieces


def test_log_mel_peaks_at_the_tone_and_floors_silence():
    t = np.arange(SR) / SR
    lm = log_mel(0.5 * np.sin(2 * np.pi * 1000 * t), SR)
    assert lm.shape == (N_MELS, 101)  # 10 ms hop, centred frames
    fb = torchaudio.functional.melscale_fbanks(257, 20.0, SR / 2, N_MELS, SR)  # n_fft 512
    expected_band = int(fb[int(round(1000 / (SR / 512)))].argmax())
    assert int(np.median(lm.argmax(axis=0))) == expected_band
    assert np.allclose(log_mel(np.zeros(SR), SR), -100.0)


def test_detect_onsets_finds_steps_and_ignores_steady_noise():
    rng = np.random.default_rng(0)
    wave = 0.01 * rng.standard_normal(2 * SR)
    for start in (0.30, 1.10):  # tone bursts with a sudden start
        a, b = int(start * SR), int((start + 0.25) * SR)
        wave[a:b] += 0.4 * np.sin(2 * np.pi * 440 * np.arange(b - a) / SR)
    onsets = detect_onsets(wave, SR)
    assert onsets == pytest.approx([0.30, 1.10], abs=0.005)
    assert detect_onsets(0.1 * rng.standard_normal(2 * SR), SR).size == 0


def test_onset_errors_and_summary_numbers():
    assert onset_errors([0.5, 1.0], [0.52, 0.9, 1.3]) == pytest.approx([0.02, 0.1])
    assert np.isnan(onset_errors([0.5], [])).all()
    summary = summarise_onsets([np.array([0.010, 0.030]), np.array([np.nan]),
                                np.array([0.200, 0.020])], tolerance_ms=100)
    # every reference onset counts, the missed one as 1000 ms: 10, 20, 30, 200, 1000 ms
    assert summary["onset_median_ms"] == pytest.approx(30.0)
    assert summary["onset_p90_ms"] == pytest.approx(200 + 0.6 * 800)
    # a detection farther than 1000 ms scores as a miss, not worse
    far = summarise_onsets([np.array([3.0])], tolerance_ms=100)
    assert far["onset_median_ms"] == pytest.approx(1000.0)
    silent = summarise_onsets([np.array([np.nan, np.nan])], tolerance_ms=100)
    assert silent["onset_median_ms"] == pytest.approx(1000.0) and silent["onset_detection_rate"] == 0
    assert summary["onset_detection_rate"] == pytest.approx(3 / 5)
    assert summary["num_reference_onsets"] == 5


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    v1, v2 = rng.uniform(0.5, 2, size=4), rng.uniform(0.5, 2, size=4)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_from_statistics(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-6)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + np.eye(6)
    assert frechet_from_statistics(mu1[:1].repeat(6), cov, mu1[:1].repeat(6), cov) == pytest.approx(0, abs=1e-6)


def test_one_frechet_formula_serves_the_demo_and_the_evaluation():
    """The demo's log-mel Fréchet is the evaluation's FD on the pooled frames, and a covariance
    whose square root is truly complex is an error in both, never silently made real."""
    rng = np.random.default_rng(5)
    a = [rng.normal(size=(4, 30)) for _ in range(3)]
    b = [rng.normal(loc=0.5, scale=1.5, size=(4, 25)) for _ in range(2)]
    pooled_a, pooled_b = np.concatenate([m.T for m in a]), np.concatenate([m.T for m in b])
    assert frechet_between(a, b) == pytest.approx(frechet_distance(pooled_a, pooled_b), rel=1e-12)
    not_a_covariance = np.diag([1.0, -4.0])  # sqrt(S1 S2) = diag(1, 2i): imaginary, not noise
    with pytest.raises(ValueError, match="imaginary part"):
        frechet_from_statistics(np.zeros(2), np.eye(2), np.zeros(2), not_a_covariance)


def test_linear_discriminant_classifier_on_toy_clusters():
    rng = np.random.default_rng(2)
    centres = {"a": np.zeros(3), "b": np.full(3, 10.0), "c": np.array([10.0, -10.0, 0.0])}
    x = np.concatenate([c + rng.normal(size=(5, 3)) for c in centres.values()])
    y = [k for k in centres for _ in range(5)]
    clf = LinearDiscriminantClassifier().fit(x, y)
    assert clf.predict(np.stack([centres["c"], centres["a"], centres["b"] + 0.5])) == ["c", "a", "b"]


def _pitch_and_timbre(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """Two classes told apart only by a low-variance 'timbre' feature (means 0 and 1, std 0.1),
    beside a high-variance 'pitch' feature (std 10) whose class means differ a little (-3, +3),
    as the pitch ranges of two instruments overlap."""
    a = np.stack([rng.normal(-3.0, 10.0, n), rng.normal(0.0, 0.1, n)], axis=1)
    b = np.stack([rng.normal(3.0, 10.0, n), rng.normal(1.0, 0.1, n)], axis=1)
    return np.concatenate([a, b]), ["a"] * n + ["b"] * n


def test_linear_discriminant_discounts_a_high_variance_nuisance_axis():
    """A nearest centroid in standardised space weighs the pitch axis like the timbre axis and
    is led astray by a note far from its class's mean pitch; the pooled within-class covariance
    tells the LDA that pitch varies within a class and the timbre does not."""
    rng = np.random.default_rng(7)
    x, y = _pitch_and_timbre(rng, 40)
    test_x, test_y = _pitch_and_timbre(rng, 300)
    truth = np.asarray(test_y)
    lda = np.mean(np.asarray(LinearDiscriminantClassifier().fit(x, y).predict(test_x)) == truth)
    assert lda >= 0.98
    # shrinkage 1 replaces the covariance by a multiple of the identity: a nearest centroid
    centroid = np.mean(np.asarray(
        LinearDiscriminantClassifier(shrinkage=1.0).fit(x, y).predict(test_x)) == truth)
    assert centroid <= 0.9, centroid


def test_noise_baseline_and_nearest_reference(dataset):
    noise = noise_baseline(3, 1.0, SR, seed=4, rms=0.1)
    assert len(noise) == 3 and all(n.shape == (SR,) and n.dtype == np.float32 for n in noise)
    assert np.sqrt(np.mean(noise[0] ** 2)) == pytest.approx(0.1, rel=0.05)
    assert np.array_equal(noise[1], noise_baseline(3, 1.0, SR, seed=4)[1])

    clips = dataset.clips[:4]
    refs = [dataset.root / c.audio_path for c in clips]
    waves = [sf.read(p, dtype="float32")[0] for p in refs]
    rng = np.random.default_rng(3)
    gens = [waves[2] + 0.001 * rng.standard_normal(waves[2].size).astype(np.float32),
            torch.from_numpy(waves[0]), waves[3][: SR]]  # a tensor, and a short clip (zero-padded)
    d = nearest_reference(gens, refs, sample_rate=SR)
    assert d.shape == (3, 4)
    assert list(d.argmin(axis=1)[:2]) == [2, 0]
    assert d[1, 0] == pytest.approx(0.0, abs=1e-6)
    # independent formula: RMS difference of the log-mel images
    padded = np.pad(waves[3][:SR], (0, waves[1].size - SR))
    expected = np.sqrt(np.mean((log_mel(padded, SR) - log_mel(waves[1], SR)) ** 2))
    assert d[2, 1] == pytest.approx(expected, rel=1e-5)


def test_event_distance_ignores_gain_and_background_texture(dataset):
    clip = dataset.clips[0]
    wave = sf.read(dataset.root / clip.audio_path, dtype="float32")[0]
    rng = np.random.default_rng(0)
    # the same events, 6 dB louder, over a fresh -40 dB background
    regen = 2.0 * (wave + 0.01 * rng.standard_normal(wave.size).astype(np.float32))
    noise = noise_baseline(1, dataset.duration, SR, seed=1)
    raw = nearest_reference([regen, noise[0]], [wave], sample_rate=SR)[:, 0]
    event = nearest_reference([regen, noise[0]], [wave], sample_rate=SR, dynamic_range_db=30.0)[:, 0]
    assert event[0] < 0.25 * event[1]  # same sound: far below noise
    assert raw[0] > 0.4 * raw[1]       # the raw distance cannot tell them apart as well
    lm = log_mel(wave, SR)
    rel = np.maximum(lm - lm.max(), -30.0)
    lm2 = log_mel(regen, SR)
    rel2 = np.maximum(lm2 - lm2.max(), -30.0)
    assert event[0] == pytest.approx(np.sqrt(np.mean((rel - rel2) ** 2)), rel=1e-5)


def test_clip_level_is_the_rms_in_dbfs():
    t = np.arange(SR) / SR
    for amp in (0.5, 0.1):  # 1000 whole periods of 1 kHz: mean sin^2 is exactly 1/2
        level, floor = clip_levels(amp * np.sin(2 * np.pi * 1000 * t), SR)
        assert level == pytest.approx(20 * np.log10(amp / np.sqrt(2)), abs=1e-6)
        assert floor == pytest.approx(level, abs=1e-6)  # every 10 ms frame holds 10 whole periods
    assert clip_levels(np.zeros(SR), SR) == (-120.0, -120.0)  # digital silence: the floor
    short = np.full(50, 0.25)  # shorter than one 10 ms frame: the clip is its own frame
    assert clip_levels(short, SR) == pytest.approx((20 * np.log10(0.25),) * 2)
    # 100 frames of 10 ms (160 samples), each of its own constant |amplitude| (signs alternate):
    # the floor is the 10th percentile of the frame amplitudes, a trailing partial frame ignored
    amps = 10 ** (-np.random.default_rng(7).permutation(100) / 20)  # 0 to -99 dB, shuffled
    signs = np.where(np.arange(160) % 2, 1.0, -1.0)
    wave = np.concatenate([*(a * signs for a in amps), np.full(80, 0.9)])
    assert clip_levels(wave, SR)[1] == pytest.approx(20 * np.log10(np.percentile(amps, 10)), abs=1e-9)


def test_noise_floor_is_the_quiet_background_between_events():
    rng = np.random.default_rng(5)
    wave = 0.01 * rng.standard_normal(2 * SR)  # -40 dBFS background
    for start in (0.1, 0.7, 1.3):  # loud tones over 60 % of the clip: a median would hit them
        a, b = int(start * SR), int((start + 0.4) * SR)
        wave[a:b] += 0.5 * np.sin(2 * np.pi * 440 * np.arange(b - a) / SR)
    level, floor = clip_levels(wave, SR)
    assert level == pytest.approx(10 * np.log10(np.mean(wave**2)), abs=1e-9)
    # 10th percentile of 10 ms frame RMS of the background: a little under its -40 dB RMS
    assert -41.0 < floor < -40.0


# ------------------------------------------------------------------------------ separation


def test_real_clips_score_high_and_noise_scores_at_chance(dataset, reference):
    holdout = dataset.split("holdout")
    m = evaluate_waves(_real_waves(dataset, holdout), reference)
    groups = m["groups"]
    assert groups["overall"]["n"] == len(holdout) == 6
    assert all(groups[mode]["n"] >= 1 for mode in MODES)  # every mode has held-out rows
    assert sum(groups[mode]["n"] for mode in MODES) == 6
    for mode in MODES:  # each mode on its own rows
        g = groups[mode]
        assert g["chance_accuracy"] == pytest.approx(1 / 6)
        assert g["class_accuracy"] >= 0.9
        assert g["onset_median_ms"] < 20 and g["onset_p90_ms"] < 20
        assert g["onset_detection_rate"] == 1.0
    assert m["chance_accuracy"] == pytest.approx(1 / 6)

    noise = m["baselines"]["white_noise"]
    for mode in MODES:
        assert noise[mode]["class_accuracy"] <= 0.5 or noise[mode]["n"] == 1  # a constant guess
        assert noise[mode]["onset_detection_rate"] == 0.0 and noise[mode]["onset_median_ms"] == 1000.0
    assert m["baselines"]["real_same_ids"]["VT2A"]["class_accuracy"] == groups["VT2A"]["class_accuracy"]
    rvr, nvr = m["baselines"]["frechet_real_vs_real"], m["baselines"]["frechet_noise_vs_real"]
    assert rvr * 10 < nvr
    assert groups["overall"]["frechet"] * 10 < noise["overall"]["frechet"]
    # the real clips are their own reference: no level difference, same Fréchet ratio
    for name in (*MODES, "overall"):
        assert groups[name]["level_diff_db"] == 0.0 and groups[name]["noise_floor_diff_db"] == 0.0
        assert groups[name]["frechet_ratio"] == pytest.approx(groups[name]["frechet"] / rvr)
        assert groups[name]["frechet_ratio"] == m["baselines"]["real_same_ids"][name]["frechet_ratio"]
    # white noise of RMS 0.1 is a -20 dBFS clip, 10 to 30 dB above the data's background
    assert noise["overall"]["level_db"] == pytest.approx(-20.0, abs=0.1)
    assert noise["overall"]["noise_floor_diff_db"] > 10
    assert noise["overall"]["frechet_ratio"] > 10


def test_shifted_clips_have_large_onset_errors(dataset, reference):
    shift = int(0.2 * SR)
    shifted = {i: np.roll(w, shift) for i, w in _real_waves(dataset, dataset.split("holdout")).items()}
    groups = evaluate_waves(shifted, reference)["groups"]
    for mode in ("VT2A", "V2A"):  # the rows whose onsets follow the video
        assert groups[mode]["onset_median_ms"] > 150
        assert groups[mode]["class_accuracy"] >= 0.9  # same sounds, wrong times


def test_class_and_onsets_ignore_gain(dataset, reference):
    # generated audio is loudness-normalised by predict: a gain change must not move the scores
    quiet = {i: 0.2 * w for i, w in _real_waves(dataset, dataset.split("holdout")).items()}
    groups = evaluate_waves(quiet, reference)["groups"]
    for mode in MODES:
        assert groups[mode]["class_accuracy"] >= 0.9
        assert groups[mode]["onset_median_ms"] < 20 and groups[mode]["onset_detection_rate"] == 1.0


def test_level_and_noise_floor_differences_to_real_audio(dataset, reference):
    # the same clips at half amplitude: every level and noise floor 20 log10(0.5) = -6.02 dB lower
    real = _real_waves(dataset, dataset.split("holdout"))
    m = evaluate_waves({i: 0.5 * w for i, w in real.items()}, reference)
    same = m["baselines"]["real_same_ids"]
    for name in (*MODES, "overall"):
        g = m["groups"][name]
        assert g["level_diff_db"] == pytest.approx(20 * np.log10(0.5), abs=1e-6)
        assert g["noise_floor_diff_db"] == pytest.approx(20 * np.log10(0.5), abs=1e-6)
        assert g["level_db"] == pytest.approx(same[name]["level_db"] - 6.0206, abs=1e-3)
    for row in m["per_clip"]:  # per clip: the formula on the clip itself
        wave = real[row["id"]].astype(np.float64)
        assert row["level_db"] == pytest.approx(10 * np.log10(np.mean((0.5 * wave) ** 2)), abs=0.006)
    # the real baseline is the unscaled clips: its medians follow from the per-clip formula
    vt2a = [10 * np.log10(np.mean(real[r["id"]].astype(np.float64) ** 2))
            for r in m["per_clip"] if r["mode"] == "VT2A"]
    assert same["VT2A"]["level_db"] == pytest.approx(np.median(vt2a), abs=1e-6)


def test_evaluate_files_writes_json_and_table(dataset, tmp_path, capsys):
    gen = tmp_path / "generated"
    gen.mkdir()
    holdout = dataset.split("holdout")
    for clip in holdout[:-1]:  # one holdout clip left out -> reported missing
        shutil.copy(dataset.root / clip.audio_path, gen / f"{clip.id}.wav")
    (gen / "notes.txt").write_text("not audio")
    # a muxed mp4 beside the wav of the same id must not replace it (it is not even decodable)
    (gen / f"{holdout[0].id}.mp4").write_bytes(b"not a video")
    sf.write(gen / "stray.wav", np.zeros(SR, dtype=np.float32), SR)

    metrics, table = evaluate(gen, dataset.root, tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["groups"] == metrics["groups"]
    assert (tmp_path / "out" / "metrics.txt").read_text() == table
    assert metrics["missing_ids"] == [holdout[-1].id]
    assert metrics["ignored_files"] == ["stray.wav"]
    assert metrics["groups"]["overall"]["n"] == len(holdout) - 1
    assert {r["id"] for r in metrics["per_clip"]} == {c.id for c in holdout[:-1]}
    # per mode, never pooled: no text-/video-conditioned groups, no headline
    assert set(saved["groups"]) == {"VT2A", "T2A", "V2A", "overall"}
    for baseline in ("real_same_ids", "white_noise"):
        assert set(saved["baselines"][baseline]) == {"VT2A", "T2A", "V2A", "overall"}
    mode_keys = {"n", "chance_accuracy", "class_accuracy", "onset_median_ms", "onset_p90_ms",
                 "onset_detection_rate", "num_reference_onsets", "level_db", "noise_floor_db",
                 "level_diff_db", "noise_floor_diff_db", "frechet", "frechet_ratio"}
    for mode in MODES:
        assert set(saved["groups"][mode]) == mode_keys, mode
        assert set(saved["baselines"]["real_same_ids"][mode]) == mode_keys, mode
    # all rows only for the distribution figures
    assert set(saved["groups"]["overall"]) == {"n", "level_db", "noise_floor_db", "level_diff_db",
                                               "noise_floor_diff_db", "frechet", "frechet_ratio"}
    assert "conditioned" not in json.dumps(saved) and "headline" not in table
    assert saved["baselines"]["frechet_real_vs_real_clips"] == [9, 9]
    for word in ("VT2A generated", "VT2A real audio", "T2A generated", "V2A real audio",
                 "all rows (Fréchet) generated", "white noise", "chance accuracy 0.167",
                 "real vs real (train halves, 9+9 clips)", "level_dB", "floor_dB", "×rvr"):
        assert word in table
    vt2a_line = next(line for line in table.splitlines() if line.startswith("VT2A generated"))
    assert "0.167" in vt2a_line.split()  # chance beside the mode's class accuracy

    main(["--generated", str(gen), "--reference", str(dataset.events_path), "--out",
          str(tmp_path / "cli")])
    assert "all rows (Fréchet) generated" in capsys.readouterr().out
    assert (tmp_path / "cli" / "metrics.json").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match="clip id"):
        evaluate(empty, dataset.root, progress=False)


def test_match_level_scales_each_clip_to_its_real_clips_rms(dataset, tmp_path):
    """--match-level (a diagnostic): clips 20 dB too quiet score the real level."""
    gen = tmp_path / "generated"
    gen.mkdir()
    holdout = dataset.split("holdout")
    for clip in holdout:
        wave, sr = sf.read(dataset.root / clip.audio_path, dtype="float32")
        sf.write(gen / f"{clip.id}.wav", 0.1 * wave, sr, subtype="FLOAT")
    plain, _ = evaluate(gen, dataset.root, progress=False)
    matched, table = evaluate(gen, dataset.root, progress=False, match_level=True)
    assert not plain["match_level"] and matched["match_level"] and "--match-level" in table
    for mode in MODES:
        assert matched["groups"][mode]["level_diff_db"] == pytest.approx(0.0, abs=1e-3), mode
        assert plain["groups"][mode]["level_diff_db"] == pytest.approx(-20.0, abs=1e-3), mode
    main(["--generated", str(gen), "--reference", str(dataset.root), "--out", str(tmp_path / "cli"),
          "--match-level"])
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["match_level"] is True
