"""Building blocks of the WavFlow network (docs/method.md §0, §2.2–§2.8).

Module and attribute names are part of the checkpoint format: they produce the reference
state-dict keys (`tests/data/wavflow_*.json`), so do not rename them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_DIM = 64
TIME_FREQ_DIM = 256
ROPE_THETA = 10000.0


def _no_cuda_autocast():
    """RoPE tables and their application run in float32 even under CUDA autocast."""
    return torch.autocast(device_type="cuda", enabled=False)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, in this operation order."""
    return x * (1 + scale) + shift


def swiglu_hidden_dim(hidden_dim: int, multiple_of: int = 256) -> int:
    """Inner width of a SwiGLU map: int(2h/3) rounded up to a multiple of 256 (3584 -> 2560)."""
    inner = int(2 * hidden_dim / 3)
    return multiple_of * ((inner + multiple_of - 1) // multiple_of)


def conv1d_channel_last_as_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int
) -> torch.Tensor:
    """Stride-1 Conv1d of (B, L, C) inputs as one GEMM (im2col): the k zero-padded shifted
    copies of the input side by side, (B, L_out, k*C), times the weight as (O, k*C). Same sums
    as F.conv1d, other order. Tap-major columns (whole C-wide blocks, not C*k interleaved) keep
    the copy and its backward contiguous, which is what makes it cheap under inductor too."""
    k = weight.shape[-1]
    if k == 1 and padding == 0:
        return F.linear(x, weight[..., 0], bias)
    padded = F.pad(x, (0, 0, padding, padding))
    length = padded.shape[1] - k + 1
    windows = torch.cat([padded[:, j:j + length] for j in range(k)], dim=-1)  # (B, L_out, k*C)
    return F.linear(windows, weight.permute(0, 2, 1).reshape(weight.shape[0], -1), bias)


class ChannelLastConv1d(nn.Conv1d):
    """Conv1d on (B, L, C) inputs; a Conv1d subclass so its keys are `<name>.weight/bias`.

    `conv_impl` (wavflow.speed.set_conv_impl): "native" runs F.conv1d (the reference path);
    "matmul" the same convolution as one GEMM, faster for these short sequences on CPU."""

    conv_impl = "native"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.conv_impl == "matmul" and self._matmul_ok():
            return conv1d_channel_last_as_matmul(x, self.weight, self.bias, int(self.padding[0]))
        return super().forward(x.permute(0, 2, 1)).permute(0, 2, 1)

    def _matmul_ok(self) -> bool:
        return (self.stride == (1,) and self.dilation == (1,) and self.groups == 1
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple))


class MLP(nn.Module):
    """SwiGLU-MLP: w2(silu(w1 x) * w3 x), bias-free, inner width swiglu_hidden_dim(h)."""

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int = 256) -> None:
        super().__init__()
        inner = swiglu_hidden_dim(hidden_dim, multiple_of)
        self.w1 = nn.Linear(dim, inner, bias=False)
        self.w2 = nn.Linear(inner, dim, bias=False)
        self.w3 = nn.Linear(dim, inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ConvMLP(nn.Module):
    """Conv-SwiGLU: the SwiGLU-MLP with bias-free channel-last convs of kernel k, padding p."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int, padding: int, multiple_of: int = 256) -> None:
        super().__init__()
        inner = swiglu_hidden_dim(hidden_dim, multiple_of)
        self.w1 = ChannelLastConv1d(dim, inner, kernel_size, padding=padding, bias=False)
        self.w2 = ChannelLastConv1d(inner, dim, kernel_size, padding=padding, bias=False)
        self.w3 = ChannelLastConv1d(dim, inner, kernel_size, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def timestep_frequencies(freq_dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """freqs[i] = 1 / 10000**(2i/freq_dim), as pow then reciprocal (docs/method.md §2.3, [exact])."""
    exponents = torch.arange(0, freq_dim, 2, dtype=torch.float32) / freq_dim
    freqs = 1.0 / torch.pow(10000, exponents)
    return (10000 / max_period) * freqs


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (unscaled) -> [cos | sin] features (256) -> Linear, SiLU, Linear."""

    def __init__(self, dim: int, frequency_embedding_size: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, dim),
            nn.SiLU(),
            nn.Linear(dim, dim),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.register_buffer("freqs", timestep_frequencies(frequency_embedding_size, max_period), persistent=False)

    def timestep_features(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_features(t).to(t.dtype))


def compute_rope_rotations(
    length: int,
    dim: int = HEAD_DIM,
    theta: float = ROPE_THETA,
    *,
    freq_scaling: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(1, length, dim/2, 2, 2) table of [[cos a, -sin a], [sin a, cos a]], a = pos * f_i."""
    with _no_cuda_autocast():
        pos = torch.arange(length, dtype=torch.float32, device=device)
        # docs/method.md §2.4: the power of the negative exponent. (1 / pow(theta, +e), as t_embed does,
        # differs by 1 ulp in 12 of the 32 entries; keep the two formulas distinct.)
        freqs = torch.pow(theta, -(torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        freqs *= freq_scaling
        angles = torch.outer(pos, freqs)
        cos, sin = torch.cos(angles), torch.sin(angles)
        rot = torch.stack([cos, -sin, sin, cos], dim=-1)
        return rot.reshape(1, length, dim // 2, 2, 2)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, H, L, D) in float32, cast back."""
    with _no_cuda_autocast():
        xf = x.float()
        pairs = xf.view(*xf.shape[:-1], -1, 1, 2)
        out = rot[..., 0] * pairs[..., 0] + rot[..., 1] * pairs[..., 1]
        return out.reshape(*x.shape).to(dtype=x.dtype)


# How `attention` runs: "sdpa" (reference: F.scaled_dot_product_attention, whose backend
# wavflow.speed.sdpa_context picks) or "matmul" (two batched GEMMs in the input precision around
# a float32 softmax). Each attention block holds its own choice (`attention_impl`), set for a
# whole model by wavflow.speed.set_attention_impl.
ATTENTION_IMPLS = ("sdpa", "matmul")


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v as plain GEMMs: the scores and the weighted sum in q's dtype
    (bf16 under autocast, fp32 accumulation), the softmax in float32, its result rounded to v's
    dtype before the second GEMM, as GPU flash attention rounds it. On CPU in bf16 forward +
    backward run 2.7-4.9x faster than the CPU flash kernel for this network's shapes
    (docs/benchmarks.md); the price is that rounding of the attention weights."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(weights, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
    """Unmasked attention on (B, H, L, 64) -> (B, L, H*64) with channel h*64 + j, by `impl`."""
    if impl == "matmul":
        out = matmul_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    b, h, n, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, n, h * d).contiguous()


class SelfAttention(nn.Module):
    """Fused qkv with the (head, head_dim, {q,k,v}) channel layout, RMSNorm(eps=None) on q/k."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads or dim // num_heads != HEAD_DIM:
            raise ValueError(f"hidden dim {dim} with {num_heads} heads must give head width {HEAD_DIM}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # eps=None on purpose: it resolves to finfo(dtype).eps at run time (docs/method.md §2.5, quirk #7).
        self.q_norm = nn.RMSNorm(dim // num_heads)
        self.k_norm = nn.RMSNorm(dim // num_heads)

    def pre_attention(
        self, x: torch.Tensor, rot: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.num_heads, -1, 3)  # channel c = h*192 + j*3 + s
        qkv = qkv.permute(0, 2, 1, 3, 4)  # (B, H, L, 64, 3)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
        q = self.q_norm(q)
        k = self.k_norm(k)
        if rot is not None:
            q = apply_rope(q, rot)
            k = apply_rope(k, rot)
        return q, k, v


Modulation = tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


class MMDitSingleBlock(nn.Module):
    """One adaLN transformer stream (docs/method.md §2.6); pre_only keeps only norm1 + attention inputs."""

    attention_impl = "sdpa"  # ATTENTION_IMPLS; wavflow.speed.set_attention_impl

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        pre_only: bool = False,
        kernel_size: int = 7,
        padding: int = 3,
    ) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads)
        if pre_only:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))
            return
        hidden = int(dim * mlp_ratio)
        if kernel_size == 1:
            self.linear1: nn.Module = nn.Linear(dim, dim)
            self.ffn: nn.Module = MLP(dim, hidden)
        else:
            self.linear1 = ChannelLastConv1d(dim, dim, kernel_size, padding=padding)
            self.ffn = ConvMLP(dim, hidden, kernel_size=kernel_size, padding=padding)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def pre_attention(
        self, x: torch.Tensor, c: torch.Tensor, rot: Optional[torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], Modulation]:
        modulation = self.adaLN_modulation(c)
        if self.pre_only:
            shift_msa, scale_msa = modulation.chunk(2, dim=-1)
            rest: Modulation = (None, None, None, None)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
            rest = (gate_msa, shift_mlp, scale_mlp, gate_mlp)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        return self.attn.pre_attention(h, rot), rest

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, mod: Modulation) -> torch.Tensor:
        if self.pre_only:
            return x
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + self.linear1(attn_out) * gate_msa
        r = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + self.ffn(r) * gate_mlp

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rot: Optional[torch.Tensor]) -> torch.Tensor:
        qkv, mod = self.pre_attention(x, cond, rot)
        return self.post_attention(x, attention(*qkv, impl=self.attention_impl), mod)


class JointBlock(nn.Module):
    """MM-DiT joint attention over [latent, clip, text] (docs/method.md §2.7)."""

    attention_impl = "sdpa"  # ATTENTION_IMPLS; wavflow.speed.set_attention_impl

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, pre_only: bool = False) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.latent_block = MMDitSingleBlock(dim, num_heads, mlp_ratio, pre_only=False, kernel_size=3, padding=1)
        self.clip_block = MMDitSingleBlock(dim, num_heads, mlp_ratio, pre_only=pre_only, kernel_size=3, padding=1)
        self.text_block = MMDitSingleBlock(dim, num_heads, mlp_ratio, pre_only=pre_only, kernel_size=1)

    def forward(
        self,
        latent: torch.Tensor,
        clip_f: torch.Tensor,
        text_f: torch.Tensor,
        global_c: torch.Tensor,
        extended_c: torch.Tensor,
        latent_rot: torch.Tensor,
        clip_rot: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_qkv, x_mod = self.latent_block.pre_attention(latent, extended_c, latent_rot)
        c_qkv, c_mod = self.clip_block.pre_attention(clip_f, global_c, clip_rot)
        t_qkv, t_mod = self.text_block.pre_attention(text_f, global_c, None)
        n_latent, n_clip = latent.shape[1], clip_f.shape[1]
        joint = [torch.cat([x_qkv[i], c_qkv[i], t_qkv[i]], dim=2) for i in range(3)]
        out = attention(*joint, impl=self.attention_impl)
        latent = self.latent_block.post_attention(latent, out[:, :n_latent], x_mod)
        if not self.pre_only:
            clip_f = self.clip_block.post_attention(clip_f, out[:, n_latent : n_latent + n_clip], c_mod)
            text_f = self.text_block.post_attention(text_f, out[:, n_latent + n_clip :], t_mod)
        return latent, clip_f, text_f


class FinalBlock(nn.Module):
    """adaLN (shift, scale) then a k=7 channel-last conv to the patch width (docs/method.md §2.8)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.conv = ChannelLastConv1d(dim, out_dim, kernel_size=7, padding=3)

    def forward(self, latent: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.conv(modulate(self.norm(latent), shift, scale))


__all__ = [
    "HEAD_DIM",
    "ChannelLastConv1d",
    "ConvMLP",
    "FinalBlock",
    "JointBlock",
    "MLP",
    "MMDitSingleBlock",
    "SelfAttention",
    "TimestepEmbedder",
    "apply_rope",
    "attention",
    "compute_rope_rotations",
    "modulate",
    "swiglu_hidden_dim",
    "timestep_frequencies",
]
