"""The tiny network learns with the flow-matching pieces: over-fit one example on CPU.

This is the end-to-end check that `sample_t` / `interpolate` / `flow_loss` (x-prediction,
v-loss, the default) give a useful training signal to the real network: the loss over the
last steps must fall well below the loss over the first steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from wavflow.model.flow import flow_loss, interpolate, sample_t
from wavflow.shapes import latent_seq_len

SR, DURATION = 16000, 0.25  # N = 20 waveform patches
CLIP_LEN, SYNC_LEN, TEXT_LEN = 16, 40, 77  # data-config lengths of a 2 s clip
CLIP_DIM, SYNC_DIM, TEXT_DIM = 1024, 768, 1024
BATCH, STEPS, WINDOW, LR = 4, 80, 20, 1e-3
# Measured (seeds 0/1, this set-up, 1 thread): first-window mean 3.51, last-window mean
# 0.055, ratio 64 (100 steps: 516; 60 steps: 31). 80 steps take ~11 s alone, up to ~50 s on the shared
# 2-core machine depending on load, hence 80 and not the 200-300 first planned.
# The assertion asks for a fraction of it so that thread scheduling / BLAS differences
# cannot make it flaky, while a broken loss, interpolant or time sampler (no learning, or
# learning the wrong target) stays far below it.
REQUIRED_RATIO = 10.0


@pytest.mark.slow
def test_tiny_model_overfits_one_example():
    model_mod = pytest.importorskip("wavflow.model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        n = latent_seq_len(SR, DURATION)
        model = model_mod.build_model(
            "tiny_16k", latent_seq_len=n, clip_seq_len=CLIP_LEN, sync_seq_len=SYNC_LEN,
            text_seq_len=TEXT_LEN, clip_dim=CLIP_DIM, sync_dim=SYNC_DIM, text_dim=TEXT_DIM,
        )
        g = torch.Generator().manual_seed(1)
        # One example: a lifted 440 Hz sine (RMS 0.33, x audio_scale 3) and random features.
        time_axis = torch.arange(n * 200) / SR
        wave = torch.sin(2 * math.pi * 440 * time_axis) * 0.33 * math.sqrt(2) * 3.0
        x1 = wave.reshape(1, n, 200).expand(BATCH, n, 200)
        clip = torch.randn(1, CLIP_LEN, CLIP_DIM, generator=g).expand(BATCH, -1, -1)
        sync = torch.randn(1, SYNC_LEN, SYNC_DIM, generator=g).expand(BATCH, -1, -1)
        text = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g).expand(BATCH, -1, -1)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        losses = []
        for _ in range(STEPS):
            t_s = sample_t(BATCH, generator=g)
            x0 = torch.randn(x1.shape, generator=g)
            xt = interpolate(x0, x1, t_s)
            pred = model(xt, clip, sync, text, t_s)
            loss = flow_loss(pred, x0, x1, xt, t_s, prediction_type="x", loss_type="v").mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert all(math.isfinite(v) for v in losses)
    first = sum(losses[:WINDOW]) / WINDOW
    last = sum(losses[-WINDOW:]) / WINDOW
    print(f"loss first {WINDOW} steps {first:.4f}, last {WINDOW} steps {last:.4f}, ratio {first / last:.1f}")
    assert first / last > REQUIRED_RATIO, (first, last, losses)
