"""Optional per-dimension normalisation of the condition features (docs/encoders.md).

`(x - mean) / std` per feature dimension of each stream (for CLIP frames and text rescaled to
the stream's own RMS std), with statistics computed at extraction over the training rows. It
lives inside the network (frozen parameters, like
`empty_string_feat`), so full checkpoints, EMA state dicts and `ema_epoch_N.pth` files all carry
it, and training, training samples and prediction apply the same transform to every input of
`preprocess_conditions`, the learned empty tokens included. Networks without it (the reference
presets, reference checkpoints) have exactly the reference state-dict layout and numerics.

With it, the learned empty clip/sync tokens are stored and learned in the normalised units the
network sees (`denormalise_*` maps them back to raw units before they are mixed with real
features). Learned in raw units, AdamW moves every element ~lr per step whatever the
dimension's spread, so in a near-constant dimension (std 1e-3) a few thousand steps put the token
tens of standard deviations out and the network overflows (docs/benchmarks.md, root cause of
the learning benchmark's NaN). Checkpoints written before this (no `empty_tokens_normalised`
key) are converted on load by `migrate_empty_tokens`.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

PREFIX = "cond_norm."
STREAM_KEYS = {"clip": "clip_features", "sync": "sync_features", "text": "text_features"}
# std floor relative to the stream's RMS std: near-constant dimensions are not blown up.
REL_STD_FLOOR = 1e-2
KEEP_SCALE = ("clip", "text")  # streams rescaled to their own RMS std after z-scoring


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class ConditionNorm(nn.Module):
    """Frozen mean/std per stream and the 52-bit tag of the encoders that made the statistics."""

    def __init__(self, clip_dim: int, sync_dim: int, text_dim: int) -> None:
        super().__init__()
        for short, dim in (("clip", clip_dim), ("sync", sync_dim), ("text", text_dim)):
            setattr(self, f"{short}_mean", _frozen(torch.zeros(dim)))
            setattr(self, f"{short}_std", _frozen(torch.ones(dim)))
        self.source_tag = _frozen(torch.zeros(1, dtype=torch.float64))
        # Marks the empty clip/sync tokens as stored in normalised units (module docstring).
        self.empty_tokens_normalised = _frozen(torch.ones(1))

    @torch.no_grad()
    def set_statistics(self, streams: Mapping[str, Mapping[str, Tensor]], tag: float) -> None:
        """`streams`: {"clip_features": {"mean", "std"}, ...}; a stream without statistics
        (e.g. no video rows) stays the identity."""
        for short, name in STREAM_KEYS.items():
            if name not in streams:
                continue
            mean, std = getattr(self, f"{short}_mean"), getattr(self, f"{short}_std")
            m, s = streams[name]["mean"].float(), streams[name]["std"].float()
            if m.shape != mean.shape:
                raise ValueError(f"statistics of {name} have {tuple(m.shape)} dims, the model takes {tuple(mean.shape)}")
            spread = float(s.pow(2).mean().sqrt()) + 1e-12  # the stream's RMS std
            # Per dimension (x - mean) / std. CLIP frames and text are pooled into the global
            # condition beside the timestep embedding: they keep their stream's overall scale
            # (times the RMS std), since plain z-scores (~30x larger for 1024-d unit vectors)
            # swamp it. Synchformer features modulate each audio token: plain z-scores
            # (docs/benchmarks.md has the ablation).
            keep = spread if short in KEEP_SCALE else 1.0
            mean.copy_(m)
            std.copy_(s.clamp_min(REL_STD_FLOOR * spread) / keep)
        self.source_tag.fill_(tag)

    def forward(self, clip_f: Tensor, sync_f: Tensor, text_f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (
            (clip_f - self.clip_mean.to(clip_f.dtype)) / self.clip_std.to(clip_f.dtype),
            (sync_f - self.sync_mean.to(sync_f.dtype)) / self.sync_std.to(sync_f.dtype),
            (text_f - self.text_mean.to(text_f.dtype)) / self.text_std.to(text_f.dtype),
        )

    def denormalise_clip(self, z: Tensor) -> Tensor:
        """Raw CLIP-frame units of a token given in normalised units (the inverse of forward)."""
        return z * self.clip_std.to(z.dtype) + self.clip_mean.to(z.dtype)

    def denormalise_sync(self, z: Tensor) -> Tensor:
        return z * self.sync_std.to(z.dtype) + self.sync_mean.to(z.dtype)


MARKER = PREFIX + "empty_tokens_normalised"
EMPTY_TOKENS = {"empty_clip_feat": "clip", "empty_sync_feat": "sync"}


def migrate_empty_tokens(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A feature-normalised state dict written before the empty tokens were learned in
    normalised units (no marker): the same tokens, converted to normalised units, plus the
    marker. Any other state dict is returned unchanged (as a dict)."""
    sd = dict(state_dict)
    if not state_has_cond_norm(sd) or MARKER in sd:
        return sd
    for key, short in EMPTY_TOKENS.items():
        if key in sd:
            mean, std = sd[f"{PREFIX}{short}_mean"].float(), sd[f"{PREFIX}{short}_std"].float()
            sd[key] = ((sd[key].float() - mean) / std).to(sd[key].dtype)
    sd[MARKER] = torch.ones(1)
    return sd


def state_has_cond_norm(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(PREFIX) for k in state_dict)
