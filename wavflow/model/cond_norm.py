"""Optional per-dimension normalisation of the condition features (docs/encoders.md).

`(x - mean) / std` per feature dimension of each stream (for CLIP frames and text rescaled to
the stream's own RMS std), with statistics computed at extraction over the training rows. It
lives inside the network (frozen parameters, like
`empty_string_feat`), so full checkpoints, EMA state dicts and `ema_epoch_N.pth` files all carry
it, and training, training samples and prediction apply the same transform to every input of
`preprocess_conditions`, the learned empty tokens included. Networks without it (the reference
presets, reference checkpoints) have exactly the reference state-dict layout and numerics.

With it, the learned empty clip/sync tokens are stored as `u` with network input `u / r`, r the
RMS of the stream's stored std (`empty_token_input`; `denormalise_*` maps them to raw units
before they are mixed with real features). So AdamW's ~lr-per-element steps move them by lr/r
in *every* dimension of what the network sees: in a typical dimension that is what learning
them in raw units gives (the reference), and in a near-constant dimension it is no more. Learned
in raw units, the steps were lr/std per dimension: tens of standard deviations after a few
thousand steps where std is 1e-3, and the network overflowed (docs/benchmarks.md, "Findings
behind the recipe"). Checkpoints written before this (no `empty_token_format` key)
are converted on load by `migrate_empty_tokens`.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor, nn

PREFIX = "cond_norm."
STREAM_KEYS = {"clip": "clip_features", "sync": "sync_features", "text": "text_features"}
# std floor relative to the stream's RMS std: near-constant dimensions are not blown up.
REL_STD_FLOOR = 1e-2
# The per-dimension RMS each normalised stream gets when `rms` does not name it (the configs set
# `data.feature_norm_rms`, captions 0.3: docs/encoders.md). None keeps
# the stream's own RMS std: ~0.03 for CLIP's 1024-d unit vectors, so pooled into the global
# condition they start far below the timestep embedding. Synchformer features modulate every
# audio token and time onsets best as plain z-scores (1.0).
DEFAULT_RMS: dict[str, Optional[float]] = {"clip_features": None, "sync_features": 1.0, "text_features": None}


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
        # How the empty clip/sync tokens are stored (module docstring); absent = raw units.
        self.empty_token_format = _frozen(torch.full((1,), float(EMPTY_TOKEN_FORMAT)))

    @torch.no_grad()
    def set_statistics(
        self, streams: Mapping[str, Mapping[str, Tensor]], tag: float,
        rms: Optional[Mapping[str, Optional[float]]] = None,
    ) -> None:
        """`streams`: {"clip_features": {"mean", "std"}, ...}; a stream without statistics
        (e.g. no video rows) stays the identity. `rms`: per stream name, the per-dimension RMS
        of the normalised features (1.0: plain z-scores); None (or a stream missing from it):
        `DEFAULT_RMS`, where None keeps the stream's own RMS std."""
        for short, name in STREAM_KEYS.items():
            if name not in streams:
                continue
            mean, std = getattr(self, f"{short}_mean"), getattr(self, f"{short}_std")
            m, s = streams[name]["mean"].float(), streams[name]["std"].float()
            if m.shape != mean.shape:
                raise ValueError(f"statistics of {name} have {tuple(m.shape)} dims, the model takes {tuple(mean.shape)}")
            spread = float(s.pow(2).mean().sqrt()) + 1e-12  # the stream's RMS std
            target = (rms or {}).get(name, DEFAULT_RMS[name])
            if target is not None and not float(target) > 0:
                raise ValueError(f"the normalised RMS of {name} must be > 0 or null, got {target!r}")
            # Per dimension (x - mean) / std, scaled to the target RMS. The target sets how
            # strongly a stream enters the network at the start of training: see DEFAULT_RMS.
            keep = spread if target is None else float(target)
            mean.copy_(m)
            std.copy_(s.clamp_min(REL_STD_FLOOR * spread) / keep)
        self.source_tag.fill_(tag)

    def forward(self, clip_f: Tensor, sync_f: Tensor, text_f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (
            (clip_f - self.clip_mean.to(clip_f.dtype)) / self.clip_std.to(clip_f.dtype),
            (sync_f - self.sync_mean.to(sync_f.dtype)) / self.sync_std.to(sync_f.dtype),
            (text_f - self.text_mean.to(text_f.dtype)) / self.text_std.to(text_f.dtype),
        )

    def denormalise_clip(self, u: Tensor) -> Tensor:
        """Raw CLIP-frame units of a stored empty token (the inverse of forward, after u / r)."""
        return empty_token_input(u, self.clip_std) * self.clip_std.to(u.dtype) + self.clip_mean.to(u.dtype)

    def denormalise_sync(self, u: Tensor) -> Tensor:
        return empty_token_input(u, self.sync_std) * self.sync_std.to(u.dtype) + self.sync_mean.to(u.dtype)


EMPTY_TOKEN_FORMAT = 2  # 1 (no key): raw units; 2: u with network input u / RMS(std)
MARKER = PREFIX + "empty_token_format"
EMPTY_TOKENS = {"empty_clip_feat": "clip", "empty_sync_feat": "sync"}


def _rms(std: Tensor) -> Tensor:
    """r: the RMS of a stream's stored std, the scale between a stored empty token and its input."""
    return std.float().pow(2).mean().sqrt()


def empty_token_input(u: Tensor, std: Tensor) -> Tensor:
    """The network input (normalised units) of a stored empty token."""
    return u / _rms(std).to(u.dtype)


def migrate_empty_tokens(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A feature-normalised state dict written before `empty_token_format` (tokens in raw
    units): the same tokens in the current format, plus the key. Any other state dict is
    returned unchanged (as a dict)."""
    sd = dict(state_dict)
    if not state_has_cond_norm(sd) or MARKER in sd:
        return sd
    for key, short in EMPTY_TOKENS.items():
        stats = (f"{PREFIX}{short}_mean", f"{PREFIX}{short}_std")
        if key in sd and all(k in sd for k in stats):  # else loading names what is missing
            mean, std = (sd[k].float() for k in stats)
            z = (sd[key].float() - mean) / std  # network input; u = z * RMS(std)
            sd[key] = (z * _rms(std)).to(sd[key].dtype)
    sd[MARKER] = torch.full((1,), float(EMPTY_TOKEN_FORMAT))
    return sd


def state_has_cond_norm(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(PREFIX) for k in state_dict)
