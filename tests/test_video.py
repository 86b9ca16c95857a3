"""wavflow.video: frame selection (ffmpeg fps semantics), transforms, errors, segments, muxing."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from tests.media import (
    count_video_frames,
    frame_index_of,
    index_frame,
    read_frame_times,
    sine,
    truncated_copy,
    video_packets,
    write_corrupt_video,
    write_video,
    write_wav,
)
from wavflow.errors import VideoError
from wavflow.shapes import sync_segment_count
from wavflow.video import VideoFrames, decode_video, mux_audio, sync_segments, video_duration


def ffmpeg_fps_picks(times: list[Fraction], fps: int, count: int) -> list[int]:
    """Source frame shown at each output slot of ffmpeg's `fps=<fps>` filter (round=near).

    Each source PTS goes to the output time base with round-half-away-from-zero; slot n shows the
    last source frame whose rounded PTS is <= n; slots start at the first frame's rounded PTS.
    """
    rounded = [math.floor(t * fps + Fraction(1, 2)) for t in times]
    start = rounded[0]
    return [max(i for i, r in enumerate(rounded) if r <= n) for n in range(start, start + count)]


def decoded_indices(frames: torch.Tensor, signed: bool) -> list[int]:
    return [frame_index_of(f, signed=signed) for f in frames]


# --------------------------------------------------------------------------- counts, ranges


def test_eight_seconds_gives_64_clip_and_200_sync_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "eight.mp4", seconds=8, fps=25)
    out = decode_video(path, 8.0)
    assert isinstance(out, VideoFrames)
    assert out.clip.shape == (64, 3, 384, 384) and out.clip.dtype == torch.float32
    assert out.sync.shape == (200, 3, 224, 224) and out.sync.dtype == torch.float32
    assert 0.0 <= out.clip.min() and out.clip.max() <= 1.0
    assert -1.0 <= out.sync.min() and out.sync.max() <= 1.0
    # 25 fps -> 25 fps is the identity; 25 -> 8 picks the nearest source frame.
    assert decoded_indices(out.sync, signed=True) == list(range(200))
    times = read_frame_times(path)
    assert decoded_indices(out.clip, signed=False) == ffmpeg_fps_picks(times, 8, 64)
    assert out.source_fps == pytest.approx(25.0) and out.source_size == (96, 64) and out.rotation == 0


@pytest.mark.parametrize(
    "fps, vfr, codec",
    [(25, False, "libx264"), (30, False, "libx264"), (30, False, "mpeg4"), (25, True, "libx264"), (24, True, "mpeg4")],
)
def test_frame_selection_matches_ffmpeg_fps_filter(tmp_path: Path, fps: int, vfr: bool, codec: str) -> None:
    path = write_video(tmp_path / "sel.mp4", seconds=2.2, fps=fps, vfr=vfr, codec=codec)
    times = read_frame_times(path)
    if vfr:  # the file really is irregular
        gaps = {b - a for a, b in zip(times, times[1:])}
        assert len(gaps) > 2
    out = decode_video(path, 2.0)
    assert out.clip.shape == (16, 3, 384, 384) and out.sync.shape == (50, 3, 224, 224)
    assert decoded_indices(out.clip, signed=False) == ffmpeg_fps_picks(times, 8, 16)
    assert decoded_indices(out.sync, signed=True) == ffmpeg_fps_picks(times, 25, 50)


def test_thirty_fps_hand_computed_picks(tmp_path: Path) -> None:
    """30 -> 8 fps: slot k shows the last source frame i with round(i * 8 / 30) <= k, i.e.
    i = ceil((k + 0.5) * 30 / 8) - 1 -- not the frame nearest k / 8 (slot 0 shows frame 1)."""
    path = write_video(tmp_path / "thirty.mp4", seconds=1.1, fps=30)
    out = decode_video(path, 1.0)
    assert decoded_indices(out.clip, signed=False) == [1, 5, 9, 13, 16, 20, 24, 28]
    # 30 -> 25: last i with i * 25 / 30 < n + 0.5.
    assert decoded_indices(out.sync, signed=True)[:7] == [0, 1, 2, 4, 5, 6, 7]


def test_exact_duration_clip_is_long_enough(tmp_path: Path) -> None:
    """A clip of exactly 2.0 s has 16 / 50 frames: the filter's EOF is last PTS + duration."""
    path = write_video(tmp_path / "exact.mp4", seconds=2.0, fps=25)
    assert count_video_frames(path) == 50
    out = decode_video(path, 2.0)
    assert out.clip.shape[0] == 16 and out.sync.shape[0] == 50


# --------------------------------------------------------------------------- transforms


def test_transforms_equal_reference_torchvision_pipeline(tmp_path: Path) -> None:
    """clip/sync equal the spec's v2 pipelines applied to the picked uint8 frames."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    path = write_video(
        tmp_path / "tex.mp4", seconds=0.6, fps=25, size=(64, 48), codec="mpeg4",
        frame_fn=lambda t: np.roll(base, int(t * 100), axis=1),
    )
    with av.open(str(path)) as c:
        raw = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    times = read_frame_times(path)
    frames = torch.from_numpy(np.stack(raw)).permute(0, 3, 1, 2)
    clip_ref = v2.Compose([
        v2.Resize((384, 384), interpolation=v2.InterpolationMode.BICUBIC),
        v2.ToDtype(torch.float32, scale=True),
    ])
    sync_ref = v2.Compose([
        v2.Resize(224, interpolation=v2.InterpolationMode.BICUBIC),
        v2.CenterCrop(224),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.5] * 3, std=[0.5] * 3),
    ])
    out = decode_video(path, 0.5)
    exp_clip = clip_ref(frames[ffmpeg_fps_picks(times, 8, 4)])
    exp_sync = sync_ref(frames[ffmpeg_fps_picks(times, 25, 12)])
    # Same frames, same transforms (equal here; a different swscale build may move a level).
    assert (out.clip - exp_clip).abs().max() <= 1.001 / 255
    assert (out.sync - exp_sync).abs().max() <= 2.001 / 255
    assert (out.clip - exp_clip).abs().mean() < 0.1 / 255


def _marker_frame(width: int, height: int) -> np.ndarray:
    """Grey picture, red bars on the 10 % borders of the long side, white centre square."""
    img = np.full((height, width, 3), 128, np.uint8)
    bar = max(width, height) // 10
    if width >= height:
        img[:, :bar] = img[:, -bar:] = (255, 0, 0)
    else:
        img[:bar] = img[-bar:] = (255, 0, 0)
    side = min(width, height) // 4
    cy, cx = height // 2, width // 2
    img[cy - side // 2 : cy + side // 2, cx - side // 2 : cx + side // 2] = 255
    return img


def _bright_extent(mask: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) covered by a boolean mask."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("size", [(128, 96), (96, 128), (321, 241)])
def test_sync_frames_are_centre_crops_clip_frames_are_stretched(tmp_path: Path, size: tuple[int, int]) -> None:
    width, height = size
    img = _marker_frame(width, height)
    path = write_video(tmp_path / "m.mp4", seconds=0.5, fps=25, size=size, frame_fn=lambda t: img)
    out = decode_video(path, 0.4)
    sync = out.sync[0] * 0.5 + 0.5
    clip = out.clip[0]
    assert out.source_size == size
    # Centre marker survives the crop, stays square (aspect kept) with side scaled by 224/short.
    white = (sync > 0.9).all(dim=0)
    assert white[112, 112]
    side = min(width, height) // 4 // 2 * 2
    rows, cols = _bright_extent(white)
    expected_side = side * 224 / min(width, height)
    assert abs(rows - expected_side) <= 3 and abs(cols - expected_side) <= 3
    # The red borders on the long side are cropped away (10 % bar < the cropped margin).
    redness = sync[0] - sync[1]
    assert redness.abs().max() < 0.1
    # CLIP frames keep the whole picture (bars present) and stretch the marker per axis.
    clip_red = clip[0] - clip[1] > 0.5
    assert clip_red.any()
    c_rows, c_cols = _bright_extent((clip > 0.9).all(dim=0))
    assert abs(c_rows - side * 384 / height) <= 4 and abs(c_cols - side * 384 / width) <= 4


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_rotated_video_comes_out_upright(tmp_path: Path, rotate: int) -> None:
    width, height = 96, 128  # portrait, as displayed
    img = np.full((height, width, 3), 40, np.uint8)
    img[: height // 4, : width // 4] = 230  # marker in the upright top-left corner
    path = write_video(tmp_path / "rot.mp4", seconds=0.5, size=(width, height), rotate=rotate, frame_fn=lambda t: img)
    with av.open(str(path)) as c:  # stored sideways/upside down, with a display matrix
        first = next(c.decode(video=0))
        assert first.rotation % 360 == rotate  # PyAV reports e.g. 270 as -90
    out = decode_video(path, 0.4)
    assert out.rotation == rotate and out.source_size == (width, height)
    clip = out.clip[0].mean(dim=0)
    assert clip[:80, :80].mean() > 0.8  # top-left quadrant (scaled by 4 / 3 and 3)
    assert clip[-150:, :].mean() < 0.25 and clip[:, -150:].mean() < 0.25


# --------------------------------------------------------------------------- audio tracks, errors


def test_video_with_audio_track_decodes_the_same(tmp_path: Path) -> None:
    path = write_video(tmp_path / "aud.mp4", seconds=1.1, fps=25, with_audio=True)
    with av.open(str(path)) as c:
        assert len(c.streams.audio) == 1
    out = decode_video(path, 1.0)
    assert decoded_indices(out.sync, signed=True) == list(range(25))


def test_too_short_video_raises_with_duration(tmp_path: Path) -> None:
    path = write_video(tmp_path / "short.mp4", seconds=3, fps=25)
    with pytest.raises(VideoError, match="short") as info:
        decode_video(path, 8.0)
    msg = str(info.value)
    assert "short.mp4" in msg and "3.000 s" in msg and "200" in msg and "75" in msg


def test_missing_corrupt_truncated_and_audio_only_files(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="not found.*nope.mp4"):
        decode_video(tmp_path / "nope.mp4", 1.0)
    corrupt = write_corrupt_video(tmp_path / "corrupt.mp4")
    with pytest.raises(VideoError, match="corrupt.mp4"):
        decode_video(corrupt, 1.0)
    good = write_video(tmp_path / "good.mp4", seconds=1.1, fps=25)
    cut = truncated_copy(good, tmp_path / "cut.mp4", 0.5)  # moov atom at the end is lost
    with pytest.raises(VideoError, match="cut.mp4"):
        decode_video(cut, 1.0)
    wav = write_wav(tmp_path / "only_audio.wav", sine(440, 0.5, 16000), 16000)
    with pytest.raises(VideoError, match="only_audio.wav has no video stream"):
        decode_video(wav, 0.4)
    with pytest.raises(VideoError, match="corrupt.mp4"):
        video_duration(corrupt)


def test_video_duration_reads_metadata(tmp_path: Path) -> None:
    path = write_video(tmp_path / "d.mp4", seconds=1.6, fps=25)
    assert video_duration(path) == pytest.approx(1.6, abs=0.05)


# --------------------------------------------------------------------------- segments


def test_sync_segments_are_stride_8_windows() -> None:
    frames = torch.arange(200 * 3 * 2 * 2, dtype=torch.float32).reshape(200, 3, 2, 2)
    segs = sync_segments(frames)
    assert segs.shape == (24, 16, 3, 2, 2) == (sync_segment_count(8.0), 16, 3, 2, 2)
    for i in range(24):
        assert torch.equal(segs[i], frames[8 * i : 8 * i + 16])
    assert sync_segments(frames[:50]).shape[0] == sync_segment_count(2.0) == 5
    with pytest.raises(VideoError, match="too few sync frames"):
        sync_segments(frames[:15])


# --------------------------------------------------------------------------- muxing


def test_mux_audio_copies_video_and_adds_aac(tmp_path: Path) -> None:
    src = write_video(tmp_path / "in.mp4", seconds=1.2, fps=25, with_audio=True)
    sr = 16000
    wave = sine(1000.0, 1.5, sr, amp=0.4)
    out_path = mux_audio(src, torch.from_numpy(wave), sr, tmp_path / "sub" / "out.mp4")
    assert out_path == tmp_path / "sub" / "out.mp4"
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["out.mp4"]  # no temp left
    with av.open(str(src)) as a, av.open(str(out_path)) as b:
        assert [s.type for s in b.streams] == ["video", "audio"]
        assert b.streams.video[0].codec_context.name == a.streams.video[0].codec_context.name
        audio = b.streams.audio[0]
        assert audio.codec_context.name == "aac" and audio.sample_rate == sr and audio.channels == 1
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in b.decode(audio)])
    # Copied, not re-encoded: identical packet payloads and frame count.
    assert video_packets(out_path) == video_packets(src)
    assert count_video_frames(out_path) == count_video_frames(src)
    # AAC: the 1024-sample encoder priming is trimmed on decode, the last frame is padded to a
    # multiple of 1024, so the decoded length is len(wave) .. len(wave) + 1024.
    assert len(wave) <= len(decoded) <= len(wave) + 1024
    # It is our 1 kHz tone (not the input's 440 Hz one): spectral peak at 1 kHz.
    spectrum = np.abs(np.fft.rfft(decoded[2000:18000]))
    assert np.fft.rfftfreq(16000, 1 / sr)[spectrum.argmax()] == pytest.approx(1000.0, abs=2)


def test_mux_audio_in_place_and_bad_codec(tmp_path: Path) -> None:
    src = write_video(tmp_path / "v.mp4", seconds=0.6, fps=25)
    before = video_packets(src)
    mux_audio(src, sine(300.0, 0.5, 8000), 8000, src)  # out == in: safe, built in memory first
    assert video_packets(src) == before
    with av.open(str(src)) as c:
        assert len(c.streams.audio) == 1
    raw = tmp_path / "raw.avi"
    with av.open(str(raw), mode="w") as out:
        stream = out.add_stream("rawvideo", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(3):
            frame = av.VideoFrame.from_ndarray(index_frame(k, 32, 32), format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(VideoError, match="rawvideo.*raw.avi.*mp4"):
        mux_audio(raw, np.zeros(800, np.float32), 8000, tmp_path / "raw_out.mp4")
    assert not (tmp_path / "raw_out.mp4").exists()
