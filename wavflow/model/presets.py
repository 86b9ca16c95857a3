"""Network presets (docs/method.md §1).

The four reference presets reproduce `tests/data/wavflow_*.json` and pin the condition lengths and
widths their checkpoints were trained with. The CPU-sized presets keep the same structure
(joint blocks with a pre-only last one, then fused blocks, head width 64) and take condition
lengths and widths from the data config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Condition shapes used when neither the preset nor the caller gives one (configs/base.yaml).
DEFAULT_CONDITION_SHAPES: dict[str, int] = {
    "clip_seq_len": 64,
    "sync_seq_len": 192,
    "text_seq_len": 77,
    "clip_dim": 1024,
    "sync_dim": 768,
    "text_dim": 1024,
}
CONDITION_FIELDS = tuple(DEFAULT_CONDITION_SHAPES)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    latent_dim: int  # samples per waveform patch
    hidden_dim: int
    num_heads: int
    depth: int  # joint + fused blocks
    fused_depth: int
    mlp_ratio: float
    default_latent_seq_len: int
    clip_seq_len: Optional[int] = None
    sync_seq_len: Optional[int] = None
    text_seq_len: Optional[int] = None
    clip_dim: Optional[int] = None
    sync_dim: Optional[int] = None
    text_dim: Optional[int] = None

    @property
    def joint_depth(self) -> int:
        return self.depth - self.fused_depth

    def pinned(self) -> dict[str, int]:
        """Condition shapes this preset fixes (its checkpoints depend on them)."""
        return {f: getattr(self, f) for f in CONDITION_FIELDS if getattr(self, f) is not None}


def _reference(name: str, depth: int, fused_depth: int, n: int) -> ModelPreset:
    return ModelPreset(
        name=name,
        latent_dim=200,
        hidden_dim=896,
        num_heads=14,
        depth=depth,
        fused_depth=fused_depth,
        mlp_ratio=4.0,
        default_latent_seq_len=n,
        **DEFAULT_CONDITION_SHAPES,
    )


def _cpu_sized(name: str, hidden_dim: int, depth: int, fused_depth: int, mlp_ratio: float) -> ModelPreset:
    return ModelPreset(
        name=name,
        latent_dim=200,
        hidden_dim=hidden_dim,
        num_heads=hidden_dim // 64,
        depth=depth,
        fused_depth=fused_depth,
        mlp_ratio=mlp_ratio,
        default_latent_seq_len=640,
    )


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        _reference("medium_16k", 12, 8, 640),
        _reference("medium_44k", 12, 8, 1764),
        _reference("large_16k", 21, 14, 640),
        _reference("large_44k", 21, 14, 1764),
        # 2 joint blocks (the last pre-only) + 2 fused blocks. The k=7 input convs and the
        # 1024-wide condition inputs dominate at these widths: tiny ~5.9 M, small ~14.5 M.
        _cpu_sized("tiny_16k", hidden_dim=128, depth=4, fused_depth=2, mlp_ratio=2.0),
        _cpu_sized("small_16k", hidden_dim=256, depth=4, fused_depth=2, mlp_ratio=1.0),
    )
}
