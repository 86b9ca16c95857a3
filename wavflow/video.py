"""Video decoding at fixed frame rates, CLIP / Synchformer frame transforms, audio muxing (docs/method.md §6.2).

Frame selection runs through ffmpeg's own ``fps`` filter (PyAV filter graphs), exactly as the
reference's torio ``StreamingMediaDecoder`` did with ``frame_rate=8`` / ``25``:

* every decoded frame's PTS is rescaled to the output time base 1/fps with ``round=near``
  (half away from zero): ``r_i = round(t_i * fps)``;
* the first output slot is ``r_0`` (0 for a file that starts at t=0); slot n shows the *last*
  source frame with ``r_i <= n``, i.e. the last frame starting before (n + 0.5) / fps. This is
  not "the frame nearest n / fps": for 30 fps input, 8 fps slot 0 shows source frame 1
  (t=0.033 rounds to slot 0 and replaces frame 0), slot k shows ceil((k + 0.5) * 30 / 8) - 1;
* at end of stream the filter stops at ``round(eof * fps)`` with eof = last PTS + its duration, so
  an exactly 8.0 s clip yields 64 and 200 frames.

Using the filter itself (rather than re-implementing it) keeps VFR input, odd time bases and EOF
handling identical to ffmpeg. Decoding stops as soon as both streams have their frames.

One deliberate difference from the reference: the display-matrix rotation (phone videos) is
applied, so portrait clips come out upright; torio ignored it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import av
import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from wavflow.errors import AudioError, VideoError
from wavflow.io_utils import atomic_write_bytes
from wavflow.shapes import (
    CLIP_FPS,
    SYNC_FPS,
    SYNC_SEGMENT_FRAMES,
    SYNC_SEGMENT_STRIDE,
    clip_frame_count,
    sync_frame_count,
)

CLIP_SIZE = 384
SYNC_SIZE = 224
# Frames are transformed in batches of this many, so full-resolution frames never pile up.
_TRANSFORM_BATCH = 16


@dataclass(frozen=True)
class VideoFrames:
    """Decoded, transformed frames of one clip plus source facts for logging."""

    clip: torch.Tensor  # (T_c, 3, clip_size, clip_size) float32 in [0, 1]
    sync: torch.Tensor  # (T_s, 3, sync_size, sync_size) float32 in [-1, 1]
    source_fps: float | None  # the stream's average frame rate, if known
    source_size: tuple[int, int]  # (width, height) as displayed, i.e. after rotation
    rotation: int  # counter-clockwise display rotation applied, degrees (0, 90, 180, 270)


# --------------------------------------------------------------------------- transforms


def clip_transform(frames: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """uint8 (T,3,H,W) -> float32 (T,3,size,size) in [0,1]: bicubic resize, aspect not kept.

    Resizing runs on uint8 (antialiased, rounded back to uint8) before the float conversion,
    like the reference's ``v2.Resize((384, 384), BICUBIC)`` + ``ToDtype(float32, scale=True)``.
    """
    resized = TF.resize(frames, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.to_dtype(resized, torch.float32, scale=True)


def sync_transform(frames: torch.Tensor, size: int = SYNC_SIZE) -> torch.Tensor:
    """uint8 (T,3,H,W) -> float32 (T,3,size,size) in [-1,1]: short side to `size`, centre crop.

    Matches ``v2.Resize(224, BICUBIC)``, ``CenterCrop(224)``, ``ToDtype(scale=True)``,
    ``Normalize(0.5, 0.5)``.
    """
    resized = TF.resize(frames, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    cropped = TF.center_crop(resized, [size, size])
    return (TF.to_dtype(cropped, torch.float32, scale=True) - 0.5) / 0.5


def _rotate_upright(frames: torch.Tensor, rotation: int) -> torch.Tensor:
    """Apply a counter-clockwise display rotation (multiple of 90) to (T,3,H,W) frames."""
    k = (rotation // 90) % 4
    return torch.rot90(frames, k, dims=(-2, -1)) if k else frames


def normalise_rotation(degrees: float | int | None) -> int:
    """Snap a display-matrix angle to 0/90/180/270 (counter-clockwise)."""
    if degrees is None or not np.isfinite(degrees):
        return 0
    return int(round(float(degrees) / 90.0)) % 4 * 90


# --------------------------------------------------------------------------- decoding


class FpsStream:
    """One ffmpeg ``fps=<rate>,format=rgb24`` filter chain collecting up to `limit` frames.

    Pulled frames are rotated upright and transformed in small batches by `transform`.
    """

    def __init__(self, fps: int, limit: int, transform: Any, rotation: int) -> None:
        self.fps = fps
        self.limit = limit
        self.transform = transform
        self.rotation = rotation
        self.graph: av.filter.Graph | None = None
        self.pending: list[np.ndarray] = []
        self.done: list[torch.Tensor] = []
        self.count = 0
        self.closed = False

    @property
    def full(self) -> bool:
        return self.count >= self.limit

    def _build(self, frame: av.VideoFrame, time_base: Fraction) -> None:
        graph = av.filter.Graph()
        src = graph.add_buffer(
            width=frame.width, height=frame.height, format=frame.format, time_base=time_base
        )
        graph.link_nodes(
            src,
            graph.add("fps", f"fps={self.fps}"),
            graph.add("format", "pix_fmts=rgb24"),
            graph.add("buffersink"),
        ).configure()
        self.graph = graph

    def push(self, frame: av.VideoFrame, time_base: Fraction) -> None:
        if self.full:
            return
        if self.graph is None:
            self._build(frame, time_base)
        assert self.graph is not None
        self.graph.push(frame)
        self._drain()

    def finish(self) -> None:
        """Signal end of stream and collect the frames the filter still owes."""
        if self.graph is not None and not self.full and not self.closed:
            self.graph.push(None)
            self.closed = True
            self._drain()
        self._flush_pending()

    def _drain(self) -> None:
        assert self.graph is not None
        while not self.full:
            try:
                out = self.graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                break
            self.pending.append(out.to_ndarray(format="rgb24"))
            self.count += 1
            if len(self.pending) >= _TRANSFORM_BATCH:
                self._flush_pending()

    def _flush_pending(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        if len({a.shape for a in pending}) == 1:
            groups = [np.stack(pending)]
        else:  # the picture size changed mid-stream: transform frame by frame
            groups = [a[None] for a in pending]
        for group in groups:
            batch = torch.from_numpy(group).permute(0, 3, 1, 2).contiguous()
            self.done.append(self.transform(_rotate_upright(batch, self.rotation)))

    def result(self, channels_hw: tuple[int, int, int]) -> torch.Tensor:
        if not self.done:
            return torch.empty((0, *channels_hw), dtype=torch.float32)
        return torch.cat(self.done)


def open_input(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise VideoError(f"video file not found: {path}")
    if not path.is_file():
        raise VideoError(f"video path is not a file: {path}")
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(
            f"video file {path} could not be opened ({type(exc).__name__}: {exc}); "
            "it is corrupt, truncated or not a media file"
        ) from exc


def video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoError(f"video file {path} has no video stream")
    return container.streams.video[0]


@dataclass
class _Decoded:
    streams: list[FpsStream] | None = None  # None: no frame was decoded
    rotation: int = 0
    stored_size: tuple[int, int] = (0, 0)
    last_end: float | None = None  # end time (pts + duration) of the last decoded frame


def _decode_frames(container: Any, stream: Any, path: Path, source_fps: float | None,
                   make_streams: Callable[[int], list[FpsStream]]) -> _Decoded:
    """Feed the video's frames to the fps streams `make_streams(rotation)` builds at the first
    frame, until every stream is full or the video ends."""
    out = _Decoded()
    time_base = stream.time_base or Fraction(1, 1000)
    synth_pts = 0  # for the rare stream without timestamps
    try:
        for frame in container.decode(stream):
            if out.streams is None:
                # ffmpeg attaches the stream's display matrix to every decoded frame.
                out.rotation = normalise_rotation(getattr(frame, "rotation", 0))
                out.stored_size = (frame.width, frame.height)
                out.streams = make_streams(out.rotation)
            if frame.pts is None:
                step = int(round(1 / (float(time_base) * (source_fps or 25.0))))
                frame.pts = synth_pts
                synth_pts += max(step, 1)
            frame.time_base = time_base
            out.last_end = float((frame.pts + (frame.duration or 0)) * time_base)
            for s in out.streams:
                s.push(frame, time_base)
            if all(s.full for s in out.streams):
                break
        for s in out.streams or ():
            s.finish()
    except av.error.FFmpegError as exc:
        raise VideoError(f"video file {path} could not be decoded ({type(exc).__name__}: {exc})") from exc
    return out


def decode_video(
    path: str | os.PathLike,
    duration_sec: float = 8.0,
    *,
    clip_fps: int = CLIP_FPS,
    sync_fps: int = SYNC_FPS,
    clip_size: int = CLIP_SIZE,
    sync_size: int = SYNC_SIZE,
) -> VideoFrames:
    """Decode the first `duration_sec` of `path` into CLIP and Synchformer frames (docs/method.md §6.2).

    Returns ``clip`` (int(clip_fps*dur), 3, clip_size, clip_size) in [0, 1] and ``sync``
    (int(sync_fps*dur), 3, sync_size, sync_size) in [-1, 1]. Raises `VideoError` naming the file
    when it is missing, unreadable, has no video stream, or is shorter than needed.
    """
    path = Path(path)
    if clip_fps == CLIP_FPS and sync_fps == SYNC_FPS:
        n_clip, n_sync = clip_frame_count(duration_sec), sync_frame_count(duration_sec)
    else:
        n_clip, n_sync = int(clip_fps * duration_sec), int(sync_fps * duration_sec)
    if n_clip <= 0 or n_sync <= 0:
        raise VideoError(f"duration_sec={duration_sec} asks for no frames (decoding {path})")

    def make_streams(rotation: int) -> list[FpsStream]:
        return [
            FpsStream(clip_fps, n_clip, lambda x: clip_transform(x, clip_size), rotation),
            FpsStream(sync_fps, n_sync, lambda x: sync_transform(x, sync_size), rotation),
        ]

    container = open_input(path)
    try:
        stream = video_stream(container, path)
        stream.thread_type = "AUTO"
        source_fps = float(stream.average_rate) if stream.average_rate else None
        decoded = _decode_frames(container, stream, path, source_fps, make_streams)
    finally:
        container.close()
    streams, rotation, stored_size, last_end = decoded.streams, decoded.rotation, decoded.stored_size, decoded.last_end

    if streams is None:
        raise VideoError(f"video file {path} has no decodable video frames")
    clip_s, sync_s = streams
    if not clip_s.full or not sync_s.full:
        lasted = f"{last_end:.3f} s" if last_end is not None else "unknown length"
        raise VideoError(
            f"video file {path} is too short: {duration_sec} s needs {n_clip} frames at "
            f"{clip_fps} fps and {n_sync} at {sync_fps} fps, got {clip_s.count} and "
            f"{sync_s.count} (the video lasts {lasted})"
        )
    width, height = stored_size
    display_size = (height, width) if rotation in (90, 270) else (width, height)
    return VideoFrames(
        clip=clip_s.result((3, clip_size, clip_size)),
        sync=sync_s.result((3, sync_size, sync_size)),
        source_fps=source_fps,
        source_size=display_size,
        rotation=rotation,
    )


def sync_segments(
    sync_frames: torch.Tensor,
    segment_len: int = SYNC_SEGMENT_FRAMES,
    stride: int = SYNC_SEGMENT_STRIDE,
) -> torch.Tensor:
    """(T, 3, H, W) -> (S, segment_len, 3, H, W), segment i = frames [stride*i, stride*i+len).

    S = (T - segment_len) // stride + 1 (24 for 200 frames), docs/method.md §6.3 step 1.
    """
    if sync_frames.dim() != 4:
        raise VideoError(f"sync frames must be (T, 3, H, W), got shape {tuple(sync_frames.shape)}")
    total = sync_frames.shape[0]
    if total < segment_len:
        raise VideoError(
            f"too few sync frames for one segment: {total} < segment length {segment_len}"
        )
    count = (total - segment_len) // stride + 1
    # unfold gives (S, 3, H, W, len); move the window axis next to S.
    windows = sync_frames.unfold(0, segment_len, stride)[:count]
    return windows.permute(0, 4, 1, 2, 3).contiguous()


def video_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from container / stream metadata (no decoding)."""
    path = Path(path)
    container = open_input(path)
    try:
        stream = video_stream(container, path)
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / av.time_base
        if stream.frames and stream.average_rate:
            return stream.frames / float(stream.average_rate)
    finally:
        container.close()
    raise VideoError(f"video file {path} does not state its duration")


# --------------------------------------------------------------------------- muxing


def _mono_float32(wave: Any, out_path: Path) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(wave, dtype=np.float32)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1 or arr.size == 0:
        raise AudioError(f"audio for {out_path} must be a non-empty mono waveform, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise AudioError(f"audio for {out_path} holds NaN or infinite samples")
    return np.ascontiguousarray(arr)


def mux_audio(
    video_path: str | os.PathLike,
    wave: Any,
    sample_rate: int,
    out_path: str | os.PathLike,
) -> Path:
    """Write `out_path` (mp4): the video stream of `video_path` copied bit for bit plus `wave` as AAC.

    The input's own audio is dropped. The file appears atomically (built in memory, then temp
    file + fsync + rename), so `out_path` may equal `video_path`. `VideoError` when the input's
    video codec cannot be stored in mp4.
    """
    video_path, out_path = Path(video_path), Path(out_path)
    samples = _mono_float32(wave, out_path)
    container = open_input(video_path)
    buffer = io.BytesIO()
    try:
        in_video = video_stream(container, video_path)
        codec_name = in_video.codec_context.name
        with av.open(buffer, mode="w", format="mp4") as out:
            try:
                out_video = out.add_stream_from_template(in_video)
                out_audio = out.add_stream("aac", rate=int(sample_rate), layout="mono")
                out.start_encoding()
            except (av.error.FFmpegError, ValueError) as exc:
                raise VideoError(
                    f"the video codec '{codec_name}' of {video_path} cannot be stored in mp4 "
                    f"({type(exc).__name__}: {exc}); re-encode it (e.g. to H.264) first"
                ) from exc
            for packet in container.demux(in_video):
                if packet.dts is None:  # demuxer flush packet, carries no data
                    continue
                packet.stream = out_video
                out.mux(packet)
            frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
            frame.sample_rate = int(sample_rate)
            frame.pts = 0
            frame.time_base = Fraction(1, int(sample_rate))
            for packet in out_audio.encode(frame):
                out.mux(packet)
            for packet in out_audio.encode(None):
                out.mux(packet)
    except av.error.FFmpegError as exc:
        raise VideoError(
            f"muxing {video_path} into {out_path} failed ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        container.close()
    return atomic_write_bytes(out_path, buffer.getvalue())
