"""Optional per-frequency Wiener skip from the noisy input to the x̂ output (docs/method.md §2.14).

The network's own output x̂ = F(x_t) passes through a LayerNorm of each token's hidden vector
and a projection of 128-256 channels per 200-sample patch in the CPU-sized presets, and does not
learn, within a CPU budget, to keep what x_t already shows at high t: the white background and
the 2-8 kHz noise of broadband sounds vanish (docs/benchmarks.md, "The demo"). With the skip,

    x̂ = F(x_t) + IDCT( w ⊙ DCT(x_t) ),   w = t / (t² + (1 - t)² e^(-s))

per token and per DCT-II frequency of its patch, where s = Linear(LayerNorm(h)) is the log-power
the network estimates for that frequency of that token from its last hidden state h. For a
Gaussian signal of variance e^s seen as x_t = t·x + (1 - t)·noise, w·x_t is exactly E[x | x_t]
(the Wiener gain), so the network states how much of each band each token holds and the skip
keeps that much of x_t, near zero early in the flow and all of it at t = 1. The projection starts
at zero weight and bias INIT_LOG_POWER: the skip then keeps a band only close to t = 1 (w = 0.39 at
t = 0.9, 0.013 at t = 0.5) and the network starts almost as without it.

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


class SpectralSkip(nn.Module):
    def __init__(self, hidden_dim: int, patch: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.log_power = nn.Linear(hidden_dim, patch)
        nn.init.zeros_(self.log_power.weight)
        nn.init.constant_(self.log_power.bias, INIT_LOG_POWER)
        self.register_buffer("dct", dct_matrix(patch), persistent=False)

    def forward(self, x: Tensor, latent: Tensor, t: Tensor) -> Tensor:
        """The skip term for patches x (B, N, P) given the last hidden states latent (B, N, dim)."""
        gain = wiener_gain(t, self.log_power(self.norm(latent)))
        dct = self.dct.to(torch.float32)
        return ((x.float() @ dct.T) * gain) @ dct


def state_has_spectral_skip(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(PREFIX) for k in state_dict)
