"""What one generated item is conditioned on, and the sampler settings of a run.

Shared by the generator (`wavflow.generator`) and windowed generation (`wavflow.long_form`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


@dataclass(frozen=True)
class SamplingSettings:
    """What one sampling run uses besides the config's sampling.* keys (WavFlowGenerator.sampling_settings)."""

    cfg: float
    steps: int
    method: str
    cfg_interval: Optional[list[float]]
    batched_cfg: bool
