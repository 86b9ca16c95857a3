"""Frames for ImageBind's video embedding: 0.5 fps over the clip, short side 224 (bicubic).

The frame choice is ffmpeg's `fps` filter, the same filter chain `wavflow.video` uses for the
CLIP / Synchformer streams (and the field's torio decoder used).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from wavflow.errors import VideoError
from wavflow.evaluate.models import IMAGEBIND_SIZE, IMAGEBIND_VIDEO_FPS
from wavflow.video import FpsStream, normalise_rotation, open_input, video_stream


def _transform(frames: torch.Tensor) -> torch.Tensor:
    resized = TF.resize(frames, IMAGEBIND_SIZE, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.to_dtype(resized, torch.float32, scale=True)


def decode_imagebind_frames(path: str | Path, duration_sec: float, fps: float = IMAGEBIND_VIDEO_FPS) -> torch.Tensor:
    """(int(fps * duration), 3, H', W') float32 in [0, 1], short side 224; VideoError if too short."""
    path = Path(path)
    count = int(fps * duration_sec)
    if count < 2:
        raise VideoError(f"{duration_sec} s at {fps} fps gives {count} frame(s); ImageBind needs 2 ({path})")
    container = open_input(path)
    try:
        stream = video_stream(container, path)
        time_base = stream.time_base or Fraction(1, 1000)
        fps_stream: FpsStream | None = None
        try:
            for frame in container.decode(stream):
                if fps_stream is None:
                    rotation = normalise_rotation(getattr(frame, "rotation", 0))
                    fps_stream = FpsStream(fps, count, _transform, rotation)  # type: ignore[arg-type]
                if frame.pts is None:
                    raise VideoError(f"video file {path} has frames without timestamps")
                frame.time_base = time_base
                fps_stream.push(frame, time_base)
                if fps_stream.full:
                    break
            if fps_stream is not None:
                fps_stream.finish()
        except av.error.FFmpegError as exc:
            raise VideoError(f"video file {path} could not be decoded ({type(exc).__name__}: {exc})") from exc
    finally:
        container.close()
    if fps_stream is None or not fps_stream.full:
        got = 0 if fps_stream is None else fps_stream.count
        raise VideoError(f"video file {path} is too short: {duration_sec} s needs {count} frames at {fps} fps, got {got}")
    return torch.cat(fps_stream.done)
