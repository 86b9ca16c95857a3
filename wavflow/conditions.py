"""What one generated item is conditioned on, and audio fixed in advance (docs/long_form.md).

Shared by the generator (`wavflow.generator`) and windowed generation (`wavflow.long_form`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class ConditionFeatures:
    """Encoded conditions of one item; None means "use the learned empty tokens"."""

    clip: Optional[Tensor] = None  # (clip_seq_len, clip_dim)
    sync: Optional[Tensor] = None  # (sync_seq_len, sync_dim)
    text: Optional[Tensor] = None  # (text_seq_len, text_dim)

    @property
    def kind(self) -> str:
        video, text = self.clip is not None, self.text is not None
        return {(True, True): "VT2A", (False, True): "T2A", (True, False): "V2A"}.get((video, text), "unconditional")


@dataclass
class KnownAudio:
    """Audio fixed in advance for part of each item (long-form windows: the overlap with the
    window before). `wave` and `mask` are (B, N*latent_dim) waveforms / booleans in samples.

    The sampler's prediction is replaced by the oracle one wherever `mask` is set: for
    x-prediction the known audio itself, for v-prediction its velocity from the item's own noise.
    Along the straight path x_t = (1-t) x0 + t x1 this keeps the masked part of the state equal
    to the known audio re-noised with the item's noise at every step, so the network sees it at
    the noise level it expects, and the sample ends on it exactly (docs/long_form.md).
    """

    wave: Tensor
    mask: Tensor

    def prediction_override(self, x0: Tensor, audio_scale: float, prediction_type: str,
                            min_sigma: float) -> tuple[Tensor, Tensor]:
        """(mask, value) in token space (B, N, latent_dim)."""
        shape = x0.shape
        if tuple(self.wave.shape) != (shape[0], shape[1] * shape[2]) or self.mask.shape != self.wave.shape:
            raise ValueError(f"known audio must be (B, N*latent_dim) = {(shape[0], shape[1] * shape[2])}, "
                             f"got wave {tuple(self.wave.shape)} and mask {tuple(self.mask.shape)}")
        mask = self.mask.to(x0.device, torch.bool).reshape(shape)
        tokens = (self.wave.to(x0.device, torch.float32) * audio_scale).reshape(shape)
        value = tokens if prediction_type == "x" else tokens - (1 - min_sigma) * x0
        return mask, value
