"""The inference job end to end: the launcher, the four row kinds, mp4 muxing, summary.csv,
bad rows, skipping existing outputs, seeds per row id. Tiny model and encoders, 1 s, CPU."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from tests.media import video_packets, write_corrupt_video, write_video
from tests.test_predict import SR, TINY_OVERRIDES, save_checkpoints, tiny_cfg
from wavflow.config import load_config
from wavflow.model import build_model_from_config
from wavflow.predict import main, run

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def write_job_config(path: Path, *, ckpt: Path, csv: Path, out: Path, data_root: Path | None = None, **extra: str) -> Path:
    """A user config file on top of configs/infer.yaml (nested YAML, like a user would write)."""
    lines = ["_base_: infer.yaml", "model:", f"  ckpt_path: {ckpt}", "  use_ema: false", "data:", f"  csv_path: {csv}"]
    if data_root is not None:
        lines.append(f"  data_root: {data_root}")
    lines += ["output:", f"  output_dir: {out}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def job_args(cfg_path: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg_path), *TINY_OVERRIDES, "inference.batch_size=3", *extra]


def audio_and_video_streams(path: Path) -> tuple[int, int, int, int, int]:
    """(#audio streams, #video streams, audio stream duration in samples, decoded audio
    samples, audio sample rate), read with plain PyAV."""
    with av.open(str(path)) as c:
        n_audio, n_video = len(c.streams.audio), len(c.streams.video)
        a = c.streams.audio[0]
        duration = round(a.duration * a.time_base * a.rate)
        samples = sum(f.samples for f in c.decode(audio=0))
    return n_audio, n_video, duration, samples, a.rate


def test_launcher_four_row_kinds_wavs_mp4s_summary(tmp_path, wavflow_cache_dir):
    media = tmp_path / "media"
    media.mkdir()
    write_video(media / "vt.mp4", seconds=1.2)
    write_video(media / "v.mp4", seconds=1.2, size=(64, 96))
    csv = tmp_path / "rows.csv"
    csv.write_text(
        "id,video_path,caption,video_exist,text_exist\n"
        'vt,vt.mp4,"a dog, barking",1,1\n'
        't,,"rain on a ""tin"" roof",0,1\n'
        ",v.mp4,,1,0\n"  # no id: named after the video stem
        ",,,0,0\n"  # neither: unconditional sample, named row_00003
    )
    paths = save_checkpoints(tmp_path / "ckpt", tiny_cfg())
    out = tmp_path / "out"
    cfg_path = write_job_config(tmp_path / "job.yaml", ckpt=paths["full"], csv=csv, out=out, data_root=media)
    env = {**os.environ, "WAVFLOW_CACHE_DIR": str(wavflow_cache_dir), "OMP_NUM_THREADS": "1",
           "WAVFLOW_PYTHON": sys.executable}
    proc = subprocess.run(
        # the 1.2 s videos give their first trained-duration second (windows: test_long_form.py)
        ["bash", str(REPO / "scripts/launch/predict.sh"), *job_args(cfg_path, "sampling.num_steps=2", "inference.long_form=off")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unconditional sample" in proc.stderr

    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert list(summary.columns) == ["id", "status", "seconds", "model_calls", "duration_s", "windows", "loudness_lufs",
                                     "wav_path", "mp4_path", "reason"]
    assert summary["id"].tolist() == ["vt", "t", "v", "row_00003"]
    assert summary["status"].tolist() == ["ok"] * 4 and (summary["seconds"] > 0).all()
    assert (summary["model_calls"] == 2).all() and "model call(s)" in proc.stderr  # Euler, 2 steps
    assert (summary["loudness_lufs"] == -23.0).all()  # output.loudness_target_lufs, the default
    for name in ["vt", "t", "v", "row_00003"]:
        data, sr = sf.read(out / f"{name}.wav", dtype="float32")
        assert sr == SR and data.shape == (round(SR * 1.0),) and np.isfinite(data).all() and np.abs(data).max() > 0
    assert sorted(p.name for p in out.glob("*.mp4")) == ["v.mp4", "vt.mp4"]
    for name in ["vt", "v"]:
        mp4 = out / f"{name}.mp4"
        n_audio, n_video, duration, samples, rate = audio_and_video_streams(mp4)
        assert (n_audio, n_video, rate) == (1, 1, SR)
        assert duration == SR  # the audio stream lasts exactly round(sr * duration) samples
        assert SR <= samples < SR + 1024  # AAC decodes whole 1024-sample frames
        assert video_packets(mp4) == video_packets(media / f"{name}.mp4")  # video stream copied
    assert summary.loc[summary.id == "vt", "mp4_path"].item() == str(out / "vt.mp4")

    # Second run: outputs exist and output.overwrite=false -> every row skipped, nothing loaded.
    stamp = (out / "vt.wav").stat().st_mtime_ns
    cfg = load_config(cfg_path, [*TINY_OVERRIDES, "model.ckpt_path=/nonexistent.pth"])
    result = run(cfg)
    assert result.exit_code == 0 and {r.status for r in result.rows} == {"skipped_exists"}
    assert (out / "vt.wav").stat().st_mtime_ns == stamp


def test_bad_rows_are_reported_and_the_rest_written(tmp_path, wavflow_cache_dir):
    media = tmp_path / "media"
    media.mkdir()
    write_corrupt_video(media / "corrupt.mp4")
    write_video(media / "short.mp4", seconds=0.4)
    # A freshly built network outputs exactly 0: its samples are silent (loudness guard).
    fresh = build_model_from_config(tiny_cfg())
    ckpt = tmp_path / "ema_epoch_0.pth"
    torch.save(fresh.state_dict(), ckpt)
    csv = tmp_path / "rows.csv"
    csv.write_text(
        "id,video_path,caption,video_exist,text_exist\n"
        'good,,"He said, ""hi, there"", then left",0,1\n'
        "missing,missing.mp4,a cat,1,1\n"
        "corrupt,corrupt.mp4,a cat,1,1\n"
        "short,short.mp4,,1,0\n"
        "badflag,,a cat,2,1\n"
        "../evil,,a cat,0,1\n"
        "good,,a second row with the same id,0,1\n"
    )
    out = tmp_path / "out"
    cfg_path = write_job_config(tmp_path / "job.yaml", ckpt=ckpt, csv=csv, out=out, data_root=media)
    code = main(job_args(cfg_path, "sampling.num_steps=2"))
    assert code == 1  # some rows failed

    s = pd.read_csv(out / "summary.csv", keep_default_na=False).set_index("id")
    assert s.index.tolist() == ["good", "missing", "corrupt", "short", "badflag", "evil", "good_1"]
    assert s.loc[["good", "evil", "good_1"], "status"].tolist() == ["ok"] * 3
    assert s.loc[["missing", "corrupt", "short", "badflag"], "status"].tolist() == ["failed"] * 4
    assert f"video not found: {media / 'missing.mp4'}" in s.loc["missing", "reason"]
    assert "corrupt.mp4" in s.loc["corrupt", "reason"] and "could not" in s.loc["corrupt", "reason"]
    assert "short.mp4 is too short" in s.loc["short", "reason"]
    assert "video_exist='2' is not 0 or 1" in s.loc["badflag", "reason"]
    assert s.loc[["missing", "corrupt"], "wav_path"].tolist() == ["", ""]
    written = sorted(p.name for p in out.iterdir())
    assert written == ["evil.wav", "good.wav", "good_1.wav", "summary.csv"]  # nothing outside out/
    for name in ["good", "good_1", "evil"]:
        data, sr = sf.read(out / f"{name}.wav", dtype="float32")
        assert data.shape == (SR,) and np.isfinite(data).all() and not data.any()  # silent, no NaN


def test_job_seeds_follow_row_ids_not_order_or_batch(tmp_path, wavflow_cache_dir):
    paths = save_checkpoints(tmp_path / "ckpt", tiny_cfg())
    rows = [("a", "a dog barks"), ("b", "rain"), ("c", "a car passes"), ("d", "birds")]

    def run_job(order: str, batch_size: int, seed: int = 7) -> dict[str, np.ndarray]:
        csv = tmp_path / f"rows_{batch_size}_{seed}_{''.join(order)}.csv"
        body = "".join(f"{i},,{dict(rows)[i]},0,1\n" for i in order)
        csv.write_text("id,video_path,caption,video_exist,text_exist\n" + body)
        out = tmp_path / csv.stem
        cfg_path = write_job_config(tmp_path / f"{csv.stem}.yaml", ckpt=paths["full"], csv=csv, out=out)
        assert main(job_args(cfg_path, f"inference.batch_size={batch_size}", f"inference.seed={seed}",
                             "sampling.num_steps=2", "output.loudness_norm=false")) == 0
        return {i: sf.read(out / f"{i}.wav", dtype="float32")[0] for i in order}

    base = run_job("abcd", 4)
    shuffled = run_job("dbca", 4)
    one_by_one = run_job("abcd", 1)
    for i in "abcd":
        assert np.array_equal(shuffled[i], base[i])  # same batch size: bit-identical
        np.testing.assert_allclose(one_by_one[i], base[i], rtol=0, atol=5e-4)  # float rounding only
    # (different seeds giving different audio: tests/test_predict.py)


def test_inputs_are_never_overwritten_and_video_features_from_file(tmp_path, wavflow_cache_dir):
    """output_dir = the video folder, no id column: v0.mp4 stays byte-identical (outputs are
    v0_wavflow.*); a row with video_exist=1 and only a features file uses its clip/sync."""
    from tests.test_predict import random_features
    from wavflow.generator import WavFlowGenerator, row_seed
    from wavflow.predict import NO_VIDEO_FILE_REASON

    media = tmp_path / "media"
    media.mkdir()
    write_video(media / "v0.mp4", seconds=1.2)
    source_bytes = (media / "v0.mp4").read_bytes()
    paths = save_checkpoints(tmp_path / "ckpt", tiny_cfg())
    gen = WavFlowGenerator.from_checkpoint(paths["full"], config=tiny_cfg(), use_ema=False, device="cpu")
    feats = random_features(gen, 3, True, False)
    torch.save({"clip_features": feats.clip, "sync_features": feats.sync}, media / "feat.pth")
    torch.save({"text_features": random_features(gen, 4, False, True).text}, media / "textonly.pth")
    csv = media / "rows.csv"
    csv.write_text(
        "id,video_path,caption,video_exist,text_exist,features_path\n"
        ",v0.mp4,dog,1,1,\n"
        "feat,,,1,0,feat.pth\n"  # video features from the file, no video to mux
        "nofeat,,,1,0,textonly.pth\n"  # video wanted, neither source has it
        "novideo,,,1,0,\n"
    )
    csv_bytes = csv.read_bytes()
    cfg_path = write_job_config(tmp_path / "job.yaml", ckpt=paths["full"], csv=csv, out=media, data_root=media)
    seed = 11
    args = job_args(cfg_path, "sampling.num_steps=2", "output.loudness_norm=false", f"inference.seed={seed}")
    assert main(args) == 1  # two rows fail

    assert (media / "v0.mp4").read_bytes() == source_bytes and csv.read_bytes() == csv_bytes
    s = pd.read_csv(media / "summary.csv", keep_default_na=False).set_index("id")
    assert s.index.tolist() == ["v0", "feat", "nofeat", "novideo"]
    assert s["status"].tolist() == ["ok", "ok", "failed", "failed"]
    assert s.loc["v0", "wav_path"] == str(media / "v0_wavflow.wav")
    assert s.loc["v0", "mp4_path"] == str(media / "v0_wavflow.mp4")
    assert video_packets(media / "v0_wavflow.mp4") == video_packets(media / "v0.mp4")
    assert s.loc["feat", "mp4_path"] == "" and s.loc["feat", "reason"] == NO_VIDEO_FILE_REASON
    assert "textonly.pth has no clip_features/sync_features" in s.loc["nofeat", "reason"]
    assert "video_exist=1 but video_path and features_path are empty" in s.loc["novideo", "reason"]
    expected = gen.generate_batch([feats], [row_seed(seed, "feat")], steps=2)[0].numpy()
    got, _ = sf.read(media / "feat.wav", dtype="float32")
    # the file's video features were used (other features move the output by O(1)); the job
    # samples the rows as one batch, this call alone: float32 GEMM blocking differs by batch size
    # (1e-4 of these random weights' output scale ~8 on an AVX2 host)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in media.glob("*.mp4")) == ["v0.mp4", "v0_wavflow.mp4"]

    # Re-run: the renamed outputs exist -> skipped, the input is still untouched.
    assert main(args) == 1
    s = pd.read_csv(media / "summary.csv", keep_default_na=False).set_index("id")
    assert s.loc[["v0", "feat"], "status"].tolist() == ["skipped_exists"] * 2
    assert (media / "v0.mp4").read_bytes() == source_bytes

    # A summary.csv that is the input CSV itself: refused before anything is written.
    own = media / "summary.csv"
    own.write_text("id,video_path,caption,video_exist,text_exist\nt,,rain,0,1\n")
    own_bytes = own.read_bytes()
    cfg_path = write_job_config(tmp_path / "own.yaml", ckpt=paths["full"], csv=own, out=media)
    assert main(job_args(cfg_path, "sampling.num_steps=2")) == 2
    assert own.read_bytes() == own_bytes and not (media / "t.wav").exists()


# 2 s clips (not the 1 s of TINY_OVERRIDES, nor infer.yaml's 8 s): 16 CLIP frames, 5 x 8 = 40 sync tokens.
TRAINED_DUR = 2.0
TRAINED_SHAPES = [f"data.audio_duration={TRAINED_DUR}", "data.clip_seq_len=16", "data.sync_seq_len=40"]


def _adopt_job(tmp_path: Path, *file_lines: str) -> tuple[dict[str, Path], Path]:
    """A tiny_16k checkpoint of 2 s clips (tiny encoders) and a user config that names only
    the checkpoint, the CSV (a T2A and an unconditional row) and the output folder."""
    paths = save_checkpoints(tmp_path / "ckpt", tiny_cfg(*TRAINED_SHAPES))
    csv = tmp_path / "rows.csv"
    csv.write_text("id,video_path,caption,video_exist,text_exist\nt,,rain on a roof,0,1\nu,,,0,0\n")
    cfg_path = write_job_config(tmp_path / "job.yaml", ckpt=paths["full"], csv=csv, out=tmp_path / "out")
    if file_lines:
        cfg_path.write_text(cfg_path.read_text() + "\n".join(file_lines) + "\n")
    return paths, cfg_path


def test_job_adopts_the_checkpoints_preset_duration_and_encoders(tmp_path, wavflow_cache_dir, caplog):
    """No model= / data.* / encoders= on the command line: the job samples with what the
    checkpoint records (tiny_16k, 2 s, tiny encoders), not infer.yaml's medium_16k / 8 s."""
    paths, cfg_path = _adopt_job(tmp_path)
    with caplog.at_level(logging.INFO, logger="wavflow.generator"):
        assert main(["--config", str(cfg_path), "sampling.num_steps=2"]) == 0
    for name in ("t", "u"):
        data, sr = sf.read(tmp_path / "out" / f"{name}.wav", dtype="float32")
        assert sr == SR and data.shape == (round(SR * TRAINED_DUR),) and np.isfinite(data).all()
    adopted = [r.getMessage() for r in caplog.records if "adopted from the config recorded in" in r.getMessage()]
    assert len(adopted) == 1 and str(paths["full"]) in adopted[0]
    for item in ("model.name='tiny_16k'", "data.audio_duration=2.0", "data.clip_seq_len=16", "encoders.profile='tiny'"):
        assert item in adopted[0]


def test_job_override_that_contradicts_the_checkpoint_is_a_usage_error(tmp_path, capsys):
    """An explicit value (command line or the user's file) that differs from the checkpoint's
    is exit 2 with one line naming the key, both values and the checkpoint."""
    paths, cfg_path = _adopt_job(tmp_path)
    cases = [
        (["data.audio_duration=1.0"], "data.audio_duration=1.0", "data.audio_duration=2.0"),
        (["model=small_16k"], "model.name='small_16k'", "model.name='tiny_16k'"),
    ]
    for extra, given, recorded in cases:
        assert main(["--config", str(cfg_path), "sampling.num_steps=2", *extra]) == 2, extra
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("[wavflow.predict] error: ") and "(details above)" not in last, last
        assert given in last and recorded in last and str(paths["full"]) in last, last
        assert "inference.allow_config_mismatch=true" in last
    _, in_file = _adopt_job(tmp_path / "file", "sampling:", "  prediction_type: v")  # set in the user's file
    assert main(["--config", str(in_file), "sampling.num_steps=2"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "sampling.prediction_type='v'" in last and "sampling.prediction_type='x'" in last, last
    assert not list(tmp_path.rglob("*.wav"))  # stopped before sampling


def test_job_override_equal_to_the_checkpoint_works(tmp_path, wavflow_cache_dir):
    """Explicit values equal to the checkpoint's; `model=tiny_16k` does not pin the condition
    lengths, which it derives from the (adopted) duration."""
    _, cfg_path = _adopt_job(tmp_path)
    for i, extra in enumerate([["data.audio_duration=2"], ["model=tiny_16k", "encoders=tiny"]]):
        out = tmp_path / f"out{i}"
        assert main(["--config", str(cfg_path), "sampling.num_steps=2", f"output.output_dir={out}", *extra]) == 0, extra
        data, _ = sf.read(out / "t.wav", dtype="float32")
        assert data.shape == (round(SR * TRAINED_DUR),)


def test_job_with_a_flat_checkpoint_keeps_the_configs_values(tmp_path, capsys):
    """ema_epoch_N.pth records no config: infer.yaml's medium_16k stays, and the weight shapes
    say which preset they fit."""
    paths, cfg_path = _adopt_job(tmp_path)
    assert main(["--config", str(cfg_path), f"model.ckpt_path={paths['flat']}"]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(paths["flat"]) in last and "medium_16k" in last and "tiny_16k" in last, last
