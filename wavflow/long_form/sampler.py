"""Windowed generation of clips longer than the trained duration (docs/long_form.md).

Every clip gets one noise signal of its whole length (from its seed); window k samples the
slice of it under the window, with the window's own video features and the clip's caption.
Windows after the first are sampled with their overlap fixed to the audio already made
(KnownAudio: the network sees that audio re-noised with the same noise at every ODE step), so
the window continues the sound instead of starting a new one; a linear crossfade over the
overlap then joins them. Window k of every clip in a batch is sampled together, and the
windows of one clip run one after another: memory is that of one window batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TYPE_CHECKING

import torch
from torch import Tensor

from wavflow.errors import ConfigError
from wavflow.conditions import ConditionFeatures, KnownAudio
from wavflow.long_form.plan import plan_windows, resolve_overlap, WindowPlan
from wavflow.long_form.video_windows import decode_windows
from wavflow.shapes import target_num_samples

if TYPE_CHECKING:  # the generator imports this module
    from wavflow.generator import WavFlowGenerator

# Windows whose frames are decoded and encoded together (the encoders' batch).
ENCODE_BATCH = 8


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
    pending = []
    starts = [plan.start_sec(k) for k in range(plan.count)]
    for frames in decode_windows(video, starts, gen.duration):
        pending.append(frames)
        if len(pending) == ENCODE_BATCH:
            out += _encode(gen, pending, text, video)
            pending = []
    if pending:
        out += _encode(gen, pending, text, video)
    return out


def _encode(gen: "WavFlowGenerator", frames: list, text: Optional[Tensor], video: Any) -> list[ConditionFeatures]:
    clip, sync = gen.encode_video_frames(frames, where=f"features of video {video}")
    return [ConditionFeatures(clip=c, sync=s, text=text) for c, s in zip(clip, sync)]


def clip_noise(gen: "WavFlowGenerator", seed: int, plan: WindowPlan, noise_scale: Optional[float] = None) -> Tensor:
    """One noise signal (samples, in token units) covering every window of the clip."""
    scale = float(gen.cfg.sampling.noise_scale if noise_scale is None else noise_scale)
    span = gen.model.latent_seq_len * gen.model.latent_dim
    length = plan.starts[-1] + span
    return torch.randn(length, generator=torch.Generator().manual_seed(int(seed))) * scale


def generate_long(gen: "WavFlowGenerator", items: Sequence[LongFormItem], *,
                  on_window: Optional[Callable[[int, int], None]] = None, **sampling: Any) -> list[Tensor]:
    """Sample every clip of `items` in its windows -> one (total_samples,) float32 CPU wave each.

    `sampling` takes generate_batch's keywords (cfg, steps, method, cfg_interval, batched_cfg,
    noise_scale). `on_window(k, count)` is called after window k of the batch is done.
    """
    n_tokens, dim = int(gen.model.latent_seq_len), int(gen.model.latent_dim)
    span = n_tokens * dim
    for it in items:
        if it.plan.window_samples != gen.num_samples or len(it.windows) != it.plan.count:
            raise ValueError("a long-form item's plan does not fit this generator or its windows")
    noises = [clip_noise(gen, it.seed, it.plan, sampling.get("noise_scale")) for it in items]
    outs = [torch.zeros(it.plan.total_samples) for it in items]
    count = max(it.plan.count for it in items)
    gen.last_model_calls_total = 0
    for k in range(count):
        active = [i for i, it in enumerate(items) if k < it.plan.count]
        x0 = torch.stack([noises[i][items[i].plan.starts[k]: items[i].plan.starts[k] + span] for i in active])
        known = None
        if k > 0:
            wave = torch.zeros(len(active), span)
            mask = torch.zeros(len(active), span, dtype=torch.bool)
            for j, i in enumerate(active):
                start, n_known = items[i].plan.starts[k], items[i].plan.known_samples(k)
                wave[j, :n_known] = outs[i][start: start + n_known]
                mask[j, :n_known] = True
            known = KnownAudio(wave=wave, mask=mask)
        waves = gen.generate_batch([items[i].windows[k] for i in active], [items[i].seed for i in active],
                                   initial_noise=x0.reshape(len(active), n_tokens, dim), known=known,
                                   trim=False, **sampling)
        gen.last_model_calls_total += gen.last_model_calls
        for j, i in enumerate(active):
            _place(outs[i], waves[j], items[i].plan, k)
        if on_window is not None:
            on_window(k, count)
    return outs


def _place(out: Tensor, wave: Tensor, plan: WindowPlan, k: int) -> None:
    """Write window k into the clip: a linear crossfade over the overlap, then its own audio."""
    start, n_known = plan.starts[k], plan.known_samples(k)
    end = min(start + plan.window_samples, plan.total_samples)
    wave = wave[: end - start]
    if n_known:
        ramp = torch.arange(1, n_known + 1, dtype=torch.float32) / (n_known + 1)
        out[start: start + n_known] = (1 - ramp) * out[start: start + n_known] + ramp * wave[:n_known]
    out[start + n_known: end] = wave[n_known:]
