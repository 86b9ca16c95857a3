"""A shortened demo run through the real launchers writes every artefact it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, wavflow_cache_dir: Path):
    out = tmp_path / "demo run #2"  # ' #' and spaces reach every stage whole (issue 11)
    env = dict(os.environ, WAVFLOW_PYTHON=sys.executable, OMP_NUM_THREADS="1", DEMO_OUT=str(out),
               WAVFLOW_CACHE_DIR=str(wavflow_cache_dir))
    cmd = ["bash", str(REPO / "scripts/launch/demo.sh"), "demo.n=24", "demo.long_video_clips=2", "demo.train.max_steps=5",
           "demo.train.batch_size=4", "demo.train.time_mean=-0.7", "model.name=tiny_16k",
           "sampling.num_steps=2", "demo.figure_clips=2", "data.feature_norm_rms.clip_features=0.25"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # data set, features, training run
    assert (out / "data/events.json").is_file()
    for mode in ("vt2a", "t2a"):
        csv = pd.read_csv(out / f"features/train_{mode}_features.csv")
        assert list(csv.columns) == ["id", "audio_path", "features_path", "video_exist", "text_exist"]
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in csv.features_path)
    run = out / "train/demo"
    assert (run / "checkpoint_latest.pth").is_file() and (run / "config.yaml").is_file()
    assert "GlobalStep 5" in (run / "training.log").read_text()
    from omegaconf import OmegaConf

    trained = OmegaConf.load(run / "config.yaml")  # the demo's training-time distribution reached the trainer
    demo_scale = OmegaConf.load(REPO / "configs/demo.yaml").demo.train.time_scale
    assert (trained.sampling.mean, trained.sampling.scale) == (-0.7, demo_scale)
    assert trained.data.feature_norm_rms.text_features == 0.3  # captions' scale (docs/encoders.md)
    assert trained.data.feature_norm_rms.clip_features == 0.25  # a user's override reached the trainer
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # predictions for every held-out row, mp4s for rows with video
    holdout = pd.read_csv(out / "data/holdout_infer.csv", keep_default_na=False)
    summary = pd.read_csv(out / "predict/summary.csv", keep_default_na=False)
    assert len(summary) == len(holdout) and set(summary.status) == {"ok"}
    assert set(holdout.video_exist) == {0, 1} and set(holdout.text_exist) == {0, 1}
    for row in holdout.itertuples():
        wave, sr = sf.read(out / f"predict/{row.id}.wav")
        assert sr == 16000 and wave.shape == (16000,)  # 1 s demo clips
        mp4 = out / f"predict/{row.id}.mp4"
        assert mp4.is_file() == bool(row.video_exist)
        if row.video_exist:
            with av.open(str(mp4)) as container:
                assert len(container.streams.video) == 1 and len(container.streams.audio) == 1

    # metrics, figure, printout
    metrics = json.loads((out / "metrics/metrics.json").read_text())
    # per mode, never pooled: VT2A, T2A and V2A rows each scored on their own, `overall` only
    # for the distribution figures (Fréchet, level)
    assert set(metrics["groups"]) == {"VT2A", "T2A", "V2A", "overall"}
    assert metrics["groups"]["overall"]["n"] == len(holdout)
    assert "class_accuracy" not in metrics["groups"]["overall"]
    for mode in ("VT2A", "T2A", "V2A"):
        group = metrics["groups"][mode]
        assert group["n"] > 0, mode  # 24 clips, 6 held out: two rows of each mode
        assert group["class_accuracy"] is not None and 0.0 <= group["class_accuracy"] <= 1.0, mode
    assert sum(metrics["groups"][m]["n"] for m in ("VT2A", "T2A", "V2A")) == len(holdout)
    assert (out / "metrics/metrics.txt").read_text().strip()
    # the long video: the 2 held-out V2A clips joined (2 s), made in windows, scored per segment
    long_form = metrics["long_form"]
    assert (long_form["n"], long_form["seconds"], long_form["windows"]) == (2, 2.0, 3)
    assert sf.read(out / "predict_long/long_v2a.wav")[0].shape == (32000,)
    long_summary = pd.read_csv(out / "predict_long/summary.csv", keep_default_na=False)
    assert long_summary.windows.tolist() == [3] and (out / "predict_long/long_v2a.mp4").is_file()
    assert "V2A long 2 s/3w" in proc.stdout and "seams at 2 junctions" in proc.stdout
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "WavFlow demo finished" in proc.stdout and "not a model that sounds right" in proc.stdout.replace("\n  ", " ")
    assert str(out / "figure.png") in proc.stdout

    # the closing summary's command opens the demo's checkpoint in the web page
    import shlex

    from wavflow.app.generation import Studio, parse_request
    from wavflow.config import load_config

    line = next(x.strip() for x in proc.stdout.splitlines() if x.strip().startswith("bash scripts/launch/app.sh"))
    words = shlex.split(line)[2:]
    assert f"model.ckpt_path={run / 'checkpoint_latest.pth'}" in words
    studio = Studio.load(load_config("app.yaml", [*words, f"output.output_dir={tmp_path / 'app'}"]))
    clip = studio.run(parse_request(video=None, caption="a low tone", steps=2, cfg=1.5, seed=0, duration=1.0,
                                    method="euler", cfg_interval="", use_ema=True, limits=studio.limits))
    assert sf.read(clip.wav)[0].shape == (16000,)

    # the class-commitment probe samples the held-out rows as the predict job did: its last
    # step's classes are the metrics' classes, row for row (same seeds, cfg, steps, EMA weights)
    probe = subprocess.run([sys.executable, str(REPO / "scripts/bench/class_commitment.py"),
                            "--checkpoint", str(run), "--data", str(out / "data"), "--steps", "2",
                            "--json", str(tmp_path / "probe.json"), "--wav-dir", str(tmp_path / "probe")],
                           env=env, capture_output=True, text=True,
                           timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads((tmp_path / "probe.json").read_text())
    assert [p["t"] for p in result["per_t"]] == [0.0, 0.5]
    predicted = {c["id"]: c["predicted"] for c in metrics["per_clip"]}
    assert {r["id"]: r["predicted"] for r in result["final"]} == predicted
    for clip_id in predicted:  # the same waveforms up to the predict job's loudness gain
        mine, _ = sf.read(tmp_path / "probe" / f"{clip_id}.wav", dtype="float64")
        theirs, _ = sf.read(out / "predict" / f"{clip_id}.wav", dtype="float64")
        corr = float(np.dot(mine, theirs) / (np.linalg.norm(mine) * np.linalg.norm(theirs)))
        assert corr > 0.999, (clip_id, corr)

    # the spectral probe: band shares of the generated clips, and of the network's x̂ on the same
    # real clips (there beside the training target, amplitude-lifted: a click's clamped peaks differ)
    bands = {}
    for name, args in (("generated", ["--generated", str(out / "predict")]),
                       ("x_hat", ["--checkpoint", str(run), "--times", "0.9"])):
        proc = subprocess.run([sys.executable, str(REPO / "scripts/bench/spectral_bands.py"), "--data",
                               str(out / "data"), *args, "--json", str(tmp_path / f"{name}.json")],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        bands[name] = json.loads((tmp_path / (f"{name}.json" if name == "generated" else "x_hat_t0.9.json")).read_text())
    labels = {c["label"] for c in metrics["per_clip"]}
    assert bands["generated"].keys() == bands["x_hat"].keys() == labels
    for label in labels:
        for which in ("generated", "x_hat"):
            assert bands[which][label]["generated"] != bands[which][label]["real"]
            assert sum(bands[which][label]["real"]) == pytest.approx(1.0, abs=0.1)
            assert bands[which][label]["n"] == sum(c["label"] == label for c in metrics["per_clip"])


def test_every_base_key_the_demo_forwards_reaches_each_launcher_as_set():
    """A key of the demo's config that a stage reads (feature normalisation, flow-matching
    settings) is forwarded with the value the user set, not dropped for the stage's default."""
    from wavflow.config import load_config
    from wavflow.demo.pipeline import SHARED_KEYS, shared_overrides

    cfg = load_config("demo.yaml", ["data.feature_norm_rms.clip_features=0.3", "sampling.method=heun",
                                    "sampling.noise_shift=2.0", "data.feature_norm=true"])
    words = dict(w.split("=", 1) for w in shared_overrides(cfg))
    assert list(words) == list(SHARED_KEYS)
    assert (words["data.feature_norm_rms.clip_features"], words["sampling.method"],
            words["sampling.noise_shift"], words["data.feature_norm"]) == ("0.3", "'heun'", "2.0", "true")
    for job in ("extract_vt2a.yaml", "extract_t2a.yaml", "train.yaml", "infer.yaml"):
        stage = load_config(job, shared_overrides(cfg))  # every launcher accepts every forwarded key
        assert stage.data.feature_norm_rms.clip_features == 0.3 and stage.sampling.method == "heun", job


def test_demo_refuses_to_reuse_stages_made_with_other_settings(tmp_path: Path):
    from wavflow.config import load_config
    from wavflow.demo.pipeline import _check_reuse
    from wavflow.errors import ConfigError

    cfg = load_config("demo.yaml", [f"demo.out_dir={tmp_path}"])
    _check_reuse(cfg, tmp_path)  # first run: writes the stamp
    assert json.loads((tmp_path / "demo_settings.json").read_text())["demo.n"] == cfg.demo.n == 144
    _check_reuse(cfg, tmp_path)  # same settings: reuse is fine
    other = load_config("demo.yaml", [f"demo.out_dir={tmp_path}", "demo.n=16", "model.name=tiny_16k"])
    with pytest.raises(ConfigError, match=r"demo.n: 144 -> 16.*demo.fresh=true"):  # a usage error: exit 2
        _check_reuse(other, tmp_path)


def test_a_failed_stage_passes_on_its_exit_code_and_its_own_last_line(tmp_path: Path):
    """The demo and the learning benchmark exit with the failed stage's code (a usage error in
    a stage stays 2, not the generic 3) and repeat the stage's `[wavflow.<job>] error:` line."""
    from wavflow.demo.pipeline import StageError, run_stage
    from wavflow.exit_codes import exit_code_for

    with pytest.raises(StageError) as caught:
        run_stage("predict_bad", "predict", ["inference.cfg=not_a_number"], 1, tmp_path)
    err = caught.value
    assert err.exit_code == 2 and exit_code_for(err) == 2
    assert "stage 'predict_bad' failed with exit code 2: [wavflow.predict] error:" in str(err)
    assert "inference.cfg" in str(err) and (tmp_path / "predict_bad.log").is_file()
    assert exit_code_for(StageError("killed", -9)) == 137


def test_loudness_target_data_is_the_median_of_the_training_clips(tmp_path: Path):
    import numpy as np
    import pyloudnorm as pyln

    from wavflow.demo.make_dataset import make_dataset
    from wavflow.demo.pipeline import loudness_overrides
    from wavflow.errors import ConfigError

    info = make_dataset(tmp_path, n=7, seed=3, duration=1.0, progress=False)
    meter = pyln.Meter(info.sample_rate)
    values = sorted(meter.integrated_loudness(sf.read(info.root / c.audio_path)[0]) for c in info.split("train"))
    words = loudness_overrides("data", tmp_path)
    assert words[0] == "output.loudness_norm=true"
    assert float(words[1].split("=", 1)[1]) == pytest.approx(values[len(values) // 2], abs=0.01)
    assert np.ptp(values) > 0.5  # clips differ, so picking the median matters
    assert loudness_overrides(None, tmp_path) == ["output.loudness_norm=false"]
    assert loudness_overrides(-20, tmp_path)[1] == "output.loudness_target_lufs=-20.00"
    with pytest.raises(ConfigError, match="loudness_target_lufs"):
        loudness_overrides("loud", tmp_path)
