"""Derived lengths shared by data, model, extraction and inference (docs/method.md §1, §6.3)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CLIP_FPS = 8
SYNC_FPS = 25
SYNC_SEGMENT_FRAMES = 16
SYNC_SEGMENT_STRIDE = 8
SYNC_TOKENS_PER_SEGMENT = 8


def target_num_samples(sample_rate: int, duration_sec: float) -> int:
    """round(sr * duration): the length of a trimmed clip."""
    return int(round(sample_rate * duration_sec))


def latent_seq_len(sample_rate: int, duration_sec: float, audio_dim: int = 200) -> int:
    """N = ceil(target_samples / audio_dim): the number of waveform patches."""
    return int(math.ceil(target_num_samples(sample_rate, duration_sec) / audio_dim))


def clip_frame_count(duration_sec: float) -> int:
    """CLIP frames decoded for a clip: int(8 * duration)."""
    return int(CLIP_FPS * duration_sec)


def sync_frame_count(duration_sec: float) -> int:
    """Synchformer frames decoded for a clip: int(25 * duration)."""
    return int(SYNC_FPS * duration_sec)


def sync_segment_count(duration_sec: float) -> int:
    """Overlapping 16-frame segments with stride 8 (24 for 8 s)."""
    frames = sync_frame_count(duration_sec)
    if frames < SYNC_SEGMENT_FRAMES:
        return 0
    return (frames - SYNC_SEGMENT_FRAMES) // SYNC_SEGMENT_STRIDE + 1


def video_seq_lens(duration_sec: float) -> tuple[int, int]:
    """(clip_seq_len, sync_seq_len) of features extracted from `duration_sec` of video."""
    return clip_frame_count(duration_sec), SYNC_TOKENS_PER_SEGMENT * sync_segment_count(duration_sec)


@dataclass(frozen=True)
class FeatureShapes:
    """(length, width) of each condition stream: the one place they are read from a data config
    (data.{clip,sync,text}_{seq_len,dim}) or a network, for extraction, training and inference."""

    clip: tuple[int, int]
    sync: tuple[int, int]
    text: tuple[int, int]

    @classmethod
    def from_data_config(cls, data: Any) -> "FeatureShapes":
        return cls(
            clip=(int(data.clip_seq_len), int(data.clip_dim)),
            sync=(int(data.sync_seq_len), int(data.sync_dim)),
            text=(int(data.text_seq_len), int(data.text_dim)),
        )

    @classmethod
    def of_model(cls, model: Any) -> "FeatureShapes":
        """What a built network expects (WavFlowNet keeps the lengths and widths it was made for)."""
        return cls(
            clip=(int(model.clip_seq_len), int(model.clip_dim)),
            sync=(int(model.sync_seq_len), int(model.sync_dim)),
            text=(int(model.text_seq_len), int(model.text_dim)),
        )

    def by_key(self, with_video: bool = True) -> dict[str, tuple[int, int]]:
        """{"text_features": ..., "clip_features": ..., "sync_features": ...} as feature files
        name them; without video, text only (a T2A file)."""
        out = {"text_features": self.text}
        if with_video:
            out.update(clip_features=self.clip, sync_features=self.sync)
        return out
