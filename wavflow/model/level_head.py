"""Optional loudness head: each clip's loudness predicted from its conditions (docs/method.md §2.15).

Amplitude lifting trains every clip at one level (RMS 0.33 before the ×3 scale), so the flow
network cannot know how loud a sound was recorded, and prediction gives every clip the same
loudness. Where the data's clips differ in level by class (soft clicks beside loud tones), one
target loudness makes the soft classes 15-20 dB too loud (docs/benchmarks.md, "The demo").

The head mixes one expert per condition stream, each a small MLP on that stream pooled over
its length, as the flow network sees it (learned empty tokens for a missing modality, after the
feature normalisation when one is attached):

    (m_s, a_s) = MLP_s(LN(mean_L f_s)),  s in (clip, sync, text)
    lufs = LEVEL_OFFSET_LUFS + LEVEL_UNIT_DB · Σ_s softmax_s(a) · m_s

with LN a LayerNorm without parameters: each expert predicts the level from its stream alone
and how far to trust it, so a missing stream (its empty tokens) learns a low weight and a
caption or a video alone still sets the level. One MLP over the three streams together fitted
the combinations of the training rows and missed held-out VT2A clips by up to 11-14 dB
(docs/benchmarks.md, "The demo"). It is trained beside the flow loss on the BS.1770 integrated
loudness of each training clip's whole file before the lifting, with the loss
((lufs - target) / LEVEL_UNIT_DB)² over the rows whose loudness is measurable. Its inputs are
detached and its gradient is clipped on its own: the head learns from the conditions but never
changes them or the flow network's steps. The last layers start at zero, so every clip starts
at LEVEL_OFFSET_LUFS.

It is attached like the spectral skip (spectral_skip.py): networks without it keep the
reference state-dict layout; weights that carry `level_head.*` tensors attach it when loaded.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PREFIX = "level_head."
LEVEL_OFFSET_LUFS = -23.0  # the method's fixed output loudness (docs/method.md §5): the head's start
LEVEL_UNIT_DB = 10.0  # the head's output unit: the loss is in (10 dB)²
HIDDEN = 128  # per expert


class LevelHead(nn.Module):
    def __init__(self, clip_dim: int, sync_dim: int, text_dim: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 2)) for dim in (clip_dim, sync_dim, text_dim)]
        )
        for expert in self.experts:  # (level, weight) = (0, 0): every clip at LEVEL_OFFSET_LUFS
            nn.init.zeros_(expert[2].weight)
            nn.init.zeros_(expert[2].bias)

    def forward(self, clip_f: Tensor, sync_f: Tensor, text_f: Tensor) -> Tensor:
        """Predicted loudness in LUFS, (B,), from condition sequences (B, L, D) of each stream."""
        out = torch.stack([expert(F.layer_norm(f.detach().float().mean(dim=1), (f.shape[-1],)))
                           for expert, f in zip(self.experts, (clip_f, sync_f, text_f))], dim=1)  # (B, 3, 2)
        weights = torch.softmax(out[..., 1], dim=1)
        return LEVEL_OFFSET_LUFS + LEVEL_UNIT_DB * (weights * out[..., 0]).sum(dim=1)


def level_loss(predicted_lufs: Tensor, target_lufs: Tensor) -> Tensor:
    """Mean of ((predicted - target) / LEVEL_UNIT_DB)² over the rows with a finite target; a
    zero that keeps the graph when no row has one (every rank still reduces the head's gradient)."""
    target = target_lufs.to(predicted_lufs.device, torch.float32)
    known = torch.isfinite(target)
    err = ((predicted_lufs.float() - torch.where(known, target, 0.0)) / LEVEL_UNIT_DB) ** 2
    return (err * known).sum() / known.sum().clamp(min=1)


def state_has_level_head(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(PREFIX) for k in state_dict)
