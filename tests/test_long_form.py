"""Long-form generation (docs/long_form.md): window plans, one-pass window decoding, windowed
sampling with the overlap fixed to the audio already made, and the predict job on long rows."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from tests.media import write_video
from tests.test_predict import SR, TINY_OVERRIDES, save_checkpoints, tiny_cfg
from wavflow.config import load_config
from wavflow.errors import ConfigError, VideoError
from wavflow.generator import WavFlowGenerator
from wavflow.long_form import sampler as long_sampler
from wavflow.long_form.plan import plan_windows, resolve_overlap, wants_windows
from wavflow.long_form.sampler import clip_plan, encode_windows, generate_long, LongFormItem
from wavflow.long_form.video_windows import decode_windows
from wavflow.predict import run as run_predict
from wavflow.video import decode_video, video_duration


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize("total, starts", [
    (2500, (0, 750, 1500)),        # a whole number of hops: the last window ends on the last sample
    (2300, (0, 750, 1300)),        # not: the last window moves back (its overlap grows to 450)
    (1000, (0,)),                  # exactly one window
    (600, (0,)),                   # shorter than a window (long_form=on): one window, cut
])
def test_windows_cover_the_clip_and_end_on_its_last_sample(total, starts):
    plan = plan_windows(total, 1000, 250, 1000)
    assert plan.starts == starts
    assert plan.starts[-1] + plan.window_samples >= total
    assert all(plan.known_samples(k) >= 250 for k in range(1, plan.count))
    assert plan.junctions() == [s + plan.known_samples(k) // 2 for k, s in enumerate(starts) if k]


@pytest.mark.parametrize("overlap, message", [
    (1.0, r"inference.window_overlap_sec=1 must lie strictly between 0 and the window length 1 s"),
    (0.0, r"inference.window_overlap_sec=0 must lie strictly between"),
    ("x", r"inference.window_overlap_sec must be a number of seconds or null"),
])
def test_a_bad_overlap_is_one_line_naming_the_key(overlap, message):
    with pytest.raises(ConfigError, match=message):
        resolve_overlap(overlap, 1.0)


def test_auto_uses_windows_only_past_the_trained_length():
    assert not wants_windows("auto", 16000, 16000) and wants_windows("auto", 16001, 16000)
    assert wants_windows("on", 8000, 16000) and not wants_windows("off", 10**6, 16000)
    assert wants_windows(True, 1, 2) and not wants_windows(False, 3, 2)  # YAML's bare on / off
    with pytest.raises(ConfigError, match="inference.long_form must be one of auto, off, on"):
        wants_windows("sometimes", 1, 2)


# ----------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", seconds=3.0, fps=25)


def test_each_window_gets_the_frames_of_its_own_time_span(long_video):
    full = decode_video(long_video, 3.0)
    windows = list(decode_windows(long_video, [0.0, 0.5, 1.0, 2.0], 1.0))
    first = decode_video(long_video, 1.0)
    assert torch.equal(windows[0].clip, first.clip) and torch.equal(windows[0].sync, first.sync)
    for w, start in zip(windows[2:], (1, 2)):  # starts on both frame grids: slices of the whole video
        assert torch.equal(w.clip, full.clip[8 * start: 8 * start + 8])
        assert torch.equal(w.sync, full.sync[25 * start: 25 * start + 25])
    assert not torch.equal(windows[1].sync, windows[0].sync)


def test_windows_of_a_phone_video_are_turned_upright_like_whole_clips(tmp_path):
    video = write_video(tmp_path / "portrait.mp4", seconds=1.5, fps=25, rotate=90)
    window = list(decode_windows(video, [0.0, 0.5], 1.0))[0]
    whole = decode_video(video, 1.0)
    assert window.rotation == whole.rotation == 90 and window.source_size == whole.source_size
    assert torch.equal(window.clip, whole.clip) and torch.equal(window.sync, whole.sync)


def test_a_video_that_ends_before_the_last_window_is_named(tmp_path, long_video):
    with pytest.raises(VideoError, match=r"long.mp4 is too short for a 1 s window"):
        list(decode_windows(long_video, [0.0, 2.5], 1.0))
    tiny = write_video(tmp_path / "one_frame.mp4", seconds=0.04, fps=25)
    with pytest.raises(VideoError, match=r"one_frame.mp4 is too short"):
        list(decode_windows(tiny, [0.0], 1.0))


# ----------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def gen(tmp_path_factory, wavflow_cache_dir) -> WavFlowGenerator:
    ckpt = save_checkpoints(tmp_path_factory.mktemp("lf_ckpt"), tiny_cfg())["full"]
    return WavFlowGenerator.from_checkpoint(ckpt, config=tiny_cfg("sampling.num_steps=4"), use_ema=False, device="cpu")


@pytest.mark.parametrize("seconds", [2.5, 2.3])  # 1 + 3 hops of 0.5 s, and not a whole number
def test_output_length_is_the_video_length_to_the_sample_and_a_seed_repeats_it(gen, tmp_path, seconds):
    video = write_video(tmp_path / "v.mp4", seconds=seconds, fps=20)  # a whole number of frames
    assert math.isclose(video_duration(video), seconds)
    wave, sr = gen.generate(video=str(video), text="a hiss", cfg=1.5, seed=3)
    assert sr == SR and wave.shape == (round(SR * seconds),) and torch.isfinite(wave).all()
    again, _ = gen.generate(video=str(video), text="a hiss", cfg=1.5, seed=3)
    assert torch.equal(wave, again)
    assert not torch.equal(wave, gen.generate(video=str(video), text="a hiss", cfg=1.5, seed=4)[0])
    first, _ = gen.generate(video=str(video), text="a hiss", cfg=1.5, seed=3, long_form="off")
    assert first.shape == (SR,)  # off: the first trained-duration second only


def test_windows_batched_or_not_and_clips_together_or_alone_give_the_same_audio(gen):
    text = gen.encode_text("two clicks")
    items = [LongFormItem(plan=clip_plan(gen, d, 0.3), windows=[], seed=s) for d, s in ((2.2, 1), (3.1, 2))]
    for it in items:
        it.windows = encode_windows(gen, it.plan, video=None, text=text)
    together = generate_long(gen, items, window_batch=16)
    alone = [generate_long(gen, [it], window_batch=1)[0] for it in items]
    for a, b, it in zip(together, alone, items):
        assert a.shape == (it.plan.total_samples,)
        torch.testing.assert_close(a, b, atol=5e-4, rtol=0)  # as predict across batch sizes (float rounding)
        assert a.abs().max() > 0.01


def test_each_window_continues_the_audio_already_made(gen, monkeypatch):
    """Window k's overlap is fixed to window k-1's audio: the overlap comes out as it was."""
    plan = clip_plan(gen, 2.5, 0.25)
    item = LongFormItem(plan=plan, windows=encode_windows(gen, plan, video=None, text=None), seed=5)
    placed = []
    real_place = long_sampler._place

    def spy(out, wave, plan_, k):
        n = plan_.known_samples(k)
        placed.append((out[plan_.starts[k]: plan_.starts[k] + n].clone(), wave[:n].clone()))
        real_place(out, wave, plan_, k)

    monkeypatch.setattr(long_sampler, "_place", spy)
    generate_long(gen, [item])
    for before, new in placed[1:]:
        assert before.numel() == 4000 and before.abs().max() > 0
        torch.testing.assert_close(new, before, atol=1e-5, rtol=0)


def test_windows_agree_wherever_they_overlap_even_when_several_share_a_stretch():
    plan = plan_windows(1300, 1000, 900, 1000)  # starts 0, 100, 200, 300: [300, 1000) lies in all four
    assert plan.starts == (0, 100, 200, 300)
    items = [LongFormItem(plan=plan, windows=[None] * plan.count, seed=0)]
    _, layout = long_sampler._window_layout(items)
    pred = long_sampler.share_overlaps(torch.randn(4, 1000), layout)
    for a in range(4):
        for b in range(a + 1, 4):
            lo, hi = plan.starts[b], plan.starts[a] + 1000
            torch.testing.assert_close(pred[a, lo - plan.starts[a]: hi - plan.starts[a]], pred[b, : hi - lo],
                                       atol=0, rtol=0)


# A model with a known answer: data are 5 Hz tones of random phase and amplitude, and the network
# is replaced by the exact posterior mean of such a tone given the noisy window (2x2 solve).
# One tone must run through the whole clip; windows that do not see the audio already made
# start their own phase, and the crossfade then mixes two phases: a seam.
TONE_HZ = 5.0


def _tone_posterior(gen):
    def predict(x, t, conditions):
        b = x.shape[0]
        u = x.reshape(b, -1).double()
        n = torch.arange(u.shape[1], dtype=torch.float64)
        basis = torch.stack([torch.cos(2 * math.pi * TONE_HZ * n / SR), torch.sin(2 * math.pi * TONE_HZ * n / SR)], 1)
        out = []
        for i in range(b):
            ti = float(t[i])
            a = ti * basis.T @ basis / (1 - ti) ** 2 + torch.eye(2, dtype=torch.float64)
            c = torch.linalg.solve(a, ti * basis.T @ u[i] / (1 - ti) ** 2)
            out.append(basis @ c)
        return torch.stack(out).reshape(x.shape).to(x.dtype)
    return predict


def _seam_coherence(wave: np.ndarray, junctions, half: int) -> float:
    """Mean share of the energy around each junction explained by one 5 Hz tone (1: seamless)."""
    n = np.arange(len(wave))
    basis = np.stack([np.cos(2 * np.pi * TONE_HZ * n / SR), np.sin(2 * np.pi * TONE_HZ * n / SR)], 1)
    scores = []
    for j in junctions:
        lo, hi = max(j - half, 0), min(j + half, len(wave))
        c = np.linalg.lstsq(basis[lo:hi], wave[lo:hi], rcond=None)[0]
        scores.append(1 - np.sum((wave[lo:hi] - basis[lo:hi] @ c) ** 2) / np.sum(wave[lo:hi] ** 2))
    return float(np.mean(scores))


def _tone_clips(gen, monkeypatch, *, independent: bool) -> float:
    monkeypatch.setattr(gen.model, "predict_flow", _tone_posterior(gen))
    if independent:  # the mutant: windows sampled on their own, then crossfaded
        monkeypatch.setattr(long_sampler, "share_overlaps", lambda pred, overlaps: pred)
    scores = []
    for seed in range(6):
        plan = clip_plan(gen, 5.5, 0.5)
        item = LongFormItem(plan=plan, windows=encode_windows(gen, plan, video=None, text=None), seed=seed)
        wave = generate_long(gen, [item], steps=25, cfg=1.0)[0].numpy()
        scores.append(_seam_coherence(wave, plan.junctions(), SR // 2))
    return float(np.mean(scores))


def test_windows_join_without_a_seam_and_independent_windows_do_not(gen, monkeypatch):
    joined = _tone_clips(gen, monkeypatch, independent=False)
    with monkeypatch.context() as m:
        independent = _tone_clips(gen, m, independent=True)
    # measured: 0.82 joined, 0.66 independent (6 clips x 10 junctions)
    assert joined > 0.75 and independent < 0.70 and joined > independent + 0.1, (joined, independent)


def test_every_window_gets_its_own_video_features(gen, long_video):
    """Windows on both frame grids (starts 1 s, 2 s) get the features of that second of video."""
    plan = clip_plan(gen, 3.0, 0.5)
    assert plan.starts == (0, 8000, 16000, 24000, 32000)
    feats = encode_windows(gen, plan, video=str(long_video), text=None)
    frames = decode_video(long_video, 3.0)
    for k, second in ((2, 1), (4, 2)):
        one = type(frames)(clip=frames.clip[8 * second: 8 * second + 8], sync=frames.sync[25 * second: 25 * second + 25],
                           source_fps=None, source_size=(0, 0), rotation=0)
        clip, sync = gen.encode_video_frames([one], where="test")
        torch.testing.assert_close(feats[k].clip, clip[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(feats[k].sync, sync[0], atol=1e-5, rtol=0)
    assert not torch.allclose(feats[2].sync, feats[0].sync)


def test_bad_lengths_are_refused_naming_the_value(gen):
    with pytest.raises(ConfigError, match="duration must be a positive number of seconds, got 0"):
        gen.generate(text="a hiss", duration=0)
    with pytest.raises(ConfigError, match="duration must be a positive number of seconds, got -1"):
        gen.generate(text="a hiss", duration=-1.0)


# ----------------------------------------------------------------------------- the predict job


def test_predict_writes_each_row_at_its_own_length(gen, tmp_path, wavflow_cache_dir):
    media = tmp_path / "media"
    write_video(media / "long.mp4", seconds=2.6, fps=20)
    write_video(media / "short.mp4", seconds=1.0, fps=25)
    csv = tmp_path / "rows.csv"
    csv.write_text(
        "id,video_path,caption,video_exist,text_exist,duration\n"
        "long,long.mp4,a hiss,1,1,\n"
        "short,short.mp4,,1,0,\n"
        "t_long,,rain,0,1,3.3\n"
        "t_one,,rain,0,1,\n"
        "bad,,rain,0,1,-2\n"
    )
    ckpt = Path(gen.checkpoint.path)
    cfg = load_config("infer.yaml", [*TINY_OVERRIDES, "sampling.num_steps=2", f"model.ckpt_path={ckpt}",
                                     f"data.csv_path={csv}", f"data.data_root={media}",
                                     f"output.output_dir={tmp_path / 'out'}", "model.use_ema=false"])
    result = run_predict(cfg)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv", keep_default_na=False).set_index("id")
    assert summary.loc["bad", "status"] == "failed" and "duration='-2' must be a positive number" in summary.loc["bad", "reason"]
    for name, seconds, windows in (("long", 2.6, 5), ("short", 1.0, 1), ("t_long", 3.3, 6), ("t_one", 1.0, 1)):
        assert summary.loc[name, "status"] == "ok", summary.loc[name, "reason"]
        assert int(summary.loc[name, "windows"]) == windows and math.isclose(float(summary.loc[name, "duration_s"]), seconds)
        data, sr = sf.read(tmp_path / "out" / f"{name}.wav")
        assert data.shape == (round(sr * seconds),)
    with av.open(str(tmp_path / "out" / "long.mp4")) as box:  # the whole video with the whole new audio
        audio = box.streams.audio[0]
        assert len(box.streams.video) == 1 and round(audio.duration * audio.time_base * audio.rate) == round(SR * 2.6)
    assert result.exit_code == 1  # the bad row


def test_predict_rows_that_ask_for_another_length_than_windows_allow_fail_saying_why(gen, tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("id,video_path,caption,video_exist,text_exist,duration\nlong,,rain,0,1,2.5\nshort,,rain,0,1,0.5\n")
    cfg = load_config("infer.yaml", [*TINY_OVERRIDES, f"model.ckpt_path={gen.checkpoint.path}", f"data.csv_path={csv}",
                                     f"output.output_dir={tmp_path / 'out'}", "inference.long_form=off"])
    rows = {r.name: r for r in run_predict(cfg, generator=gen).rows}
    assert rows["long"].status == "failed" and "inference.long_form=auto or on makes longer clips" in rows["long"].reason
    assert rows["short"].status == "failed" and "data.audio_duration" in rows["short"].reason


def test_predict_refuses_an_overlap_as_long_as_the_window(gen, tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("video_path,caption,video_exist,text_exist,duration\n,rain,0,1,2.5\n")
    cfg = load_config("infer.yaml", [*TINY_OVERRIDES, f"model.ckpt_path={gen.checkpoint.path}", f"data.csv_path={csv}",
                                     f"output.output_dir={tmp_path / 'out'}", "inference.window_overlap_sec=1.0"])
    with pytest.raises(ConfigError, match="inference.window_overlap_sec=1 must lie strictly between 0 and"):
        run_predict(cfg, generator=gen)
