"""Synchformer's audio branch and audio-visual offset head, for the DeSync metric.

The public `synchformer_state_dict.pth` holds the whole Synchformer: `vfeat_extractor.*` (the
visual MotionFormer of `wavflow.features.synchformer`, reused here unchanged), and

* `afeat_extractor.ast.*`: an Audio Spectrogram Transformer (AST) over 128-bin log-mel segments
  of 66 frames (12 x 6 patches of 16 x 16, stride 10). The network is transformers' `ASTModel`
  (not a copy); the checkpoint's older transformers key names are mapped on load;
* `afeat_extractor.freq_attn_agg.*`: a pre-norm TransformerEncoderLayer with its own CLS token
  that aggregates the 12 frequency patches of each time step (like the visual spatial one);
* `vproj` / `aproj`: Linear(768, 768) per stream;
* `transformer.*`: a 3-layer GPT-style encoder over `[OFF] v... [MOD] a...` (14 segments:
  1 + 14*8 + 1 + 14*6 = 198 tokens, learned positions) whose `off_head` maps the OFF token to
  21 offset classes on the grid linspace(-2, 2, 21) seconds.

`SynchformerAV.offset_logits(vis_feats, aud_feats)` takes (B, S, 8, 768) visual and
(B, S, 6, 768) audio segment features and returns (B, 21) logits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from wavflow.errors import WeightsError
from wavflow.features.synchformer import MotionFormer, SynchformerConfig

AFEAT_PREFIX = "afeat_extractor"
# Audio front end (Synchformer's): 16 kHz, 0.64 s segments every 0.32 s, 128-bin log-mel.
AUDIO_SR = 16000
AUDIO_SEGMENT_SAMPLES = 10240
AUDIO_SEGMENT_STEP = 5120
MEL_FRAMES = 66
MEL_MEAN = -4.2677393
MEL_STD = 4.5689974
OFFSET_GRID = (-2.0, 2.0, 21)  # seconds: linspace(lo, hi, n)


@dataclass(frozen=True)
class SynchformerAVConfig:
    """Audio branch and head hyper-parameters; `default()` is the public checkpoint's."""

    visual: SynchformerConfig = SynchformerConfig()
    ast_hidden: int = 768
    ast_layers: int = 12
    ast_heads: int = 12
    ast_intermediate: int = 3072
    n_mels: int = 128
    mel_frames: int = MEL_FRAMES
    agg_ff_dim: int = 3072
    head_layers: int = 3
    head_heads: int = 8
    segments: int = 14  # segments the offset head sees (its position table has 198 rows)
    num_offsets: int = OFFSET_GRID[2]

    @classmethod
    def default(cls) -> "SynchformerAVConfig":
        return cls()

    @property
    def audio_tokens_per_segment(self) -> int:
        return (self.mel_frames - 16) // 10 + 1  # AST patch 16, time stride 10 -> 6

    @property
    def head_seq_len(self) -> int:
        return 2 + self.segments * (self.visual.temporal_resolution + self.audio_tokens_per_segment)


def offset_grid() -> Tensor:
    """The offset (seconds) of each of the head's classes."""
    lo, hi, n = OFFSET_GRID
    return torch.linspace(lo, hi, n, dtype=torch.float64).float()


# ----------------------------------------------------------------------------- audio branch
class _CLSAggregator(nn.TransformerEncoderLayer):
    """Pre-norm encoder layer over (N, L, D) with a learned CLS token; returns the CLS output."""

    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__(d_model=dim, nhead=heads, dim_feedforward=ff, dropout=0.0, activation=nn.GELU(),
                         layer_norm_eps=1e-6, batch_first=True, norm_first=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return super().forward(src=x)[:, 0]


class AudioFeatureExtractor(nn.Module):
    """AST (transformers) + frequency aggregation: (BS, 66, 128) log-mel -> (BS, 6, 768)."""

    def __init__(self, cfg: SynchformerAVConfig) -> None:
        super().__init__()
        from transformers import ASTConfig, ASTModel  # lazy: 0.8 s, evaluation's DeSync only

        self.ast_config = ASTConfig(
            hidden_size=cfg.ast_hidden, num_hidden_layers=cfg.ast_layers, num_attention_heads=cfg.ast_heads,
            intermediate_size=cfg.ast_intermediate, num_mel_bins=cfg.n_mels, max_length=cfg.mel_frames,
        )
        self.ast = ASTModel(self.ast_config)
        self.freq_attn_agg = _CLSAggregator(cfg.ast_hidden, cfg.ast_heads, cfg.agg_ff_dim)
        self.f = (cfg.n_mels - 16) // 10 + 1
        self.t = cfg.audio_tokens_per_segment

    def forward(self, mel: Tensor) -> Tensor:
        """mel: (BS, T=66, F=128) -> (BS, t, D)."""
        tokens = self.ast(input_values=mel).last_hidden_state[:, 2:]  # drop CLS + distillation tokens
        bs, _, dim = tokens.shape
        # patches are frequency-major (conv output f x t flattened): (BS, f*t, D) -> (BS*t, f, D)
        grid = tokens.transpose(1, 2).reshape(bs, dim, self.f, self.t)
        per_time = grid.permute(0, 3, 2, 1).reshape(bs * self.t, self.f, dim)
        return self.freq_attn_agg(per_time).reshape(bs, self.t, dim)


# ----------------------------------------------------------------------------- offset head
class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, n, dim = x.shape
        split = lambda t: t.view(b, n, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(b, n, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _PosEmb(nn.Module):
    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(1, length, dim))


class OffsetTransformer(nn.Module):
    """`[OFF] v [MOD] a` -> 3 blocks -> LayerNorm -> off_head(OFF token)."""

    def __init__(self, cfg: SynchformerAVConfig) -> None:
        super().__init__()
        dim = cfg.visual.embed_dim
        self.vis_in_lnorm = nn.LayerNorm(dim)
        self.aud_in_lnorm = nn.LayerNorm(dim)
        self.OFF_tok = nn.Parameter(torch.randn(1, 1, dim))
        self.MOD_tok = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_emb_cfg = _PosEmb(cfg.head_seq_len, dim)
        self.blocks = nn.Sequential(*[_Block(dim, cfg.head_heads) for _ in range(cfg.head_layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.off_head = nn.Linear(dim, cfg.num_offsets)

    def forward(self, v: Tensor, a: Tensor) -> Tensor:
        b = v.shape[0]
        v, a = self.vis_in_lnorm(v), self.aud_in_lnorm(a)
        x = torch.cat((self.OFF_tok.expand(b, -1, -1), v, self.MOD_tok.expand(b, -1, -1), a), dim=1)
        x = x + self.pos_emb_cfg.pos_emb
        x = self.ln_f(self.blocks(x))
        return self.off_head(x[:, 0])


class SynchformerAV(nn.Module):
    """The full public Synchformer: visual branch, audio branch, projections, offset head."""

    def __init__(self, cfg: SynchformerAVConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SynchformerAVConfig.default()
        self.vfeat_extractor = MotionFormer(self.cfg.visual)
        self.afeat_extractor = AudioFeatureExtractor(self.cfg)
        dim = self.cfg.visual.embed_dim
        self.vproj = nn.Linear(dim, dim)
        self.aproj = nn.Linear(dim, dim)
        self.transformer = OffsetTransformer(self.cfg)

    def visual_features(self, vis: Tensor) -> Tensor:
        """(B, S, 16, 3, H, W) in [-1, 1] -> (B, S, 8, 768), the same numerics as `Synchformer`."""
        vc = self.cfg.visual
        b, s = vis.shape[:2]
        x = vis.transpose(2, 3).reshape(b * s, 3, vc.num_frames, vc.image_size, vc.image_size)
        return self.vfeat_extractor(x).reshape(b, s, vc.temporal_resolution, vc.embed_dim)

    def audio_features(self, mel: Tensor) -> Tensor:
        """(B, S, 128, 66) normalised log-mel segments -> (B, S, 6, 768)."""
        b, s, f, t = mel.shape
        out = self.afeat_extractor(mel.reshape(b * s, f, t).transpose(1, 2))
        return out.reshape(b, s, *out.shape[1:])

    def offset_logits(self, vis_feats: Tensor, aud_feats: Tensor) -> Tensor:
        """(B, S, 8, D) and (B, S, 6, D) with S = cfg.segments -> (B, 21) offset logits."""
        v, a = self.vproj(vis_feats), self.aproj(aud_feats)
        b = v.shape[0]
        return self.transformer(v.reshape(b, -1, v.shape[-1]), a.reshape(b, -1, a.shape[-1]))


def audio_segments_mel(wave: Tensor, mel: nn.Module) -> Tensor:
    """(B, T) 16 kHz -> (B, S, 128, 66): 0.64 s windows every 0.32 s, log-mel, pad, normalise."""
    windows = wave.unfold(-1, AUDIO_SEGMENT_SAMPLES, AUDIO_SEGMENT_STEP)  # (B, S, 10240)
    spec = torch.log(mel(windows) + 1e-6)
    pad = MEL_FRAMES - spec.shape[-1]
    spec = F.pad(spec, (0, pad)) if pad > 0 else spec[..., :MEL_FRAMES]
    return (spec - MEL_MEAN) / (2 * MEL_STD)


def make_sync_mel() -> nn.Module:
    return torchaudio.transforms.MelSpectrogram(sample_rate=AUDIO_SR, win_length=400, hop_length=160,
                                                n_fft=1024, n_mels=128)


# The public checkpoint was written with transformers 4 key names; transformers 5 renamed them.
_AST_RENAMES = (
    (re.compile(r"\.encoder\.layer\.(\d+)\.attention\.attention\.query\."), r".layers.\1.attention.q_proj."),
    (re.compile(r"\.encoder\.layer\.(\d+)\.attention\.attention\.key\."), r".layers.\1.attention.k_proj."),
    (re.compile(r"\.encoder\.layer\.(\d+)\.attention\.attention\.value\."), r".layers.\1.attention.v_proj."),
    (re.compile(r"\.encoder\.layer\.(\d+)\.attention\.output\.dense\."), r".layers.\1.attention.o_proj."),
    (re.compile(r"\.encoder\.layer\.(\d+)\.intermediate\.dense\."), r".layers.\1.mlp.fc1."),
    (re.compile(r"\.encoder\.layer\.(\d+)\.output\.dense\."), r".layers.\1.mlp.fc2."),
    (re.compile(r"\.encoder\.layer\.(\d+)\.layernorm_"), r".layers.\1.layernorm_"),
)


def map_checkpoint_keys(state: Mapping[str, Any], target_keys: set[str]) -> dict[str, Any]:
    """Rename the checkpoint's AST keys to the installed transformers' names where they differ."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = key
        if key.startswith(AFEAT_PREFIX + ".ast.") and key not in target_keys:
            for pattern, repl in _AST_RENAMES:
                new = pattern.sub(repl, new)
        out[new] = value
    return out


def load_synchformer_av(path: str | Any, cfg: SynchformerAVConfig | None = None) -> SynchformerAV:
    """Build the full Synchformer and load every key of a (public) state dict file, weights-only.

    A file that lacks the audio branch or the offset head (e.g. a visual-only export) is a
    WeightsError naming the first missing keys.
    """
    # lazy: wavflow.features.encoders imports open_clip (+1.6 s on top of the evaluator's imports);
    # the evaluator imports this module at top and needs encoders only when DeSync is asked for
    from wavflow.features.encoders import read_synchformer_state

    path = Path(path)
    state = read_synchformer_state(path)
    with torch.device("meta"):  # no random init of ~230M parameters that are overwritten anyway
        model = SynchformerAV(cfg)
    target = set(model.state_dict())
    state = map_checkpoint_keys(state, target)
    state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    missing = sorted(target - set(state))
    if missing:
        raise WeightsError(
            f"Synchformer weights {path} lack {len(missing)} keys of the audio branch / offset head "
            f"(first: {', '.join(missing[:3])}); DeSync needs the full public synchformer_state_dict.pth"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"Synchformer weights {path} do not match the model: {exc}") from exc
    return model.eval().requires_grad_(False)
