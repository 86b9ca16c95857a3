"""Optional per-frequency Wiener skip from the noisy input to the x̂ output (docs/method.md §2.14).

The network's own output x̂ = F(x_t) passes through a LayerNorm of each token's hidden vector
and a projection of 128-256 channels per 200-sample patch in the CPU-sized presets, and does not
learn, within a CPU budget, to keep what x_t already shows at high t: the white background and
the 2-8 kHz noise of broadband sounds vanish (docs/benchmarks.md, "The demo"). With the skip,

    x̂ = F(x_t) + S⁻¹( w ⊙ S(x_t) ),   w = t / (t² + (1 - t)² e^(-s))

per frame and frequency of a lapped transform S, where s = Linear(LayerNorm(h)) is the log-power
the network expects for each frequency of each token from its last hidden state h. For a Gaussian
signal of variance e^s seen as x_t = t·x + (1 - t)·noise, w·x_t is exactly E[x | x_t] (the Wiener
gain), so the network states how much of each band each token holds and the skip keeps that much
of x_t, near zero early in the flow and all of it at t = 1. S: square-root-Hann frames of two
patches centred on the tokens, so neighbouring tokens' gains blend instead of stepping
at the boundary (the per-token DCT of the first build did, an 80 Hz buzz at 16 kHz; its weights
still load and sample as trained). The projection starts at zero weight and bias INIT_LOG_POWER:
the skip then keeps a band only close to t = 1 (w = 0.39 at t = 0.9, 0.013 at t = 0.5) and the
network starts almost as without it; it trains at training.spectral_skip_lr_scale times the
learning rate (wavflow/train/optimizer.py).

It is attached like the condition normalisation (cond_norm.py): networks without it (the
reference presets and checkpoints) keep the reference state-dict layout and numerics exactly;
weights that carry `spectral_skip.*` tensors attach it when loaded.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

PREFIX = "spectral_skip."
# Initial log-power per frequency: e^-5 ≈ 0.0067 of the lifted tokens' unit power (σ ≈ 0.08).
INIT_LOG_POWER = -5.0
# e^(-s) is formed in fp32 with s kept inside ±LOG_POWER_LIMIT: no overflow, w stays in [0, 1/t].
LOG_POWER_LIMIT = 30.0


def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix D (n, n): coefficients c = D @ x, and x = D.T @ c."""
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi / n * (k[None, :] + 0.5) * k[:, None]) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def wiener_gain(t: Tensor, log_power: Tensor) -> Tensor:
    """t / (t² + (1 - t)² e^(-s)) in fp32; t (B,) broadcast over log_power (B, N, P)."""
    tt = t.float().view(-1, *([1] * (log_power.dim() - 1)))
    s = log_power.float().clamp(-LOG_POWER_LIMIT, LOG_POWER_LIMIT)
    return tt / (tt * tt + (1 - tt) ** 2 * torch.exp(-s))


def lapped_window(patch: int) -> Tensor:
    """The square-root periodic Hann window of 2 * patch samples: squared, its copies one patch
    apart sum to 1, so analysis and synthesis with it reconstruct any signal exactly."""
    return torch.hann_window(2 * patch, periodic=True, dtype=torch.float64).sqrt().float()


def token_frames(x: Tensor, window: Tensor) -> Tensor:
    """(B, N, P) patches -> (B, N + 2, 2P) windowed frames of 2P samples, frame j centred on the
    middle of token j - 1 (zeros beyond the clip): frame 0 and frame N + 1 reach half a token
    into the clip, so that the squared windows sum to 1 over every sample of it."""
    b, n, p = x.shape
    edge = p + p // 2
    wave = torch.nn.functional.pad(x.reshape(b, n * p), (edge, edge + (p % 2)))
    return wave.unfold(-1, 2 * p, p)[:, : n + 2] * window


def overlap_add(frames: Tensor, n: int) -> Tensor:
    """(B, N + 2, 2P) windowed frames from token_frames -> the (B, N, P) patches they cover."""
    b, count, two_p = frames.shape
    p = two_p // 2
    zero = frames.new_zeros(b, 1, p)
    blocks = torch.cat([frames[..., :p], zero], dim=1) + torch.cat([zero, frames[..., p:]], dim=1)
    edge = p + p // 2
    return blocks.reshape(b, (count + 1) * p)[:, edge: edge + n * p].reshape(b, n, p)


def frame_log_power(log_power: Tensor) -> Tensor:
    """(B, N, P) per-token log-powers -> (B, N + 2, P + 1) per frame of token_frames and rfft bin:
    each frame takes its token's (the two outer frames: the first and last token's); bin k of a
    2P-point rfft lies at DCT frequency k, and the Nyquist bin P takes frequency P - 1's."""
    s = log_power.float().clamp(-LOG_POWER_LIMIT, LOG_POWER_LIMIT)
    frames = torch.cat([s[:, :1], s, s[:, -1:]], dim=1)
    return torch.cat([frames, frames[..., -1:]], dim=-1)


class SpectralSkip(nn.Module):
    """`lapped=True` (networks built now): each token's gains act on a frame centred on it that
    overlaps its neighbours', so neighbouring tokens' gains blend and the skip adds no step at a
    token boundary. `lapped=False`: the per-token DCT of the first build, kept so that its
    weights load and sample as trained."""

    def __init__(self, hidden_dim: int, patch: int, lapped: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.log_power = nn.Linear(hidden_dim, patch)
        nn.init.zeros_(self.log_power.weight)
        nn.init.constant_(self.log_power.bias, INIT_LOG_POWER)
        self.patch = patch
        self.lapped = lapped
        if lapped:
            # The weights' mark of the lapped transform (state_is_lapped): a frozen parameter, not a
            # buffer, so that the EMA weights, which hold every named parameter, carry it too.
            self.lapped_frames = nn.Parameter(torch.ones(1), requires_grad=False)
            self.register_buffer("window", lapped_window(patch), persistent=False)
        else:
            self.register_buffer("dct", dct_matrix(patch), persistent=False)

    def forward(self, x: Tensor, latent: Tensor, t: Tensor) -> Tensor:
        """The skip term for patches x (B, N, P) given the last hidden states latent (B, N, dim)."""
        log_power = self.log_power(self.norm(latent))
        if not self.lapped:
            gain = wiener_gain(t, log_power)
            dct = self.dct.to(torch.float32)
            return ((x.float() @ dct.T) * gain) @ dct
        n, p = x.shape[1], x.shape[2]
        window = self.window.to(torch.float32)
        # rfft of every frame over sqrt(P): white noise of unit variance has unit power in every
        # bin, as it has in every frequency of the orthonormal DCT
        spec = torch.fft.rfft(token_frames(x.float(), window), dim=-1) / math.sqrt(p)
        gained = spec * wiener_gain(t, frame_log_power(log_power))
        return overlap_add(torch.fft.irfft(gained * math.sqrt(p), n=2 * p, dim=-1) * window, n)


def state_has_spectral_skip(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(PREFIX) for k in state_dict)


def state_is_lapped(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether weights with the skip were trained with its lapped transform (else the per-token DCT)."""
    return PREFIX + "lapped_frames" in state_dict
