"""The math of one training micro-step (docs/method.md §8.3 steps 2-6), separate from the loop.

Randomness is drawn from the trainer's own generator, in the reference order:
t (randn(B) -> logit-normal), x0 (normal_ like x1), rand(B) for the video drop,
rand(B) for the text drop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wavflow.model.flow import flow_loss, interpolate, sample_t, shift_time


@dataclass
class StepNoise:
    t: Tensor  # (B,) logit-normal times, before the shift
    x0: Tensor  # like x1
    u_video: Tensor  # (B,) uniform draws for the video drop
    u_text: Tensor  # (B,) uniform draws for the text drop


def draw_step_noise(
    generator: torch.Generator, x1: Tensor, *, mean: float, scale: float, noise_scale: float,
    uniform_frac: float = 0.0,
) -> StepNoise:
    batch = x1.shape[0]
    device = generator.device
    t = sample_t(batch, generator=generator, mean=mean, scale=scale, uniform_frac=uniform_frac, device=device)
    x0 = torch.empty(x1.shape, dtype=x1.dtype, device=device).normal_(generator=generator) * noise_scale
    u_video = torch.rand(batch, generator=generator, device=device)
    u_text = torch.rand(batch, generator=generator, device=device)
    return StepNoise(t=t, x0=x0, u_video=u_video, u_text=u_text)


def _rows(mask: Tensor) -> Tensor:
    return mask.reshape(-1, 1, 1)


def fill_missing_modalities(
    model: nn.Module, clip_f: Tensor, sync_f: Tensor, text_f: Tensor, video_exist: Tensor, text_exist: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows without video get the learned empty clip/sync tokens; rows without text the
    learned empty string. torch.where keeps the empty tokens in the graph on every step, so
    DDP sees a gradient for them even when no row is missing."""
    bs = clip_f.shape[0]
    video = _rows(video_exist.to(torch.bool))
    text = _rows(text_exist.to(torch.bool))
    clip_f = torch.where(video, clip_f, model.empty_clip_sequence(bs).to(clip_f.dtype))
    sync_f = torch.where(video, sync_f, model.empty_sync_sequence(bs).to(sync_f.dtype))
    text_f = torch.where(text, text_f, model.empty_string_sequence(bs).to(text_f.dtype))
    return clip_f, sync_f, text_f


def apply_label_drop(
    model: nn.Module, clip_f: Tensor, sync_f: Tensor, text_f: Tensor, noise: StepNoise, drop_prob: float,
    text_drop_prob: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CFG drop: video (clip AND sync) is replaced with probability `drop_prob`, text
    independently with `text_drop_prob` (default: `drop_prob`, the reference's single rate).
    Returns the conditions and the (B,) drop masks."""
    bs = clip_f.shape[0]
    null_video = noise.u_video < drop_prob
    null_text = noise.u_text < (drop_prob if text_drop_prob is None else text_drop_prob)
    clip_f = torch.where(_rows(null_video), model.empty_clip_sequence(bs).to(clip_f.dtype), clip_f)
    sync_f = torch.where(_rows(null_video), model.empty_sync_sequence(bs).to(sync_f.dtype), sync_f)
    text_f = torch.where(_rows(null_text), model.empty_string_sequence(bs).to(text_f.dtype), text_f)
    return clip_f, sync_f, text_f, null_video, null_text


@dataclass
class StepOutput:
    loss: Tensor  # scalar: batch mean of the per-sample loss
    per_sample: Tensor  # (B,) detached
    t_s: Tensor  # (B,) shifted times, detached


def flow_matching_loss(
    forward: nn.Module,
    x1: Tensor,
    clip_f: Tensor,
    sync_f: Tensor,
    text_f: Tensor,
    noise: StepNoise,
    *,
    prediction_type: str,
    loss_type: str,
    noise_shift: float,
    min_sigma: float,
) -> StepOutput:
    """Interpolate, run the network at t_s, and take the configured loss (docs/method.md §3)."""
    t_s = shift_time(noise.t, noise_shift)
    xt = interpolate(noise.x0, x1, t_s, min_sigma)
    pred = forward(xt, clip_f, sync_f, text_f, t_s)
    per = flow_loss(pred, noise.x0, x1, xt, t_s, prediction_type=prediction_type, loss_type=loss_type, min_sigma=min_sigma)
    return StepOutput(loss=per.mean(), per_sample=per.detach(), t_s=t_s.detach())
