"""Derived lengths shared by data, model, extraction and inference (docs/method.md §1, §6.3)."""

from __future__ import annotations

import math

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
