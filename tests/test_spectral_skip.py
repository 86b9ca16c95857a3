"""The per-frequency Wiener skip (wavflow/model/spectral_skip.py, docs/method.md §2.14).

Formulas against their definitions, the reference layout untouched without it, checkpoints that
carry it, and a learning check: a tiny network trained briefly on a tone over a white background
must generate that background at its level (without the skip it loses it: the demo's missing
noise floor, docs/benchmarks.md).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_train_common import SHAPES as TRAIN_SHAPES
from tests.test_train_common import make_config, make_dataset, run_resumed_twice
from wavflow.errors import CheckpointError
from wavflow.io_utils import safe_torch_load
from wavflow.model import build_model
from wavflow.model.checkpoint import load_weights
from wavflow.model.flow import cfg_denoiser, euler_sample
from wavflow.model.spectral_skip import (
    INIT_LOG_POWER,
    SpectralSkip,
    dct_matrix,
    frame_log_power,
    state_has_spectral_skip,
    state_is_lapped,
    wiener_gain,
)
from wavflow.train.step import draw_step_noise, fill_missing_modalities, flow_matching_loss
from wavflow.train.trainer import run_training

SR, N = 16000, 20  # 0.25 s of 200-sample patches
SHAPES = dict(clip_seq_len=8, sync_seq_len=16, text_seq_len=77, clip_dim=1024, sync_dim=768, text_dim=1024)


def _tiny(skip: bool, lapped: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("tiny_16k", latent_seq_len=N, **SHAPES)
    if skip:
        model.attach_spectral_skip(lapped=lapped)
    return model


def _inputs(b: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, N, 200, generator=g), torch.randn(b, 8, 1024, generator=g),
            torch.randn(b, 16, 768, generator=g), torch.randn(b, 77, 1024, generator=g))


def test_dct_matrix_is_the_orthonormal_dct_ii():
    d = dct_matrix(200).double()
    assert torch.allclose(d @ d.T, torch.eye(200, dtype=torch.float64), atol=1e-6)
    n = torch.arange(200, dtype=torch.float64)
    for k in (0, 1, 37, 199):  # row k is sqrt(2/n) cos(pi k (n + 1/2) / N), row 0 scaled by 1/sqrt(2)
        want = torch.cos(math.pi * k * (n + 0.5) / 200) * math.sqrt(2 / 200) / (math.sqrt(2) if k == 0 else 1)
        assert torch.allclose(d[k], want, atol=1e-6)


def test_wiener_gain_is_the_posterior_mean_gain():
    t = torch.tensor([0.0, 0.3, 0.9, 0.99, 1.0])
    s = torch.tensor([-5.0, 0.0, 2.0])
    got = wiener_gain(t, s.expand(5, 1, 3))
    var = s.exp().double()
    tt = t.double().view(-1, 1, 1)
    want = tt * var / (tt * tt * var + (1 - tt) ** 2)  # E[x | t x + (1 - t) e] = gain * x_t, x ~ N(0, var)
    assert torch.allclose(got.double(), want, atol=1e-6)
    assert got[0].abs().max() == 0 and torch.allclose(got[-1], torch.ones(1, 3))
    assert torch.isfinite(wiener_gain(t, torch.tensor([-1e4, 1e4]).expand(5, 1, 2))).all()


@pytest.mark.parametrize("lapped", [True, False])
def test_network_adds_the_skip_term_to_the_reference_output(lapped):
    base, skip = _tiny(False), _tiny(True, lapped)
    assert base.state_dict().keys() == {k: v for k, v in skip.state_dict().items()
                                        if not k.startswith("spectral_skip.")}.keys()
    assert sorted(k for k in skip.state_dict() if k.startswith("spectral_skip.")) == [
        *(["spectral_skip.lapped_frames"] * lapped), "spectral_skip.log_power.bias", "spectral_skip.log_power.weight"]
    for p in base.parameters():  # away from the zero-initialised output layers
        torch.nn.init.normal_(p, std=0.02)
    skip.load_state_dict({**skip.state_dict(), **base.state_dict()})
    x, clip, sync, text = _inputs(3)
    t = torch.tensor([0.2, 0.9, 1.0])
    with torch.no_grad():
        diff = skip(x, clip, sync, text, t) - base(x, clip, sync, text, t)
    gain = wiener_gain(t, torch.full((3, N, 200), INIT_LOG_POWER))  # zero weight: s is the bias
    if lapped:  # one gain for every frame and bin: the lapped transform gives it back exactly
        assert torch.allclose(diff, gain * x, atol=1e-5)
    else:
        d = dct_matrix(200)
        assert torch.allclose(diff, ((x @ d.T) * gain) @ d, atol=1e-5)
    # at t = 1 the skip passes x_t whole: with a log-power the projection makes large, F + x_t
    with torch.no_grad():
        skip.spectral_skip.log_power.bias.fill_(20.0)
        passed = skip(x, clip, sync, text, torch.ones(3)) - base(x, clip, sync, text, torch.ones(3))
    assert torch.allclose(passed, x, atol=1e-5)


def _lapped_by_hand(x: torch.Tensor, log_power: torch.Tensor, t: float) -> torch.Tensor:
    """The lapped skip written out in float64 for one clip (N, P): a sqrt-Hann frame of 2P samples
    centred on the middle of every token and of one token beyond each end (zeros beyond the clip),
    its rfft over sqrt(P), each bin times the Wiener gain of its token's log-power (the nearest
    token's beyond the ends), back, windowed again, overlap-added."""
    n, p = x.shape
    pad = 2 * p
    wave = torch.cat([torch.zeros(pad), x.double().reshape(-1), torch.zeros(pad)])
    window = torch.sin(torch.pi * torch.arange(2 * p, dtype=torch.float64) / (2 * p))  # sqrt of periodic Hann
    power = log_power.double().exp()
    out = torch.zeros_like(wave)
    for j in range(-1, n + 1):
        token_power = power[min(max(j, 0), n - 1)]
        token_power = torch.cat([token_power, token_power[-1:]])  # the Nyquist bin
        gain = t * token_power / (t * t * token_power + (1 - t) ** 2)
        start = pad + j * p - p // 2
        spec = torch.fft.rfft(wave[start: start + 2 * p] * window) / p ** 0.5
        out[start: start + 2 * p] += torch.fft.irfft(spec * gain * p ** 0.5, n=2 * p) * window
    return out[pad:-pad].reshape(n, p)


def test_the_lapped_skip_is_the_overlap_added_wiener_filter():
    g = torch.Generator().manual_seed(3)
    skip = SpectralSkip(16, 200)
    x, latent = torch.randn(2, N, 200, generator=g), torch.randn(2, N, 16, generator=g)
    with torch.no_grad():
        skip.log_power.weight.normal_(0, 1.0, generator=g)
        log_power = skip.log_power(skip.norm(latent))
        got = skip(x, latent, torch.tensor([0.7, 0.7]))
    for b in range(2):
        assert torch.allclose(got[b].double(), _lapped_by_hand(x[b], log_power[b], 0.7), atol=1e-4)
    frames = frame_log_power(torch.tensor([[[0.0, 1.0], [2.0, -1.0]]]))
    assert frames.tolist() == [[[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [2.0, -1.0, -1.0], [2.0, -1.0, -1.0]]]


def test_gains_that_change_from_token_to_token_leave_no_step_at_token_boundaries():
    """The per-token DCT form put a step at every boundary between tokens of different gains (an
    80 Hz buzz at 16 kHz: generated clips' steps there were 3-6x those inside tokens)."""
    x = torch.sin(2 * math.pi * 300 * torch.arange(N * 200) / SR + 0.7).reshape(1, N, 200)
    latent = torch.zeros(1, N, 16)
    latent[0, ::2, 0], latent[0, ::2, 1] = 1.0, -1.0  # even and odd tokens: two different log-powers
    steps = {}
    for lapped in (True, False):
        skip = SpectralSkip(16, 200, lapped=lapped)
        with torch.no_grad():
            skip.log_power.weight[:, 0] = 4.0
            skip.log_power.bias.fill_(-2.0)
            out = skip(x, latent, torch.tensor([0.6])).reshape(-1)
        jumps = (out[1:] - out[:-1]).abs()
        boundary = (torch.arange(len(jumps)) + 1) % 200 == 0
        steps[lapped] = float(jumps[boundary].max() / jumps[~boundary].max())
    assert steps[True] < 1.1, steps
    assert steps[False] > 2.0, steps  # the check can see the step it guards against


def test_weights_with_the_skip_attach_it_and_weights_without_name_the_key():
    sd = _tiny(True).state_dict()
    assert state_has_spectral_skip(sd) and state_is_lapped(sd)
    plain = _tiny(False)
    load_weights(plain, sd, source="skip weights")  # as prediction builds it: attached on load
    assert plain.spectral_skip is not None and plain.spectral_skip.lapped
    assert torch.equal(plain.spectral_skip.log_power.bias, sd["spectral_skip.log_power.bias"])
    with pytest.raises(CheckpointError, match="model.spectral_skip=false"):
        load_weights(_tiny(True), _tiny(False).state_dict(), source="old weights")


def test_weights_of_the_per_token_dct_skip_load_and_sample_as_trained():
    old = _tiny(True, lapped=False).state_dict()
    assert state_has_spectral_skip(old) and not state_is_lapped(old)
    plain = _tiny(False)
    load_weights(plain, old, source="dct weights")
    assert plain.spectral_skip is not None and not plain.spectral_skip.lapped
    with pytest.raises(CheckpointError, match="per-token DCT form"):
        load_weights(_tiny(True), old, source="dct weights")


def _hf_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS of each clip's content above 4 kHz (the tone below has none)."""
    spec = torch.fft.rfft(x.reshape(x.shape[0], -1), dim=-1)
    spec[:, torch.fft.rfftfreq(N * 200, 1 / SR) < 4000] = 0
    return torch.fft.irfft(spec, n=N * 200).pow(2).mean(-1).sqrt()


def _train_tone_over_background(model: torch.nn.Module, background: float, steps: int) -> torch.Tensor:
    """An 80 Hz tone (RMS 1) over white noise of RMS `background`, no conditions (as the
    trainer's step functions see rows without video or caption); returns the tone's patches."""
    g = torch.Generator().manual_seed(1)
    tone = (torch.sin(2 * math.pi * 80 * torch.arange(N * 200) / SR) * math.sqrt(2)).reshape(N, 200)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    absent = torch.zeros(8, dtype=torch.bool)
    model.train()
    for _ in range(steps):
        x1 = tone + background * torch.randn(8, N, 200, generator=g)
        clip, sync, text = fill_missing_modalities(model, torch.zeros(8, 8, 1024), torch.zeros(8, 16, 768),
                                                   torch.zeros(8, 77, 1024), absent, absent)
        noise = draw_step_noise(g, x1, mean=-1.0, scale=1.6, noise_scale=1.0)
        out = flow_matching_loss(model, x1, clip, sync, text, noise, prediction_type="x", loss_type="v",
                                 noise_shift=1.0, min_sigma=0.0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return tone


@pytest.mark.slow
def test_a_white_background_is_generated_at_its_level():
    """Measured +1.6 to +2.0 dB; with the skip dropped from the forward pass -8.0 dB (docs/testing.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _tiny(True)
        background = 0.1  # -20 dB under the tone; white, so its content above 4 kHz has RMS 0.1 * sqrt(1/2)
        tone = _train_tone_over_background(model, background, steps=300)
        model.eval()
        with torch.no_grad():
            empty = model.get_empty_conditions(4)
            x0 = torch.randn(4, N, 200, generator=torch.Generator().manual_seed(7))
            out = euler_sample(cfg_denoiser(model, empty, model.get_empty_conditions(4), 1.0), x0, num_steps=25)
    finally:
        torch.set_num_threads(threads)
    level_db = 20 * torch.log10(_hf_rms(out) / (background * math.sqrt(0.5)))
    tone_error = float((out - tone).pow(2).mean().sqrt())
    print(f"background above 4 kHz: {level_db.tolist()} dB against the data's; tone RMS error {tone_error:.3f}")
    assert tone_error < 0.25
    assert level_db.abs().max() < 3.0


def test_a_run_with_the_skip_trains_it_and_resumes_bit_identically(tmp_path):
    csv = make_dataset(tmp_path)
    run, a, _ = run_resumed_twice(tmp_path, csv, model__spectral_skip=True, training__epochs=2)
    for entry in ("model", "model_ema1"):  # prediction's EMA weights carry the lapped form's mark too
        assert {"spectral_skip.log_power.weight", "spectral_skip.log_power.bias",
                "spectral_skip.lapped_frames"} <= set(a[entry])
        fresh = build_model("tiny_16k", latent_seq_len=16, **TRAIN_SHAPES)
        load_weights(fresh, a[entry], source=entry)
        assert fresh.spectral_skip.lapped
    assert a["model"]["spectral_skip.log_power.weight"].abs().max() > 0  # it trained
    assert "Spectral skip: on" in (run / "training.log").read_text()
    plain = run_training(make_config(tmp_path / "c", csv, training__epochs=1))
    assert not any(k.startswith("spectral_skip.") for k in safe_torch_load(plain.exp_dir / "checkpoint_latest.pth")["model"])


def test_the_skip_learns_at_its_own_rate_and_a_resumed_run_takes_the_configured_one(tmp_path):
    from wavflow.train.lr_schedule import apply_lr
    from wavflow.train.trainer import Trainer

    csv = make_dataset(tmp_path)
    run_training(make_config(tmp_path, csv, model__spectral_skip=True, training__max_steps=1))
    tr = Trainer(make_config(tmp_path, csv, model__spectral_skip=True, training__spectral_skip_lr_scale=3.0))
    assert tr.progress.global_step == 1  # resumed: the saved groups were loaded
    names = {id(p): n for n, p in tr.model.named_parameters()}
    groups = tr.optimizer.param_groups
    assert len(groups) == 3
    assert sorted(names[id(p)] for p in groups[2]["params"]) == [
        "spectral_skip.log_power.bias", "spectral_skip.log_power.weight"]
    assert groups[2]["weight_decay"] == 0.0 and groups[2]["lr_scale"] == 3.0  # the config's, not the saved 10
    assert not any("spectral_skip" in names[id(p)] for g in groups[:2] for p in g["params"])
    apply_lr(tr.optimizer, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, pytest.approx(3e-3)]
