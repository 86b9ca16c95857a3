"""Synchformer visual feature extractor (MotionFormer, divided space-time attention).

Numerics follow docs/method.md §7; the state-dict layout equals tests/data/synchformer.json
(238 `vfeat_extractor.*` keys), so MMAudio's public `synchformer_state_dict.pth` loads as is.
Input (B, S, 16, 3, 224, 224) in [-1, 1] -> output (B, S, 8, 768).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

VFEAT_PREFIX = "vfeat_extractor"


@dataclass(frozen=True)
class SynchformerConfig:
    """MotionFormer hyper-parameters. `default()` is the reference model (§7.2)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden_dim: int = 3072
    patch_size: int = 16
    temporal_patch_size: int = 2
    num_frames: int = 16  # input frames per segment
    image_size: int = 224
    agg_num_heads: int = 12
    agg_ff_dim: int = 3072
    ln_eps: float = 1e-6

    @property
    def temporal_resolution(self) -> int:
        return self.num_frames // self.temporal_patch_size

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches_per_frame(self) -> int:
        return self.grid_size**2

    @classmethod
    def default(cls) -> "SynchformerConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "SynchformerConfig":
        # Same code and output width (768, 8 per segment); coarser patches, one block and a
        # narrow MLP keep CPU cost low for tests and the demo.
        return cls(depth=1, patch_size=32, mlp_hidden_dim=256, agg_ff_dim=256)


def _qkv_attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # [exact] einsum + separate softmax, as upstream (§7.5 step 6); SDPA would differ.
    sim = torch.einsum("bid,bjd->bij", q, k)
    attn = sim.softmax(dim=-1)
    return torch.einsum("bij,bjd->bid", attn, v)


class DividedAttention(nn.Module):
    """Attention within groups of patch tokens; the CLS token attends to everything (§7.5)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mode: str, num_frames: int, patches_per_frame: int) -> Tensor:
        """x: (B, 1 + F*P, D), patch tokens frame-major. mode 'time' groups by spatial index,
        'space' groups by frame."""
        b, n, dim = x.shape
        h = self.num_heads
        d = dim // h
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # contiguous [q | k | v] blocks
        # 'b n (h d) -> (b h) n d'
        q, k, v = (t.reshape(b, n, h, d).permute(0, 2, 1, 3).reshape(b * h, n, d) for t in (q, k, v))
        q = q * self.scale

        cls_q, q_ = q[:, 0:1], q[:, 1:]
        cls_k, k_ = k[:, 0:1], k[:, 1:]
        cls_v, v_ = v[:, 0:1], v[:, 1:]
        cls_out = _qkv_attn(cls_q, k, v)  # CLS query attends to all tokens, itself included

        bh, f, p = b * h, num_frames, patches_per_frame
        if mode == "time":  # 'b (f n) d -> (b n) f d'
            group = lambda t: t.reshape(bh, f, p, d).permute(0, 2, 1, 3).reshape(bh * p, f, d)  # noqa: E731
            ungroup = lambda t: t.reshape(bh, p, f, d).permute(0, 2, 1, 3).reshape(bh, f * p, d)  # noqa: E731
            reps = p
        elif mode == "space":  # 'b (f n) d -> (b f) n d'
            group = lambda t: t.reshape(bh * f, p, d)  # noqa: E731
            ungroup = lambda t: t.reshape(bh, f * p, d)  # noqa: E731
            reps = f
        else:
            raise ValueError(f"DividedAttention mode must be 'time' or 'space', got {mode!r}")
        q_, k_, v_ = group(q_), group(k_), group(v_)
        # CLS key/value prepended to every group: 'b () d -> (b r) () d'
        cls_k = cls_k.repeat_interleave(reps, dim=0)
        cls_v = cls_v.repeat_interleave(reps, dim=0)
        k_ = torch.cat((cls_k, k_), dim=1)
        v_ = torch.cat((cls_v, v_), dim=1)
        out = ungroup(_qkv_attn(q_, k_, v_))
        out = torch.cat((cls_out, out), dim=1)
        out = out.reshape(b, h, n, d).permute(0, 2, 1, 3).reshape(b, n, dim)  # '(b h) n d -> b n (h d)'
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DividedSpaceTimeBlock(nn.Module):
    """Time attention, then space attention, then MLP (§7.4). Registration order = key order."""

    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.attn = DividedAttention(dim, cfg.num_heads)
        self.timeattn = DividedAttention(dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.mlp = Mlp(dim, cfg.mlp_hidden_dim)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.num_frames = cfg.temporal_resolution
        self.patches_per_frame = cfg.patches_per_frame

    def forward(self, x: Tensor) -> Tensor:
        f, p = self.num_frames, self.patches_per_frame
        x = x + self.timeattn(self.norm3(x), "time", f, p)
        x = x + self.attn(self.norm1(x), "space", f, p)
        return x + self.mlp(self.norm2(x))


class PatchEmbed2D(nn.Module):
    """Unused 2-D patch embedding kept only so the checkpoint keys match (requires_grad=False)."""

    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.proj.requires_grad_(False)


class PatchEmbed3D(nn.Module):
    """Tubelet embedding: Conv3d (2, 16, 16) -> tokens ordered frame-major (§7.3)."""

    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(3, cfg.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (BS, D, t, h, w) -> (BS, t*h*w, D)


class SpatialTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """Per-frame aggregation of the 196 patch tokens through an own CLS token (§7.6)."""

    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__(
            d_model=cfg.embed_dim,
            nhead=cfg.agg_num_heads,
            dim_feedforward=cfg.agg_ff_dim,
            dropout=0.0,
            activation=nn.GELU(),
            layer_norm_eps=cfg.ln_eps,
            batch_first=True,
            norm_first=True,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """x: (BS, D, t, h, w) -> (BS, t, D)."""
        bs, dim, t, h, w = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(bs * t, h * w, dim)  # 'BS D t h w -> (BS t) (h w) D'
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=-2)
        x = super().forward(src=x)
        return x[:, 0, :].reshape(bs, t, dim)


class MotionFormer(nn.Module):
    def __init__(self, cfg: SynchformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.patches_per_frame + 1, dim))
        self.temp_embed = nn.Parameter(torch.zeros(1, cfg.temporal_resolution, dim))
        self.patch_embed = PatchEmbed2D(cfg)
        self.patch_embed_3d = PatchEmbed3D(cfg)
        self.blocks = nn.ModuleList([DividedSpaceTimeBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.spatial_attn_agg = SpatialTransformerEncoderLayer(cfg)
        for p in (self.cls_token, self.pos_embed, self.temp_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """x: (BS, 3, T, H, W) -> (BS, t, D)."""
        cfg = self.cfg
        x = self.patch_embed_3d(x)
        bs = x.shape[0]
        x = torch.cat((self.cls_token.expand(bs, -1, -1), x), dim=1)
        # "separate" positional embedding: spatial rows tiled over frames + per-frame rows
        cls_embed = self.pos_embed[:, 0, :].unsqueeze(1)
        tile_pos_embed = self.pos_embed[:, 1:, :].repeat(1, cfg.temporal_resolution, 1)
        tile_temporal_embed = self.temp_embed.repeat_interleave(cfg.patches_per_frame, 1)
        total_pos_embed = torch.cat([cls_embed, tile_pos_embed + tile_temporal_embed], dim=1)
        x = x + total_pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x[:, 1:, :])
        g = cfg.grid_size
        x = x.permute(0, 2, 1).reshape(bs, cfg.embed_dim, cfg.temporal_resolution, g, g)
        return self.spatial_attn_agg(x)


class Synchformer(nn.Module):
    """Wrapper holding `vfeat_extractor`; (B, S, 16, 3, 224, 224) -> (B, S, 8, 768)."""

    def __init__(self, cfg: SynchformerConfig | None = None, segment_chunk: int = 8) -> None:
        super().__init__()
        self.cfg = cfg or SynchformerConfig.default()
        self.segment_chunk = segment_chunk
        self.vfeat_extractor = MotionFormer(self.cfg)

    @classmethod
    def tiny(cls, segment_chunk: int = 8) -> "Synchformer":
        return cls(SynchformerConfig.tiny(), segment_chunk=segment_chunk)

    @property
    def out_dim(self) -> int:
        return self.cfg.embed_dim

    def forward(self, vis: Tensor) -> Tensor:
        cfg = self.cfg
        expected = (cfg.num_frames, 3, cfg.image_size, cfg.image_size)
        if vis.ndim != 6 or tuple(vis.shape[2:]) != expected:
            raise ValueError(f"Synchformer expects (B, S, {', '.join(map(str, expected))}), got {tuple(vis.shape)}")
        b, s = vis.shape[:2]
        x = vis.transpose(2, 3).reshape(b * s, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
        # Segments are independent: chunking bounds activation memory (1569 tokens each).
        outs = [self.vfeat_extractor(chunk) for chunk in x.split(self.segment_chunk, dim=0)]
        return torch.cat(outs, dim=0).reshape(b, s, cfg.temporal_resolution, cfg.embed_dim)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Keep only the `vfeat_extractor*` keys (the public checkpoint holds more), load strictly."""
        kept = {k: v for k, v in state_dict.items() if k.startswith(VFEAT_PREFIX)}
        return super().load_state_dict(kept, strict=strict, assign=assign)
