"""Audio pipeline: loading (soundfile + PyAV), amplitude lifting, patchify, writing, loudness."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from wavflow.audio import (
    amplitude_lift,
    crop_or_pad,
    load_audio,
    load_audio_tokens,
    loudness_normalize,
    patchify,
    unpatchify,
    write_wav,
)
from wavflow.errors import AudioError

SR = 16000


def _sine(freq=440.0, seconds=1.0, amp=0.01, sr=SR):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _rms(x):
    return float(torch.sqrt(torch.mean(torch.as_tensor(x, dtype=torch.float64) ** 2)))


# ----------------------------------------------------------------------------- lifting


def test_quiet_sine_lifted_to_rms_033():
    w = torch.from_numpy(_sine(amp=0.01))
    out = amplitude_lift(w)
    assert abs(_rms(out) - 0.33) < 1e-5
    # a sine at RMS 0.33 peaks at 0.467: no peak limiting, no clamping
    torch.testing.assert_close(out, w * (0.33 / _rms(w)), rtol=1e-5, atol=1e-6)


def test_spike_with_high_rms_scaled_by_one_over_peak():
    # +-1 square wave with one spike of 3.2: crest factor ~3.19, so after RMS 0.33 the peak
    # is ~1.05 and rms2 / peak ~0.314 > 0.3 -> the whole clip is scaled by 1/peak.
    w = torch.ones(1000)
    w[1::2] = -1.0
    w[10] = 3.2
    scaled = w * 0.33 / torch.sqrt(torch.mean(w**2))
    peak, rms2 = float(scaled.abs().max()), _rms(scaled)
    assert peak > 1.0 and rms2 / peak > 0.3  # the case under test
    out = amplitude_lift(w)
    torch.testing.assert_close(out, scaled * (1 / peak))
    assert float(out.abs().max()) == pytest.approx(1.0, abs=1e-6)
    assert _rms(out) == pytest.approx(0.33 / peak, rel=1e-5)


def test_spike_with_low_rms_left_unscaled_then_clamped():
    w = torch.from_numpy(_sine(amp=0.1))
    w[100] = 5.0  # big spike: after RMS 0.33 the peak is ~4, and rms2/peak ~0.08 <= 0.3
    scaled = w * 0.33 / torch.sqrt(torch.mean(w**2))
    peak, rms2 = float(scaled.abs().max()), _rms(scaled)
    assert peak > 1.0 and rms2 / peak <= 0.3
    out = amplitude_lift(w)
    torch.testing.assert_close(out, scaled.clamp(-1, 1))
    assert float(out[100]) == 1.0
    assert abs(_rms(out) - 0.33) < 0.05  # the body of the signal was not shrunk by 1/peak


def test_amplitude_lift_zeros_stay_zeros():
    out = amplitude_lift(torch.zeros(500))
    assert torch.equal(out, torch.zeros(500))


# ----------------------------------------------------------------------------- shapes


def test_crop_or_pad_and_patchify_round_trip():
    w = torch.arange(1000, dtype=torch.float32)
    assert crop_or_pad(w, 600).tolist() == list(range(600))
    padded = crop_or_pad(w, 1200)
    assert padded.shape == (1200,) and torch.equal(padded[:1000], w) and not padded[1000:].any()
    tokens = patchify(padded)
    assert tokens.shape == (6, 200)
    assert torch.equal(tokens[2], torch.arange(400, 600, dtype=torch.float32))
    assert torch.equal(unpatchify(tokens), padded)
    batch = torch.stack([tokens, tokens * 2])
    assert torch.equal(unpatchify(batch), torch.stack([padded, padded * 2]))
    with pytest.raises(ValueError, match="multiple of audio_dim"):
        patchify(w[:999])


# ----------------------------------------------------------------------------- loading


def test_formats_resample_and_downmix(tmp_path):
    mono = _sine(amp=0.25)
    for suffix in ("wav", "flac", "ogg"):
        path = tmp_path / f"a.{suffix}"
        sf.write(path, mono, SR)
        w = load_audio(path, SR)
        assert w.dtype == torch.float32 and w.shape == (SR,)
        assert abs(_rms(w) - _rms(mono)) < (0.02 if suffix == "ogg" else 1e-4)  # ogg is lossy
        if suffix != "ogg":
            np.testing.assert_allclose(w.numpy(), mono, atol=1e-4)
    stereo = np.stack([mono, np.zeros_like(mono)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, SR, subtype="FLOAT")
    torch.testing.assert_close(load_audio(tmp_path / "s.wav", SR), torch.from_numpy(mono) / 2)
    sf.write(tmp_path / "hi.wav", _sine(amp=0.25, sr=44100, seconds=0.5), 44100)
    assert load_audio(tmp_path / "hi.wav", SR).shape == (8000,)


def test_resampling_is_the_reference_transform_bit_for_bit(tmp_path):
    import torchaudio

    wave = np.random.default_rng(0).uniform(-0.8, 0.8, 22050).astype(np.float32)
    sf.write(tmp_path / "r.wav", wave, 44100, subtype="FLOAT")
    expected = torchaudio.transforms.Resample(44100, SR)(torch.from_numpy(wave))
    assert torch.equal(load_audio(tmp_path / "r.wav", SR), expected)


def test_mp4_with_aac_track_loads_through_pyav(tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    x = _sine(amp=0.5, seconds=0.5)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=SR)
        stream.layout = "mono"
        for i in range(0, len(x), 1024):
            chunk = np.ascontiguousarray(x[None, i : i + 1024])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = SR, i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    w = load_audio(path, SR)
    assert w.dtype == torch.float32 and w.ndim == 1
    assert len(x) <= w.shape[0] <= len(x) + 2048  # AAC adds priming/padding frames
    assert abs(_rms(w) - _rms(x)) < 0.03


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.wav"
    with pytest.raises(AudioError, match="missing.wav"):
        load_audio(missing, SR)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match="empty.wav.*zero length"):
        load_audio(empty, SR)
    nan = tmp_path / "nan.wav"
    data = _sine()
    data[5] = np.nan
    sf.write(nan, data, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav.*NaN"):
        load_audio(nan, SR)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 50)
    with pytest.raises(AudioError, match="garbage.wav"):
        load_audio(garbage, SR)
    no_audio = tmp_path / "noaudio.mp4"
    no_audio.write_bytes(b"\x00" * 64)
    with pytest.raises(AudioError, match="noaudio.mp4"):
        load_audio(no_audio, SR)


def test_load_audio_tokens_pipeline(tmp_path):
    x = _sine(amp=0.05, seconds=0.3)
    path = tmp_path / "a.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    tokens = load_audio_tokens(path, SR, 0.5, audio_dim=200, audio_scale=3.0)
    assert tokens.shape == (40, 200)  # ceil(8000 / 200)
    lifted = torch.from_numpy(x) * 0.33 / torch.sqrt(torch.mean(torch.from_numpy(x) ** 2))
    flat = unpatchify(tokens)
    torch.testing.assert_close(flat[: len(x)], lifted * 3.0)
    assert not flat[len(x) :].any()  # zero padding at the end
    # cropping keeps the start; RMS is measured on the whole file before the crop
    tokens_short = load_audio_tokens(path, SR, 0.1)
    torch.testing.assert_close(unpatchify(tokens_short), lifted[:1600] * 3.0)


def test_silent_audio_raises_in_tokens(tmp_path):
    path = tmp_path / "quiet.wav"
    sf.write(path, np.zeros(4000, np.float32), SR)
    with pytest.raises(AudioError, match="quiet.wav.*silent"):
        load_audio_tokens(path, SR, 0.25)


# ----------------------------------------------------------------------------- writing


def test_write_wav_round_trip_and_atomic(tmp_path):
    x = torch.from_numpy(_sine(amp=0.7, seconds=0.2))
    out = tmp_path / "sub" / "o.wav"
    write_wav(out, x, SR)
    data, sr = sf.read(out, dtype="float32")
    info = sf.info(out)
    assert sr == SR and info.subtype == "FLOAT" and info.channels == 1
    np.testing.assert_array_equal(data, x.numpy())
    assert [p.name for p in out.parent.iterdir()] == ["o.wav"]  # no temp file left behind
    bad = x.clone()
    bad[3] = float("inf")
    with pytest.raises(AudioError, match="bad.wav"):
        write_wav(tmp_path / "bad.wav", bad, SR)
    assert not (tmp_path / "bad.wav").exists()


def test_loudness_normalize_noise_and_silence():
    import pyloudnorm as pyln

    g = np.random.default_rng(0)
    noise = torch.from_numpy((0.05 * g.standard_normal(SR)).astype(np.float32))
    out, measured = loudness_normalize(noise, SR, -23.0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert math.isfinite(measured) and measured < -23.0
    after = pyln.Meter(SR).integrated_loudness(out.numpy().astype(np.float64))
    assert abs(after - (-23.0)) < 0.5
    # loud target: the gain pushes the peak over 1, so it is limited to 0.99
    loud, _ = loudness_normalize(noise, SR, -3.0)
    assert float(loud.abs().max()) == pytest.approx(0.99, abs=1e-6)
    silence = torch.zeros(SR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out_s, measured_s = loudness_normalize(silence, SR)
        short, measured_short = loudness_normalize(noise[:100], SR)
    assert out_s is silence and not torch.isnan(out_s).any()
    assert not math.isfinite(measured_s) or measured_s <= -70
    assert short is not None and torch.equal(short, noise[:100])


def test_container_without_audio_stream(tmp_path):
    import av

    path = tmp_path / "video_only.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(AudioError, match="video_only.mp4 has no audio stream"):
        load_audio(path, SR)


def test_probe_audio_accepts_what_load_audio_reads_and_names_what_it_cannot(tmp_path):
    from tests.media import write_video
    from wavflow.audio import probe_audio

    good = tmp_path / "good.flac"
    sf.write(good, _sine(), SR)
    probe_audio(good)
    with_audio = write_video(tmp_path / "clip.mp4", seconds=1.0, with_audio=True)
    probe_audio(with_audio)  # a container: PyAV decodes its first audio frame
    cases = {
        "text.wav": (lambda p: p.write_text("not audio\n"), "could not be opened"),
        "empty.wav": (lambda p: p.write_bytes(b""), "could not be opened"),
        "zero.wav": (lambda p: sf.write(p, np.zeros(0, dtype=np.float32), SR), "zero length"),
        "silent.mp4": (lambda p: write_video(p, seconds=1.0), "no audio stream"),
    }
    for name, (make, reason) in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(AudioError, match=f"{name}.*{reason}"):
            probe_audio(path)
    with pytest.raises(AudioError, match="audio file not found"):
        probe_audio(tmp_path / "absent.wav")
    with pytest.raises(AudioError, match="audio file not found"):
        probe_audio(tmp_path)  # a directory given as a file
