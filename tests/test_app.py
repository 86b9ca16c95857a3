"""The web page's request logic (wavflow/app/generation.py) without a browser: the checks of
each input, the request -> generator mapping, equality with predict's output for the same
inputs and seed, compare modes, concurrent requests, and start-up errors."""

from __future__ import annotations

import csv
import io
import json
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.media import write_video
from tests.test_predict import TINY_OVERRIDES, save_checkpoints, tiny_cfg
from wavflow.app.generation import Limits, RequestError, Studio, parse_request
from wavflow.config import load_config
from wavflow.predict import run as run_predict

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_duration=4.0, trained_duration=1.0, min_video_duration=0.25, context_length=77)
GOOD = dict(video=None, caption="two sharp clicks", steps=4, cfg=1.5, seed=3, duration=1.0, method="euler",
            cfg_interval="", use_ema=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoints(tmp_path_factory.mktemp("app_ckpt"), tiny_cfg())["full"]


@pytest.fixture(scope="module")
def studio(checkpoint, tmp_path_factory, wavflow_cache_dir) -> Studio:
    out = tmp_path_factory.mktemp("app_out")
    cfg = load_config("app.yaml", [*TINY_OVERRIDES, f"model.ckpt_path={checkpoint}", f"output.output_dir={out}"])
    return Studio.load(cfg)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("app_media") / "clip.mp4"
    write_video(path, seconds=1.5, fps=25)
    return path


@pytest.mark.parametrize("change, message", [
    (dict(caption="  ", video=None), "Give a video, a caption, or both"),
    (dict(steps=0), "Steps must be between 1 and 1000"),
    (dict(steps=2.5), "Steps must be a whole number"),
    (dict(seed="x"), "Seed must be a number"),
    (dict(duration=4.5), "this page makes clips of up to 4 s"),
    (dict(duration=-1), "Duration must be between 0 and inf, got -1"),
    (dict(duration=1.5, long_form="off"), "longer than the trained 1 s: choose Long form auto or on"),
    (dict(long_form="sometimes"), "Long form must be one of auto, off, on"),
    (dict(duration=2.0, window_overlap_sec="1.0"), r"Window overlap \(s\)=1 must lie strictly between 0 and the window length 1 s"),
    (dict(window_overlap_sec="-0.1"), "Window overlap must be between 0"),
    (dict(duration=0.1, video="clip.mp4"), "too short for video conditions"),
    (dict(method="rk9"), "Sampler 'rk9' is not one of euler, heun, adaptive"),
    (dict(cfg_interval="0.5"), "CFG interval must be two numbers"),
    (dict(cfg_interval="0.9, 0.1"), "0 <= lo <= hi <= 1"),
])
def test_each_bad_input_is_refused_with_a_message_naming_it(change, message):
    with pytest.raises(RequestError, match=message):
        parse_request(**{**GOOD, **change}, limits=LIMITS)


def test_a_request_maps_onto_the_generator_settings():
    req = parse_request(**{**GOOD, "video": "clip.mp4", "cfg_interval": "0.1, 0.8", "caption": " a hiss "},
                        limits=LIMITS)
    assert (req.mode, req.caption, req.steps, req.seed, req.cfg_interval) == ("VT2A", "a hiss", 4, 3, (0.1, 0.8))
    assert [req.without(m).mode for m in ("VT2A", "V2A", "T2A")] == ["VT2A", "V2A", "T2A"]


def _predict_same(result, studio: Studio, tmp: Path, video: Path | None) -> np.ndarray:
    """Run the predict job as the page's settings say: its CSV row and its command's overrides."""
    settings = result.settings
    rows = list(csv.DictReader(io.StringIO(settings["csv"])))
    if video is not None:
        rows[0]["video_path"] = str(video)  # the CSV names the upload's file; the user has it
    csv_path = tmp / "app.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    words = shlex.split(settings["command"])
    assert words[:4] == ["bash", "scripts/launch/predict.sh", "--config", "configs/infer.yaml"]
    overrides = [w for w in words[4:] if not w.startswith(("data.csv_path=", "output.output_dir="))]
    cfg = load_config("infer.yaml", [*overrides, "encoders.profile=tiny", f"data.csv_path={csv_path}",
                                     f"output.output_dir={tmp / 'predict'}"])
    run_predict(cfg).check_failed_rows()
    wave, sr = sf.read(tmp / "predict" / "app.wav", dtype="float32")
    assert sr == studio.generator(True).sample_rate
    return wave


@pytest.mark.parametrize("mode", ["T2A", "VT2A"])
def test_the_page_and_predict_write_the_same_waveform_for_the_same_inputs_and_seed(studio, video, tmp_path, mode):
    fields = {**GOOD, "video": str(video) if mode == "VT2A" else None}
    result = studio.run(parse_request(**fields, limits=studio.limits))
    page_wave, sr = sf.read(result.wav, dtype="float32")
    assert result.mode == mode and len(page_wave) == sr * 1  # 1 s at 16 kHz
    assert (result.mp4 is not None) == (mode == "VT2A") and result.spectrogram.stat().st_size > 1000
    assert json.loads((result.folder / "settings.json").read_text()) == result.settings
    batch_wave = _predict_same(result, studio, tmp_path, video if mode == "VT2A" else None)
    np.testing.assert_array_equal(page_wave, batch_wave)


@pytest.mark.parametrize("mode", ["T2A", "VT2A"])
def test_a_long_clip_on_the_page_is_made_in_windows_like_predict_makes_it(studio, video, tmp_path, mode):
    fields = {**GOOD, "video": str(video) if mode == "VT2A" else None, "duration": 1.5 if mode == "VT2A" else 2.3,
              "window_overlap_sec": "0.3"}
    result = studio.run(parse_request(**fields, limits=studio.limits))
    page_wave, sr = sf.read(result.wav, dtype="float32")
    assert len(page_wave) == round(sr * fields["duration"]) and result.settings["windows"] == (2 if mode == "VT2A" else 3)
    assert "inference.window_overlap_sec=0.3" in result.settings["command"]
    np.testing.assert_array_equal(page_wave, _predict_same(result, studio, tmp_path, video if mode == "VT2A" else None))


def test_an_empty_or_zero_duration_means_the_whole_video_or_the_trained_length(video):
    for empty in (None, "", 0):  # the page sends 0 for its empty number field
        whole = parse_request(**{**GOOD, "video": str(video), "duration": empty}, limits=LIMITS)
        assert whole.duration == pytest.approx(1.52)  # the fixture's 1.5 s at 25 fps: 38 frames
        assert parse_request(**{**GOOD, "duration": empty}, limits=LIMITS).duration == 1.0
    short = Limits(max_duration=1.2, trained_duration=1.0, min_video_duration=0.25)
    with pytest.raises(RequestError, match=r"The uploaded video lasts 1.52 s; this page makes clips of up to 1.2 s"):
        parse_request(**{**GOOD, "video": str(video), "duration": None}, limits=short)


def test_another_seed_or_caption_gives_another_clip_and_the_same_request_the_same(studio):
    def wave(**change):
        return sf.read(studio.run(parse_request(**{**GOOD, **change}, limits=studio.limits)).wav)[0]
    base = wave()
    np.testing.assert_array_equal(base, wave())
    assert not np.array_equal(base, wave(seed=4))
    assert not np.array_equal(base, wave(caption="a rising chirp"))


def test_compare_modes_makes_three_clips_from_one_video_and_caption(studio, video):
    req = parse_request(**{**GOOD, "video": str(video)}, limits=studio.limits)
    results = [studio.run(req.without(m)) for m in ("VT2A", "V2A", "T2A")]
    assert [r.mode for r in results] == ["VT2A", "V2A", "T2A"]
    assert len({r.folder for r in results}) == 3
    assert {r.settings["noise_seed"] for r in results} == {results[0].settings["noise_seed"]}
    waves = [sf.read(r.wav)[0] for r in results]
    assert not np.array_equal(waves[0], waves[1]) and not np.array_equal(waves[0], waves[2])


def test_a_shorter_duration_and_the_live_weights(studio):
    short = studio.run(parse_request(**{**GOOD, "duration": 0.5}, limits=studio.limits))
    assert len(sf.read(short.wav)[0]) == 8000
    assert "data.audio_duration=0.5" in short.settings["command"]
    live = studio.run(parse_request(**{**GOOD, "use_ema": False}, limits=studio.limits))
    ema = studio.run(parse_request(**GOOD, limits=studio.limits))
    assert live.settings["weights"] == "live" and "model.use_ema=false" in live.settings["command"]
    assert not np.array_equal(sf.read(live.wav)[0], sf.read(ema.wav)[0])
    assert len(sf.read(ema.wav)[0]) == 16000  # the next request is back at its own duration


def test_two_requests_at_once_get_their_own_results(studio):
    """A second user does not corrupt the first one's result: concurrent requests (one at 0.5 s,
    one at 1 s, different seeds) equal the same requests made one after the other."""
    asks = [parse_request(**{**GOOD, "seed": 11, "duration": 0.5}, limits=studio.limits),
            parse_request(**{**GOOD, "seed": 12}, limits=studio.limits)]
    alone = [sf.read(studio.run(a).wav)[0] for a in asks]
    together: list = [None, None]

    def work(i: int) -> None:
        together[i] = sf.read(studio.run(asks[i]).wav)[0]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_bad_media_and_captions_are_refused_in_words(studio, video, tmp_path):
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    with pytest.raises(RequestError, match="The upload notes.mp4 is not a video that can be read"):
        studio.run(parse_request(**{**GOOD, "video": str(not_video)}, limits=studio.limits))
    sound_only = tmp_path / "sound.wav"  # media without a single video frame
    sf.write(sound_only, np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(RequestError, match="sound.wav is not a video that can be read: .*has no video stream"):
        studio.run(parse_request(**{**GOOD, "video": str(sound_only)}, limits=studio.limits))
    short = tmp_path / "short.mp4"
    write_video(short, seconds=0.4, fps=25)
    with pytest.raises(RequestError, match="lasts 0.40 s, shorter than the requested 1 s"):
        studio.run(parse_request(**{**GOOD, "video": str(short)}, limits=studio.limits))
    with pytest.raises(RequestError, match=r"The caption has \d+ tokens; the text encoder takes at most 77"):
        studio.run(parse_request(**{**GOOD, "caption": "click " * 100}, limits=studio.limits))
    assert not list((studio.out_root / ".uploads").glob("*/*"))  # nothing left behind


def _start(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wavflow.app", *args, f"output.output_dir={tmp / 'out'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case, code, words", [
    ("missing", 3, "checkpoint not found"),
    ("preset", 2, "model.name"),
    ("port", 2, "app.port must be between 1 and 65535"),
])
def test_start_up_errors_end_with_one_line_and_their_exit_code(checkpoint, tmp_path, case, code, words):
    args = {"missing": [f"model.ckpt_path={tmp_path / 'nope.pth'}"],
            "preset": [f"model.ckpt_path={checkpoint}", "model=small_16k"],
            "port": [f"model.ckpt_path={checkpoint}", "--port", "70000"]}[case]
    proc = _start(args, tmp_path)
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert proc.returncode == code, proc.stderr[-2000:]
    assert last.startswith("[wavflow.app] error:") and words in last, last
    assert "Traceback" not in proc.stderr
