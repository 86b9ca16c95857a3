"""WavFlowNet: the MM-DiT over raw-waveform patches (docs/method.md §2) and its factory."""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from wavflow.errors import ConfigError
from wavflow.model.cond_norm import ConditionNorm
from wavflow.model.layers import (
    ChannelLastConv1d,
    ConvMLP,
    FinalBlock,
    JointBlock,
    MLP,
    MMDitSingleBlock,
    TimestepEmbedder,
    compute_rope_rotations,
)
from wavflow.model.level_head import LevelHead
from wavflow.model.presets import CONDITION_FIELDS, DEFAULT_CONDITION_SHAPES, PRESETS, ModelPreset
from wavflow.model.spectral_skip import SpectralSkip
from wavflow.shapes import SYNC_TOKENS_PER_SEGMENT, latent_seq_len as derive_latent_seq_len

NON_PERSISTENT_BUFFERS = ("latent_rot", "clip_rot", "t_embed.freqs")


class Conditions(NamedTuple):
    """Preprocessed conditions, batch first. sync_f is already upsampled to N tokens."""

    clip_f: torch.Tensor  # (B, clip_len, D)
    sync_f: torch.Tensor  # (B, N, D)
    text_f: torch.Tensor  # (B, text_len, D)
    clip_c: torch.Tensor  # (B, D)
    text_c: torch.Tensor  # (B, D)


def _check_shape(name: str, x: torch.Tensor, expected: tuple[Optional[int], ...]) -> None:
    """ValueError naming the tensor when its shape differs (None matches any size)."""
    ok = x.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        want = "(" + ", ".join("B" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want}")


class WavFlowNet(nn.Module):
    def __init__(
        self,
        preset: ModelPreset,
        *,
        latent_seq_len: int,
        clip_seq_len: int,
        sync_seq_len: int,
        text_seq_len: int,
        clip_dim: int,
        sync_dim: int,
        text_dim: int,
        empty_string_feat: Optional[torch.Tensor] = None,
        gradient_checkpointing: bool | Iterable[int] = False,
    ) -> None:
        super().__init__()
        dim, heads, ratio = preset.hidden_dim, preset.num_heads, preset.mlp_ratio
        self.preset_name = preset.name
        self.latent_dim = preset.latent_dim
        self.hidden_dim = dim
        self.text_seq_len = text_seq_len
        self.clip_dim, self.sync_dim, self.text_dim = clip_dim, sync_dim, text_dim
        # blocks (joint blocks first, then fused, 0-based) whose activations are recomputed in backward
        self.checkpoint_blocks = (frozenset(range(preset.depth)) if gradient_checkpointing else frozenset()) \
            if isinstance(gradient_checkpointing, bool) else frozenset(int(i) for i in gradient_checkpointing)

        # Direct parameters first: PyTorch lists them before the children (docs/method.md §2.1).
        self.sync_pos_emb = nn.Parameter(torch.zeros((1, 1, SYNC_TOKENS_PER_SEGMENT, sync_dim)))
        if empty_string_feat is None:
            empty_string_feat = torch.zeros((text_seq_len, text_dim))
        _check_shape("empty_string_feat", empty_string_feat, (text_seq_len, text_dim))
        self.empty_string_feat = nn.Parameter(empty_string_feat.detach().clone().float(), requires_grad=False)
        self.empty_clip_feat = nn.Parameter(torch.zeros(1, clip_dim))
        self.empty_sync_feat = nn.Parameter(torch.zeros(1, sync_dim))

        self.audio_input_proj = nn.Sequential(
            ChannelLastConv1d(preset.latent_dim, dim, kernel_size=7, padding=3),
            nn.SELU(),
            ConvMLP(dim, int(dim * ratio), kernel_size=7, padding=3),
        )
        self.clip_input_proj = nn.Sequential(
            nn.Linear(clip_dim, dim),
            ConvMLP(dim, int(dim * ratio), kernel_size=3, padding=1),
        )
        self.sync_input_proj = nn.Sequential(
            ChannelLastConv1d(sync_dim, dim, kernel_size=7, padding=3),
            nn.SELU(),
            ConvMLP(dim, int(dim * ratio), kernel_size=3, padding=1),
        )
        self.text_input_proj = nn.Sequential(nn.Linear(text_dim, dim), MLP(dim, int(dim * ratio)))
        self.clip_cond_proj = nn.Linear(dim, dim)
        self.text_cond_proj = nn.Linear(dim, dim)
        self.global_cond_mlp = MLP(dim, int(dim * ratio))
        self.final_layer = FinalBlock(dim, preset.latent_dim)
        self.t_embed = TimestepEmbedder(dim)
        joint = preset.joint_depth
        self.joint_blocks = nn.ModuleList(
            [JointBlock(dim, heads, mlp_ratio=ratio, pre_only=(i == joint - 1)) for i in range(joint)]
        )
        self.fused_blocks = nn.ModuleList(
            [
                MMDitSingleBlock(dim, heads, mlp_ratio=ratio, kernel_size=3, padding=1)
                for _ in range(preset.fused_depth)
            ]
        )
        self.register_buffer("latent_rot", torch.empty(0), persistent=False)
        self.register_buffer("clip_rot", torch.empty(0), persistent=False)
        self.update_seq_lengths(latent_seq_len, clip_seq_len, sync_seq_len)
        self.initialize_weights()
        # Optional feature normalisation (cond_norm.py); None keeps the reference layout.
        self.cond_norm: Optional[ConditionNorm] = None
        # Optional per-frequency Wiener skip (spectral_skip.py); None keeps the reference layout.
        self.spectral_skip: Optional[SpectralSkip] = None
        # Optional loudness head (level_head.py); None keeps the reference layout.
        self.level_head: Optional[LevelHead] = None

    def attach_condition_norm(self) -> ConditionNorm:
        """Add the (identity until set) condition normalisation; its keys come last."""
        if self.cond_norm is None:
            device = self.empty_clip_feat.device
            self.cond_norm = ConditionNorm(self.clip_dim, self.sync_dim, self.text_dim).to(device)
        return self.cond_norm

    def attach_spectral_skip(self, lapped: bool = True) -> SpectralSkip:
        """Add the per-frequency Wiener skip (it starts keeping x_t only near t = 1); lapped=False:
        the per-token DCT form of its first build (spectral_skip.py)."""
        if self.spectral_skip is None:
            device = self.empty_clip_feat.device
            self.spectral_skip = SpectralSkip(self.hidden_dim, self.latent_dim, lapped=lapped).to(device)
        return self.spectral_skip

    def attach_level_head(self) -> LevelHead:
        """Add the loudness head (it starts predicting level_head.LEVEL_OFFSET_LUFS for every clip)."""
        if self.level_head is None:
            device = self.empty_clip_feat.device
            self.level_head = LevelHead(self.clip_dim, self.sync_dim, self.text_dim).to(device)
        return self.level_head

    # ----------------------------------------------------------------------------- set-up
    def initialize_weights(self) -> None:
        """docs/method.md §2.12: xavier Linear, N(0, .02) t_embed, zeroed adaLN/final/learned constants."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        blocks: list[nn.Module] = [self.final_layer, *self.fused_blocks]
        for jb in self.joint_blocks:
            blocks += [jb.latent_block, jb.clip_block, jb.text_block]
        for block in blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.conv.weight, 0)
        nn.init.constant_(self.final_layer.conv.bias, 0)
        for p in (self.sync_pos_emb, self.empty_clip_feat, self.empty_sync_feat):
            nn.init.constant_(p, 0)

    def update_seq_lengths(
        self, latent_seq_len: int, clip_seq_len: Optional[int] = None, sync_seq_len: Optional[int] = None
    ) -> None:
        """Set N (and optionally the clip/sync lengths) and rebuild the RoPE tables."""
        clip_seq_len = self.clip_seq_len if clip_seq_len is None else clip_seq_len
        sync_seq_len = self.sync_seq_len if sync_seq_len is None else sync_seq_len
        for name, value in (("latent_seq_len", latent_seq_len), ("clip_seq_len", clip_seq_len), ("sync_seq_len", sync_seq_len)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if sync_seq_len % SYNC_TOKENS_PER_SEGMENT:
            raise ValueError(f"sync_seq_len={sync_seq_len} must be a multiple of {SYNC_TOKENS_PER_SEGMENT}")
        self.latent_seq_len = latent_seq_len
        self.clip_seq_len = clip_seq_len
        self.sync_seq_len = sync_seq_len
        device = self.empty_clip_feat.device
        self.latent_rot = compute_rope_rotations(latent_seq_len, freq_scaling=1.0, device=device)
        # Clip positions are stretched onto the latent time axis.
        self.clip_rot = compute_rope_rotations(
            clip_seq_len, freq_scaling=latent_seq_len / clip_seq_len, device=device
        )

    # -------------------------------------------------------------------- empty sequences
    def empty_string_sequence(self, bs: int) -> torch.Tensor:
        return self.empty_string_feat.unsqueeze(0).expand(bs, -1, -1)

    # With feature normalisation the empty clip/sync tokens are stored scaled (cond_norm.py says
    # why); these return them in raw feature units, like real features.
    def empty_clip_sequence(self, bs: int) -> torch.Tensor:
        token = self.empty_clip_feat if self.cond_norm is None else self.cond_norm.denormalise_clip(self.empty_clip_feat)
        return token.unsqueeze(0).expand(bs, self.clip_seq_len, -1)

    def empty_sync_sequence(self, bs: int) -> torch.Tensor:
        token = self.empty_sync_feat if self.cond_norm is None else self.cond_norm.denormalise_sync(self.empty_sync_feat)
        return token.unsqueeze(0).expand(bs, self.sync_seq_len, -1)

    # ------------------------------------------------------------------------- conditions
    def _check_conditions(self, clip_f: torch.Tensor, sync_f: torch.Tensor, text_f: torch.Tensor) -> None:
        _check_shape("clip_f", clip_f, (None, self.clip_seq_len, self.clip_dim))
        _check_shape("sync_f", sync_f, (None, self.sync_seq_len, self.sync_dim))
        _check_shape("text_f", text_f, (None, self.text_seq_len, self.text_dim))

    def _preprocess(self, clip_f: torch.Tensor, sync_f: torch.Tensor, text_f: torch.Tensor) -> Conditions:
        if self.cond_norm is not None:  # every input alike: features and empty tokens
            clip_f, sync_f, text_f = self.cond_norm(clip_f, sync_f, text_f)
        bs = sync_f.shape[0]
        # Per-frame position embedding, shared by all segments; reshape (not view-only
        # semantics) so expand()ed stride-0 empty sequences pass.
        sync_f = sync_f.reshape(bs, -1, SYNC_TOKENS_PER_SEGMENT, sync_f.shape[-1])
        sync_f = (sync_f + self.sync_pos_emb).flatten(1, 2)
        clip_f = self.clip_input_proj(clip_f)
        sync_f = self.sync_input_proj(sync_f)
        text_f = self.text_input_proj(text_f)
        sync_f = F.interpolate(sync_f.transpose(1, 2), size=self.latent_seq_len, mode="nearest-exact").transpose(1, 2)
        clip_c = self.clip_cond_proj(clip_f.mean(dim=1))
        text_c = self.text_cond_proj(text_f.mean(dim=1))
        return Conditions(clip_f, sync_f, text_f, clip_c, text_c)

    def preprocess_conditions(self, clip_f: torch.Tensor, sync_f: torch.Tensor, text_f: torch.Tensor) -> Conditions:
        """Project the three condition streams, upsample sync to N, pool clip/text (docs/method.md §2.9)."""
        self._check_conditions(clip_f, sync_f, text_f)
        if not clip_f.shape[0] == sync_f.shape[0] == text_f.shape[0]:
            raise ValueError(
                f"clip_f, sync_f and text_f batch sizes differ: {clip_f.shape[0]}, {sync_f.shape[0]}, {text_f.shape[0]}"
            )
        return self._preprocess(clip_f, sync_f, text_f)

    def get_empty_conditions(self, bs: int, negative_text_features: Optional[torch.Tensor] = None) -> Conditions:
        """Conditions of the empty tokens, computed on batch 1 and broadcast to bs (docs/method.md §2.11)."""
        if negative_text_features is not None:
            _check_shape("negative_text_features", negative_text_features, (bs, self.text_seq_len, self.text_dim))
            text = negative_text_features
        else:
            text = self.empty_string_sequence(1)
        clip, sync = self.empty_clip_sequence(1), self.empty_sync_sequence(1)
        self._check_conditions(clip, sync, text)
        cond = self._preprocess(clip, sync, text)
        clip_f = cond.clip_f.expand(bs, -1, -1)
        sync_f = cond.sync_f.expand(bs, -1, -1)
        clip_c = cond.clip_c.expand(bs, -1)
        text_f, text_c = cond.text_f, cond.text_c
        if negative_text_features is None:
            text_f, text_c = text_f.expand(bs, -1, -1), text_c.expand(bs, -1)
        return Conditions(clip_f, sync_f, text_f, clip_c, text_c)

    def predict_loudness(self, clip_f: torch.Tensor, sync_f: torch.Tensor, text_f: torch.Tensor) -> torch.Tensor:
        """The loudness head's LUFS (B,) for raw condition sequences, missing modalities already
        filled with the empty tokens (docs/method.md §2.15)."""
        if self.level_head is None:
            raise ValueError("this network has no loudness head (model.level_head)")
        self._check_conditions(clip_f, sync_f, text_f)
        if self.cond_norm is not None:  # the streams as the flow network sees them
            clip_f, sync_f, text_f = self.cond_norm(clip_f, sync_f, text_f)
        return self.level_head(clip_f, sync_f, text_f)

    # ---------------------------------------------------------------------------- network
    def _run(self, index: int, fn: Any, *args: Any) -> Any:
        if index in self.checkpoint_blocks and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def predict_flow(self, x: torch.Tensor, t: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        """Network output for patches x (B, N, latent_dim) at flow time t (B,) (docs/method.md §2.10)."""
        _check_shape("x", x, (None, self.latent_seq_len, self.latent_dim))
        _check_shape("t", t, (x.shape[0],))
        clip_f, sync_f, text_f, clip_c, text_c = conditions
        _check_shape("conditions.sync_f", sync_f, (None, self.latent_seq_len, self.hidden_dim))
        latent = self.audio_input_proj(x)
        g = self.global_cond_mlp(clip_c + text_c)
        global_c = self.t_embed(t).unsqueeze(1) + g.unsqueeze(1)
        extended_c = global_c + sync_f
        for i, jb in enumerate(self.joint_blocks):
            latent, clip_f, text_f = self._run(
                i, jb, latent, clip_f, text_f, global_c, extended_c, self.latent_rot, self.clip_rot
            )
        for i, fb in enumerate(self.fused_blocks, start=len(self.joint_blocks)):
            latent = self._run(i, fb, latent, extended_c, self.latent_rot)
        # Quirk #55 (kept for checkpoint compatibility): the final layer sees global_c.
        out = self.final_layer(latent, global_c)
        if self.spectral_skip is not None:
            out = out + self.spectral_skip(x, latent, t)
        return out

    def forward(
        self, x: torch.Tensor, clip_f: torch.Tensor, sync_f: torch.Tensor, text_f: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return self.predict_flow(x, t, self.preprocess_conditions(clip_f, sync_f, text_f))


# -------------------------------------------------------------------------------- factory
def build_model(
    name: str,
    *,
    latent_seq_len: Optional[int] = None,
    clip_seq_len: Optional[int] = None,
    sync_seq_len: Optional[int] = None,
    text_seq_len: Optional[int] = None,
    clip_dim: Optional[int] = None,
    sync_dim: Optional[int] = None,
    text_dim: Optional[int] = None,
    empty_string_feat: Optional[torch.Tensor] = None,
    gradient_checkpointing: bool | Iterable[int] = False,
) -> WavFlowNet:
    """Build preset `name`. Condition shapes a reference preset pins may not be changed."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(sorted(PRESETS))})")
    preset = PRESETS[name]
    given = dict(
        clip_seq_len=clip_seq_len,
        sync_seq_len=sync_seq_len,
        text_seq_len=text_seq_len,
        clip_dim=clip_dim,
        sync_dim=sync_dim,
        text_dim=text_dim,
    )
    shapes: dict[str, int] = {}
    for field in CONDITION_FIELDS:
        pinned, value = getattr(preset, field), given[field]
        if pinned is not None and value is not None and value != pinned:
            raise ConfigError(f"model preset '{name}' pins {field}={pinned}, but {field}={value} was requested")
        shapes[field] = value if value is not None else (pinned if pinned is not None else DEFAULT_CONDITION_SHAPES[field])
    n = preset.default_latent_seq_len if latent_seq_len is None else latent_seq_len
    return WavFlowNet(
        preset,
        latent_seq_len=n,
        empty_string_feat=empty_string_feat,
        gradient_checkpointing=gradient_checkpointing,
        **shapes,
    )


def build_model_from_config(
    cfg: Any, empty_string_feat: Optional[torch.Tensor] = None, gradient_checkpointing: bool | Iterable[int] = False
) -> WavFlowNet:
    """Build `cfg.model.name` with N derived from `cfg.data` (sr, duration, audio_dim)."""
    data = cfg.data
    n = derive_latent_seq_len(int(data.target_sample_rate), float(data.audio_duration), int(data.audio_dim))
    return build_model(
        str(cfg.model.name),
        latent_seq_len=n,
        **{field: int(data[field]) for field in CONDITION_FIELDS},
        empty_string_feat=empty_string_feat,
        gradient_checkpointing=gradient_checkpointing,
    )
