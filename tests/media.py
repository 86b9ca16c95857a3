"""Synthetic media files for tests (shared by every test module; keep the API stable).

Import as ``from tests.media import write_video, ...``.

Video helpers
-------------
``write_video(path, *, seconds, fps=25, size=(96, 64), ...) -> Path``
    A small mp4 written with PyAV. With the default ``pattern="frame_index"`` frame k is two flat
    grey bands that encode k (top band: k % 16, bottom band: k // 16, grey level 16 + 14*j), which
    survives H.264/MPEG-4 compression and any resize; read it back with ``frame_index_of``.
    ``frame_fn(t_sec) -> (H, W, 3) uint8`` draws custom (upright) content instead.
    ``vfr=True`` spaces frames irregularly (durations cycle through 0.5, 1.5, 0.75, 1.25, 1.0
    frame periods; the mean rate stays `fps`). ``rotate`` (0/90/180/270, counter-clockwise like
    PyAV's ``VideoFrame.rotation``) stores the pixels turned the other way and sets the display
    matrix, so a rotation-aware decoder shows the drawn (upright) content; ``size`` is always the
    upright (displayed) size. ``libx264`` needs even sizes with 4:2:0, so odd sizes switch to
    4:4:4 (``mpeg4`` handles odd sizes itself).
``frame_index_of(image) -> int``
    Decode the index drawn by ``pattern="frame_index"`` from a (3, H, W) image: float in [0, 1],
    float in [-1, 1] (pass ``signed=True``) or uint8.
``read_frame_times(path) -> list[Fraction]``
    Presentation times (s) of every frame of the first video stream, in display order, read
    with plain PyAV (no WavFlow code).
``count_video_frames(path) -> int``, ``video_packets(path) -> list[bytes]``.
``write_corrupt_video(path)``: garbage bytes named like a video. ``truncated_copy(src, dst,
fraction)``: the first `fraction` of the bytes of `src`.

Audio helpers
-------------
``sine(freq, seconds, sr, amp=0.5) -> np.ndarray`` float32; ``write_wav(path, wave, sr,
subtype="FLOAT") -> Path`` (soundfile; mono 1-D or (T, C)).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import soundfile as sf

__all__ = [
    "write_video",
    "frame_index_of",
    "index_frame",
    "read_frame_times",
    "count_video_frames",
    "video_packets",
    "write_corrupt_video",
    "truncated_copy",
    "sine",
    "write_wav",
    "VFR_PATTERN",
]

# Grey level of digit j in the frame-index pattern: steps of 14 tolerate compression noise.
_LEVEL_BASE = 16
_LEVEL_STEP = 14
_DIGITS = 16
# Frame durations of vfr=True, in units of the nominal frame period (mean 1.0).
VFR_PATTERN = (Fraction(1, 2), Fraction(3, 2), Fraction(3, 4), Fraction(5, 4), Fraction(1))


def index_frame(k: int, width: int, height: int) -> np.ndarray:
    """The (H, W, 3) uint8 picture of frame `k` in the frame-index pattern (k < 256)."""
    if not 0 <= k < _DIGITS * _DIGITS:
        raise ValueError(f"frame index {k} does not fit the pattern (0..255)")
    img = np.empty((height, width, 3), np.uint8)
    half = height // 2
    img[:half] = _LEVEL_BASE + _LEVEL_STEP * (k % _DIGITS)
    img[half:] = _LEVEL_BASE + _LEVEL_STEP * (k // _DIGITS)
    return img


def frame_index_of(image, signed: bool = False) -> int:
    """Read the frame index from a (3, H, W) image (torch or numpy) in the frame-index pattern."""
    raw = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    arr = raw.astype(np.float64)
    if not np.issubdtype(raw.dtype, np.integer):  # float images: rescale to 0..255
        arr = (arr * 0.5 + 0.5 if signed else arr) * 255.0
    _, h, w = arr.shape
    cols = slice(w // 4, max(w // 4 + 1, 3 * w // 4))

    def digit(row: int) -> int:
        band = arr[:, max(row - 1, 0) : row + 2, cols].mean()
        return int(np.clip(round((band - _LEVEL_BASE) / _LEVEL_STEP), 0, _DIGITS - 1))

    return digit(h // 4) + _DIGITS * digit(3 * h // 4)


def _frame_times(seconds: float, fps: Fraction, vfr: bool) -> list[Fraction]:
    """Presentation times of the frames to write, all < seconds."""
    period = 1 / fps
    times: list[Fraction] = []
    t = Fraction(0)
    k = 0
    while t < Fraction(seconds).limit_denominator(10**6):
        times.append(t)
        t += period * (VFR_PATTERN[k % len(VFR_PATTERN)] if vfr else 1)
        k += 1
    return times


def write_video(
    path: str | os.PathLike,
    *,
    seconds: float,
    fps: float | Fraction = 25,
    size: tuple[int, int] = (96, 64),
    with_audio: bool = False,
    audio_sr: int = 16000,
    vfr: bool = False,
    rotate: int = 0,
    pattern: str = "frame_index",
    codec: str = "libx264",
    frame_fn: Callable[[float], np.ndarray] | None = None,
) -> Path:
    """Write a synthetic mp4 (see the module docstring) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    if rotate % 90:
        raise ValueError(f"rotate must be a multiple of 90, got {rotate}")
    k_rot = (rotate // 90) % 4
    stored_w, stored_h = (height, width) if k_rot % 2 else (width, height)
    if frame_fn is None and pattern != "frame_index":
        raise ValueError(f"unknown pattern {pattern!r} (use 'frame_index' or frame_fn)")

    fps_q = Fraction(fps).limit_denominator(100000)
    times = _frame_times(seconds, fps_q, vfr)
    # VFR needs a fine time base; CFR uses one tick per frame (exact for any rate).
    time_base = Fraction(1, 90000) if vfr else 1 / fps_q
    if codec == "mpeg4" and time_base.denominator > 65535:
        time_base = Fraction(1, 1000) if vfr else time_base
    odd = width % 2 or height % 2

    with av.open(str(path), mode="w") as out:
        vstream = out.add_stream(codec, rate=fps_q)
        vstream.width, vstream.height = stored_w, stored_h
        vstream.pix_fmt = "yuv444p" if (odd and codec == "libx264") else "yuv420p"
        vstream.codec_context.time_base = time_base
        if codec == "libx264":
            vstream.options = {"preset": "ultrafast", "crf": "10"}
        else:
            vstream.codec_context.bit_rate = 2_000_000
        if k_rot:
            vstream.set_display_rotation(rotate)
        astream = out.add_stream("aac", rate=audio_sr, layout="mono") if with_audio else None

        for k, t in enumerate(times):
            upright = frame_fn(float(t)) if frame_fn is not None else index_frame(k, width, height)
            if upright.shape != (height, width, 3) or upright.dtype != np.uint8:
                raise ValueError(f"frame_fn must return ({height}, {width}, 3) uint8, got {upright.shape} {upright.dtype}")
            # Store the picture turned clockwise by `rotate`; the display matrix turns it back.
            stored = np.ascontiguousarray(np.rot90(upright, -k_rot)) if k_rot else upright
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = int(round(t / time_base))
            frame.time_base = time_base
            for packet in vstream.encode(frame):
                out.mux(packet)
        for packet in vstream.encode(None):
            out.mux(packet)

        if astream is not None:
            wave = sine(440.0, seconds, audio_sr, amp=0.3)
            aframe = av.AudioFrame.from_ndarray(wave[None, :], format="flt", layout="mono")
            aframe.sample_rate = audio_sr
            aframe.pts = 0
            aframe.time_base = Fraction(1, audio_sr)
            for packet in astream.encode(aframe):
                out.mux(packet)
            for packet in astream.encode(None):
                out.mux(packet)
    return path


def read_frame_times(path: str | os.PathLike) -> list[Fraction]:
    """Exact presentation times of all frames of the first video stream, in display order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [Fraction(f.pts) * stream.time_base for f in container.decode(stream)]


def count_video_frames(path: str | os.PathLike) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def video_packets(path: str | os.PathLike) -> list[bytes]:
    """Payloads of the video packets of the first video stream, in file order."""
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(container.streams.video[0]) if p.size]


def write_corrupt_video(path: str | os.PathLike, size: int = 4096) -> Path:
    """Deterministic garbage bytes under a video file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def truncated_copy(src: str | os.PathLike, dst: str | os.PathLike, fraction: float) -> Path:
    """Copy the first `fraction` (0..1) of the bytes of `src` to `dst`."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    """amp * sin(2 pi f t) as float32, round(seconds * sr) samples."""
    t = np.arange(int(round(seconds * sr)), dtype=np.float64) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: str | os.PathLike, wave, sr: int, subtype: str = "FLOAT") -> Path:
    """soundfile.write of a mono (T,) or multi-channel (T, C) waveform (torch or numpy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(wave.detach().cpu() if hasattr(wave, "detach") else wave, dtype=np.float32)
    sf.write(str(path), arr, sr, subtype=subtype)
    return path
