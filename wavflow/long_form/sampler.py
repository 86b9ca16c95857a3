"""Windowed generation of clips longer than the trained duration (docs/long_form.md).

Every clip gets one noise signal of its whole length (from its seed); window k starts from the
slice of it under the window and is conditioned on the window's own video features and the
clip's caption. All windows take each ODE step together, and at every step neighbours get one
prediction for the audio they share (share_overlaps): a linear crossfade across their overlap
from the earlier window's prediction to the later one's. Their states therefore stay equal in
the overlap, so each window continues the sound its neighbours are making instead of starting
a new one, and the clip is one signal with no seam to hide. The network runs
`window_batch` windows at a time: memory is that of one window batch (plus one state of a
window's length per window).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TYPE_CHECKING

import torch
from torch import Tensor

from wavflow.conditions import ConditionFeatures
from wavflow.errors import ConfigError
from wavflow.long_form.plan import plan_windows, resolve_overlap, WindowPlan
from wavflow.long_form.video_windows import decode_windows
from wavflow.shapes import target_num_samples
from wavflow.video import VideoFrames

if TYPE_CHECKING:  # the generator imports this module
    from wavflow.generator import WavFlowGenerator

# Windows whose frames are decoded and encoded together (the encoders' batch).
ENCODE_BATCH = 8
DEFAULT_WINDOW_BATCH = 16  # inference.window_batch when a config has none


@dataclass
class LongFormItem:
    """One clip to generate in windows: its plan, each window's conditions, its seed."""

    plan: WindowPlan
    windows: list[ConditionFeatures]
    seed: int


def clip_plan(gen: "WavFlowGenerator", length_sec: float, overlap_sec: Optional[float]) -> WindowPlan:
    """Windows of the generator's trained duration covering `length_sec` seconds."""
    if not (isinstance(length_sec, (int, float)) and math.isfinite(length_sec) and length_sec > 0):
        raise ConfigError(f"duration must be a positive number of seconds, got {length_sec!r}")
    overlap = resolve_overlap(overlap_sec, gen.duration)
    total = target_num_samples(gen.sample_rate, length_sec)
    window = gen.num_samples
    return plan_windows(total, window, max(1, min(window - 1, round(overlap * gen.sample_rate))), gen.sample_rate)


def encode_windows(gen: "WavFlowGenerator", plan: WindowPlan, *, video: str | os.PathLike | None,
                   text: Optional[Tensor]) -> list[ConditionFeatures]:
    """Conditions of every window: the window's own CLIP/Synchformer features (decoded in one
    pass over the video, encoded ENCODE_BATCH windows at a time) and the clip's text features."""
    if video is None:
        return [ConditionFeatures(text=text) for _ in range(plan.count)]
    gen.check_video_lengths()
    out: list[ConditionFeatures] = []
    pending: list[VideoFrames] = []
    starts = [plan.start_sec(k) for k in range(plan.count)]
    for frames in decode_windows(video, starts, gen.duration):
        pending.append(frames)
        if len(pending) == ENCODE_BATCH:
            out += _encode(gen, pending, text, video)
            pending = []
    if pending:
        out += _encode(gen, pending, text, video)
    return out


def _encode(gen: "WavFlowGenerator", frames: list[VideoFrames], text: Optional[Tensor],
            video: str | os.PathLike) -> list[ConditionFeatures]:
    clip, sync = gen.encode_video_frames(frames, where=f"features of video {video}")
    return [ConditionFeatures(clip=c, sync=s, text=text) for c, s in zip(clip, sync)]


def clip_noise(gen: "WavFlowGenerator", seed: int, plan: WindowPlan, noise_scale: Optional[float] = None) -> Tensor:
    """One noise signal (samples, in token units) under every window of the clip."""
    scale = float(gen.cfg.sampling.noise_scale if noise_scale is None else noise_scale)
    length = plan.starts[-1] + gen.model.latent_seq_len * gen.model.latent_dim
    return torch.randn(length, generator=torch.Generator().manual_seed(int(seed))) * scale


@dataclass(frozen=True)
class _ClipWindows:
    """Where one clip's windows sit in the flat window list and on the clip's time axis."""

    rows: tuple[int, ...]  # index of each window in the flat list
    starts: tuple[int, ...]  # samples
    overlaps: tuple[int, ...]  # samples window k shares with window k-1 (k >= 1)


def _window_layout(items: Sequence[LongFormItem]) -> tuple[list[tuple[int, int]], list[_ClipWindows]]:
    windows = [(i, k) for i, it in enumerate(items) for k in range(it.plan.count)]
    index = {w: n for n, w in enumerate(windows)}
    clips = [_ClipWindows(rows=tuple(index[(i, k)] for k in range(it.plan.count)), starts=it.plan.starts,
                          overlaps=tuple(it.plan.known_samples(k) for k in range(1, it.plan.count)))
             for i, it in enumerate(items)]
    return windows, clips


def share_overlaps(pred: Tensor, clips: Sequence[_ClipWindows]) -> Tensor:
    """One prediction for each clip's time axis, written back into every window of it
    (pred: (windows, span) samples).

    Where window k overlaps window k-1, the prediction crossfades linearly from the earlier
    window's (weight 1 at the overlap's start) to window k's (weight 1 at its end), so each
    moment is decided mostly by the window that sees it nearer its centre. Every window then
    takes the same step wherever windows overlap, so their states stay equal there at every
    step: a window sees the audio its neighbours are making, at the current noise level, and
    continues it.
    """
    span = pred.shape[1]
    for clip in clips:
        axis = pred.new_zeros(clip.starts[-1] + span)
        axis[:span] = pred[clip.rows[0]]
        for k in range(1, len(clip.rows)):
            start, overlap = clip.starts[k], clip.overlaps[k - 1]
            w = ((torch.arange(span, dtype=pred.dtype, device=pred.device) + 0.5) / overlap).clamp(max=1)
            axis[start: start + span] = (1 - w) * axis[start: start + span] + w * pred[clip.rows[k]]
        for k, row in enumerate(clip.rows):
            pred[row] = axis[clip.starts[k]: clip.starts[k] + span]
    return pred


@torch.inference_mode()
def generate_long(gen: "WavFlowGenerator", items: Sequence[LongFormItem], *, window_batch: Optional[int] = None,
                  noise_scale: Optional[float] = None, on_step: Optional[Callable[[int], None]] = None,
                  **sampling: Any) -> list[Tensor]:
    """Sample every clip of `items` in its windows -> one (total_samples,) float32 CPU wave each.

    All windows (of every clip) take each ODE step together, `window_batch` windows per network
    call (default inference.window_batch); `sampling` takes generate_batch's keywords (cfg,
    steps, method, cfg_interval, batched_cfg). `on_step(n)` is called after the sampler's n-th
    evaluation (every window once), as generate_batch's for one clip (progress bars).
    """
    n_tokens, dim = int(gen.model.latent_seq_len), int(gen.model.latent_dim)
    span = n_tokens * dim
    for it in items:
        if it.plan.window_samples != gen.num_samples or len(it.windows) != it.plan.count:
            raise ValueError("a long-form item's plan does not fit this generator or its windows")
    settings = gen.sampling_settings(**sampling)
    windows, layout = _window_layout(items)
    noises = [clip_noise(gen, it.seed, it.plan, noise_scale) for it in items]
    x0 = torch.stack([noises[i][items[i].plan.starts[k]: items[i].plan.starts[k] + span] for i, k in windows])
    size = int(window_batch or gen.cfg.inference.get("window_batch", DEFAULT_WINDOW_BATCH))
    chunks = [list(range(a, min(a + size, len(windows)))) for a in range(0, len(windows), size)]
    gen.last_model_calls = 0  # network calls (one per window batch per sampler evaluation)
    evaluations = 0
    with gen.sampling_context():
        guided = [gen.guided_network([items[windows[n][0]].windows[windows[n][1]] for n in chunk], settings)
                  for chunk in chunks]

        def fn(t: Tensor, x: Tensor) -> Tensor:
            nonlocal evaluations
            pred = torch.cat([g(t, x[chunk].reshape(len(chunk), n_tokens, dim)).reshape(len(chunk), span)
                              for chunk, g in zip(chunks, guided)])
            gen.last_model_calls += len(chunks)
            evaluations += 1
            if on_step is not None:
                on_step(evaluations)
            return share_overlaps(pred.to(x.dtype), layout)

        x1 = gen.solve(fn, x0.to(gen.device), settings)
    x1 = x1.float().cpu() / gen.audio_scale
    outs = [torch.zeros(it.plan.total_samples) for it in items]
    for n, (i, k) in enumerate(windows):
        _place(outs[i], x1[n], items[i].plan, k)
    return outs


def _place(out: Tensor, wave: Tensor, plan: WindowPlan, k: int) -> None:
    """Write window k into the clip: a linear crossfade over the overlap (the windows agree
    there, so it changes nothing unless they do not), then its own audio."""
    start, n_known = plan.starts[k], plan.known_samples(k)
    end = min(start + plan.window_samples, plan.total_samples)
    wave = wave[: end - start]
    if n_known:
        ramp = torch.arange(1, n_known + 1, dtype=torch.float32) / (n_known + 1)
        out[start: start + n_known] = (1 - ramp) * out[start: start + n_known] + ramp * wave[:n_known]
    out[start + n_known: end] = wave[n_known:]
