"""Decode the frames of many overlapping windows of one video in a single pass (docs/long_form.md).

Window k gets exactly the frames `decode_video` would give for a clip cut from the video at the
window's start: every decoded frame is fed, with its timestamp moved back by the window's start,
to the window's own ffmpeg `fps` filters (8 fps for CLIP, 25 fps for Synchformer). The frame on
screen at the start (the last one that began before it) is the window's frame 0. Windows are
yielded as soon as they are complete, so only the windows that are still open are held in memory,
whatever the video's length.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Sequence

import av
import torch

from wavflow.errors import VideoError
from wavflow.shapes import CLIP_FPS, SYNC_FPS, clip_frame_count, sync_frame_count
from wavflow.video import (
    CLIP_SIZE,
    SYNC_SIZE,
    FpsStream,
    VideoFrames,
    clip_transform,
    normalise_rotation,
    open_input,
    sync_transform,
    video_stream,
)

# At the end of a video whose stated length is a frame longer than its decodable frames, the
# last window may lack its last frame or two; they repeat the window's last frame.
END_FRAMES_REPEATED = 2


class _Window:
    def __init__(self, start_pts: int, n_clip: int, n_sync: int, rotation: int) -> None:
        self.start_pts = start_pts
        self.streams = [
            FpsStream(CLIP_FPS, n_clip, lambda x: clip_transform(x, CLIP_SIZE), rotation),
            FpsStream(SYNC_FPS, n_sync, lambda x: sync_transform(x, SYNC_SIZE), rotation),
        ]
        self.opened = False

    @property
    def full(self) -> bool:
        return all(s.full for s in self.streams)

    def push(self, frame: av.VideoFrame, pts: int, time_base: Fraction) -> None:
        frame.pts = max(pts - self.start_pts, 0)
        for s in self.streams:
            s.push(frame, time_base)


def decode_windows(path: str | os.PathLike, starts_sec: Sequence[float], duration_sec: float) -> Iterator[VideoFrames]:
    """Frames of the windows [start, start + duration) of `path`, in the order of `starts_sec`
    (which must be non-decreasing). VideoError naming the file when it cannot be read or ends
    before the last window does."""
    path = Path(path)
    starts = [float(s) for s in starts_sec]
    if any(b < a for a, b in zip(starts, starts[1:])) or (starts and starts[0] < 0):
        raise ValueError(f"window starts must be >= 0 and non-decreasing, got {starts[:5]}...")
    n_clip, n_sync = clip_frame_count(duration_sec), sync_frame_count(duration_sec)
    if n_clip <= 0 or n_sync <= 0:
        raise VideoError(f"window duration {duration_sec} s asks for no frames (decoding {path})")
    container = open_input(path)
    try:
        stream = video_stream(container, path)
        stream.thread_type = "AUTO"
        yield from _decode(container, stream, path, starts, duration_sec, n_clip, n_sync)
    except av.error.FFmpegError as exc:
        raise VideoError(f"video file {path} could not be decoded ({type(exc).__name__}: {exc})") from exc
    finally:
        container.close()


def _decode(container: Any, stream: Any, path: Path, starts: list[float], duration_sec: float,
            n_clip: int, n_sync: int) -> Iterator[VideoFrames]:
    time_base = stream.time_base or Fraction(1, 1000)
    source_fps = float(stream.average_rate) if stream.average_rate else None
    start_pts = [int(round(s / time_base)) for s in starts]
    windows: list[_Window] = []  # open windows, oldest first
    next_window, emitted = 0, 0
    previous, rotation, size, last_end = None, 0, (0, 0), 0.0
    synth_pts = 0
    for frame in container.decode(stream):
        if frame.pts is None:  # the rare stream without timestamps: even spacing
            frame.pts = synth_pts
            synth_pts += max(int(round(1 / (float(time_base) * (source_fps or 25.0)))), 1)
        pts = int(frame.pts)
        frame.time_base = time_base
        if previous is None:  # the first frame: ffmpeg attaches the display matrix to every frame
            rotation = normalise_rotation(getattr(frame, "rotation", 0))
            size = (frame.width, frame.height)
        last_end = float((pts + (frame.duration or 0)) * time_base)
        while next_window < len(starts) and start_pts[next_window] <= pts:
            window = _Window(start_pts[next_window], n_clip, n_sync, rotation)
            if previous is not None and start_pts[next_window] < pts:
                window.push(previous[0], previous[1], time_base)  # the frame on screen at the start
            windows.append(window)
            next_window += 1
        for window in windows:
            window.push(frame, pts, time_base)
        while windows and windows[0].full:
            yield _result(windows.pop(0), path, source_fps, size, rotation, duration_sec, last_end, final=False)
            emitted += 1
        if emitted == len(starts):
            return
        previous = (frame, pts)
    if previous is None:
        raise VideoError(f"video file {path} has no decodable video frames")
    while next_window < len(starts):  # windows starting after the last frame began
        window = _Window(start_pts[next_window], n_clip, n_sync, rotation)
        window.push(previous[0], previous[1], time_base)
        windows.append(window)
        next_window += 1
    for window in windows:
        yield _result(window, path, source_fps, size, rotation, duration_sec, last_end, final=True)


def _result(window: _Window, path: Path, source_fps: float | None, size: tuple[int, int], rotation: int, duration_sec: float,
            last_end: float, *, final: bool) -> VideoFrames:
    clip_s, sync_s = window.streams
    for s in window.streams:
        s.finish()  # transform the frames still pending (and, at the video's end, flush the filter)
    missing = max(clip_s.limit - clip_s.count, sync_s.limit - sync_s.count)
    if missing > (END_FRAMES_REPEATED if final else 0) or clip_s.count == 0 or sync_s.count == 0:
        raise VideoError(
            f"video file {path} is too short for a {duration_sec:g} s window: it needs {clip_s.limit} frames at "
            f"{CLIP_FPS} fps and {sync_s.limit} at {SYNC_FPS} fps, got {clip_s.count} and {sync_s.count} "
            f"(the video lasts {last_end:.3f} s)"
        )
    clip, sync = clip_s.result((3, CLIP_SIZE, CLIP_SIZE)), sync_s.result((3, SYNC_SIZE, SYNC_SIZE))
    if clip.shape[0] < clip_s.limit:
        clip = _repeat_last(clip, clip_s.limit)
    if sync.shape[0] < sync_s.limit:
        sync = _repeat_last(sync, sync_s.limit)
    width, height = size
    display = (height, width) if rotation in (90, 270) else (width, height)
    return VideoFrames(clip=clip, sync=sync, source_fps=source_fps, source_size=display, rotation=rotation)


def _repeat_last(frames: torch.Tensor, count: int) -> torch.Tensor:
    """Pad (T, ...) frames to `count` by repeating the last one."""
    extra = frames[-1:].expand(count - frames.shape[0], *frames.shape[1:])
    return torch.cat([frames, extra])
