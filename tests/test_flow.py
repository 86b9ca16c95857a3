"""Flow matching: losses against independent formulas, time grid, samplers with oracles, CFG."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torchdiffeq import odeint

from wavflow.model import build_model
from wavflow.model.flow import (
    adaptive_sample,
    cfg_denoiser,
    euler_sample,
    flow_loss,
    heun_sample,
    interpolate,
    sample,
    sample_t,
    shift_time,
    time_grid,
    velocity,
)


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.fixture
def batch():
    x0, x1, pred = _rand(3, 4, 6, seed=1), _rand(3, 4, 6, seed=2), _rand(3, 4, 6, seed=3)
    t_s = torch.tensor([0.1, 0.5, 0.999999])
    return x0, x1, pred, t_s


# ----------------------------------------------------------------------------- time + losses


def test_sample_t_uniform_share_mixes_in_uniform_times_and_leaves_the_reference_stream_alone():
    """uniform_frac=0 draws exactly the reference's stream; with it, the share of times above
    0.9 is (1 - f) * P_logit-normal(t > 0.9) + f * 0.1."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_t(64, generator=g1, mean=-1.5, scale=1.6),
                       sample_t(64, generator=g2, mean=-1.5, scale=1.6, uniform_frac=0.0))
    f, n = 0.2, 200_000
    t = sample_t(n, generator=torch.Generator().manual_seed(4), mean=-1.5, scale=1.6, uniform_frac=f)
    z = (math.log(0.9 / 0.1) + 1.5) / 1.6  # t > 0.9 <=> n > z
    logit_normal_tail = 0.5 * math.erfc(z / math.sqrt(2))
    expected = (1 - f) * logit_normal_tail + f * 0.1
    assert float((t > 0.9).float().mean()) == pytest.approx(expected, abs=0.002)
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0


def test_sample_t_is_logit_normal_from_generator():
    g = torch.Generator().manual_seed(7)
    t = sample_t(5, generator=g, mean=0.3, scale=1.5)
    n = torch.randn(5, generator=torch.Generator().manual_seed(7))
    assert t.shape == (5,)
    torch.testing.assert_close(t, 1 / (1 + torch.exp(-(n * 1.5 + 0.3))), rtol=0, atol=1e-6)


def test_shift_time_numerics_and_identity():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert shift_time(t, 1.0) is t  # no arithmetic at all for shift 1
    torch.testing.assert_close(shift_time(t, 3.0), torch.tensor([0.0, 0.25 / 2.5, 0.5 / 2.0, 1.0]))


def test_interpolate_formula(batch):
    x0, x1, _, t_s = batch
    for min_sigma in (0.0, 0.1):
        xt = interpolate(x0, x1, t_s, min_sigma)
        for b in range(3):
            tb = float(t_s[b])
            torch.testing.assert_close(xt[b], (1 - (1 - min_sigma) * tb) * x0[b] + tb * x1[b])


def test_loss_x_x(batch):
    x0, x1, pred, t_s = batch
    xt = interpolate(x0, x1, t_s)
    got = flow_loss(pred, x0, x1, xt, t_s, prediction_type="x", loss_type="x")
    expect = torch.stack([((pred[b] - x1[b]) ** 2).mean() for b in range(3)])
    torch.testing.assert_close(got, expect)


def test_loss_x_v_two_quotients_and_clamp(batch):
    x0, x1, pred, t_s = batch
    t_s = torch.tensor([0.1, 0.5, 1.0])  # t_s = 1 exercises the 1e-6 clamp
    xt = interpolate(x0, x1, t_s)
    got = flow_loss(pred, x0, x1, xt, t_s, prediction_type="x", loss_type="v")
    expect = []
    for b in range(3):
        c = max(1.0 - float(t_s[b]), 1e-6)
        expect.append((((pred[b] - xt[b]) / c - (x1[b] - xt[b]) / c) ** 2).mean())
    torch.testing.assert_close(got, torch.stack(expect))
    # The separate-quotient form is bitwise what we compute.
    c = torch.clamp(1 - t_s, min=1e-6)[:, None, None]
    assert torch.equal(got, (((pred - xt) / c - (x1 - xt) / c) ** 2).mean(dim=(1, 2)))


def test_loss_v_v(batch):
    x0, x1, pred, t_s = batch
    ms = 0.05
    xt = interpolate(x0, x1, t_s, ms)
    got = flow_loss(pred, x0, x1, xt, t_s, prediction_type="v", loss_type="v", min_sigma=ms)
    expect = torch.stack([((pred[b] - (x1[b] - (1 - ms) * x0[b])) ** 2).mean() for b in range(3)])
    torch.testing.assert_close(got, expect)


def test_loss_v_x_no_clamp(batch):
    x0, x1, pred, t_s = batch
    xt = interpolate(x0, x1, t_s)
    got = flow_loss(pred, x0, x1, xt, t_s, prediction_type="v", loss_type="x")
    expect = torch.stack(
        [((xt[b] + (1 - float(t_s[b])) * pred[b] - x1[b]) ** 2).mean() for b in range(3)]
    )
    torch.testing.assert_close(got, expect)


def test_invalid_loss_combination_names_both(batch):
    x0, x1, pred, t_s = batch
    with pytest.raises(ValueError, match=r"prediction_type='eps'.*loss_type='v'"):
        flow_loss(pred, x0, x1, x1, t_s, prediction_type="eps", loss_type="v")
    with pytest.raises(ValueError, match=r"prediction_type='x'.*loss_type='score'"):
        flow_loss(pred, x0, x1, x1, t_s, prediction_type="x", loss_type="score")


def test_velocity_x_prediction_clamp():
    x, pred = _rand(2, 3, seed=4), _rand(2, 3, seed=5)
    torch.testing.assert_close(velocity(pred, x, torch.tensor(0.75), "x"), (pred - x) / 0.25)
    torch.testing.assert_close(velocity(pred, x, torch.tensor(1.0), "x"), (pred - x) / 1e-6)
    assert velocity(pred, x, torch.tensor(0.5), "v") is pred


# ----------------------------------------------------------------------------- grid + samplers


@pytest.mark.parametrize("shift,min_sigma", [(1.0, 0.0), (3.0, 0.0), (2.0, 0.1)])
def test_time_grid_is_shifted_float32_cpu_linspace(shift, min_sigma):
    grid = time_grid(10, shift, min_sigma)
    assert grid.dtype == torch.float32 and grid.device.type == "cpu"
    r = [(1 - min_sigma) * i / 10 for i in range(11)]
    expect = torch.tensor([x / (x + shift * (1 - x)) for x in r], dtype=torch.float32)
    torch.testing.assert_close(grid, expect, rtol=0, atol=1e-6)
    assert grid[0] == 0.0
    if min_sigma == 0.0:
        assert grid[-1] == 1.0


class _Recorder:
    """A fake x-prediction model: records each t it sees and returns a fixed x1."""

    def __init__(self, x1):
        self.x1, self.ts = x1, []

    def __call__(self, t, x):
        assert t.ndim == 0
        self.ts.append(float(t))
        return self.x1


def test_euler_never_calls_model_at_t1_and_uses_grid():
    x0, x1 = _rand(2, 5, 4, seed=1), _rand(2, 5, 4, seed=2)
    rec = _Recorder(x1)
    euler_sample(rec, x0, num_steps=8, shift=3.0)
    assert rec.ts == time_grid(8, 3.0)[:-1].tolist()
    assert max(rec.ts) < 1.0


def test_euler_matches_hand_loop_for_generic_model():
    """The step rule itself, against a loop written from the spec, with a state-dependent fn."""
    x0 = _rand(2, 5, 4, seed=1)

    def fn(t, x):
        return torch.tanh(x) * (1 + t)

    got = euler_sample(fn, x0, num_steps=5, shift=2.0)
    r = torch.linspace(0, 1, 6)
    steps = r / (r + 2.0 * (1 - r))
    x = x0
    for i in range(5):
        t = steps[i]
        v = (fn(t, x) - x) / torch.clamp(1 - t, min=1e-6)
        x = x + (steps[i + 1] - t) * v
    assert torch.equal(got, x)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("sampler", [euler_sample, heun_sample])
def test_oracle_recovers_x1(sampler, shift):
    x0, x1 = _rand(2, 5, 4, seed=1), _rand(2, 5, 4, seed=2)
    rec = _Recorder(x1)
    out = sampler(rec, x0, num_steps=6, shift=shift, prediction_type="x")
    torch.testing.assert_close(out, x1, rtol=0, atol=1e-5)
    assert max(rec.ts) < 1.0  # Heun's last step is Euler: no call at t = 1
    # v-prediction oracle: the straight-path velocity x1 - x0
    out_v = sampler(lambda t, x: x1 - x0, x0, num_steps=6, shift=shift, prediction_type="v")
    torch.testing.assert_close(out_v, x1, rtol=0, atol=1e-5)


def test_heun_is_second_order_euler_first():
    """On Gaussian data the exact flow map is known; Heun must beat Euler by a wide margin."""
    x0 = _rand(3, 4, seed=1)
    out_e = euler_sample(_gaussian_oracle, x0, num_steps=20)
    out_h = heun_sample(_gaussian_oracle, x0, num_steps=20)
    target = MU + SIGMA * x0
    err_e, err_h = (out_e - target).abs().max(), (out_h - target).abs().max()
    assert err_h < err_e / 5, (err_e, err_h)


MU, SIGMA = 1.0, 0.5


def _gaussian_oracle(t, x):
    """Exact E[x1 | x_t = x] for data x1 ~ N(MU, SIGMA^2) per element, x0 ~ N(0, 1).

    The probability-flow ODE then maps x0 to exactly MU + SIGMA * x0 (the monotone map between
    the two 1-D Gaussians), whatever time parameterisation the solver uses.
    """
    t = torch.as_tensor(t)
    return MU + t * SIGMA**2 * (x - t * MU) / ((1 - t) ** 2 + t**2 * SIGMA**2)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_adaptive_recovers_x1_and_gaussian_map(shift):
    x0, x1 = _rand(2, 5, 4, seed=1), _rand(2, 5, 4, seed=2)
    rec = _Recorder(x1)
    out = adaptive_sample(rec, x0, shift=shift, prediction_type="x")
    torch.testing.assert_close(out, x1, rtol=0, atol=1e-4)
    assert max(rec.ts) <= 1.0  # the solver lands on t=1, never steps past it
    out_g = adaptive_sample(_gaussian_oracle, x0, shift=shift, prediction_type="x")
    torch.testing.assert_close(out_g, MU + SIGMA * x0, rtol=0, atol=1e-4)


def test_reference_unshifted_adaptive_is_wrong_under_shift():
    """docs/method.md §10.2: the reference integrates v(shift(t)) in t without dt_s/dt. Under shift 3
    that lands far from the exact Gaussian map; ours (with the Jacobian) does not."""
    x0 = _rand(2, 5, 4, seed=1)
    target = MU + SIGMA * x0

    def reference_velocity(t, x):
        t_s = shift_time(t, 3.0)
        return velocity(_gaussian_oracle(t_s, x), x, t_s, "x")

    ref = odeint(reference_velocity, x0, torch.tensor([0.0, 1.0]))[-1]
    ours = adaptive_sample(_gaussian_oracle, x0, shift=3.0, prediction_type="x")
    assert (ref - target).abs().max() > 0.1
    assert (ours - target).abs().max() < 1e-4


def test_sample_dispatcher():
    x0, x1 = _rand(2, 3, seed=1), _rand(2, 3, seed=2)
    for method in ("euler", "heun", "adaptive"):
        out = sample(method, lambda t, x: x1, x0, num_steps=4, shift=2.0, min_sigma=0.0,
                     prediction_type="x")
        torch.testing.assert_close(out, x1, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="rk4"):
        sample("rk4", lambda t, x: x1, x0, num_steps=4)


# ----------------------------------------------------------------------------- CFG


class Cond(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


class StandInModel:
    """predict_flow whose output depends on x, t and the conditions; counts calls and batch."""

    def __init__(self):
        self.calls: list[int] = []

    def predict_flow(self, x, t, conditions):
        self.calls.append(x.shape[0])
        a, b = conditions[0], conditions[1]
        return x * a[:, None, :1] + b.mean(dim=1)[:, None, None] + t[:, None, None] ** 2


@pytest.fixture
def cfg_setup():
    x = _rand(2, 3, 4, seed=1)
    cond = Cond(_rand(2, 5, seed=2), _rand(2, 6, seed=3))
    empty = Cond(_rand(1, 5, seed=4).expand(2, 5), _rand(1, 6, seed=5).expand(2, 6))
    return x, cond, empty


def test_cfg_one_is_conditional_only_single_call(cfg_setup):
    x, cond, empty = cfg_setup
    model = StandInModel()
    fn = cfg_denoiser(model, cond, empty, 1.0)
    out = fn(torch.tensor(0.3), x)
    assert model.calls == [2]
    torch.testing.assert_close(out, StandInModel().predict_flow(x, torch.full((2,), 0.3), cond))
    # one call per Euler step
    model.calls.clear()
    euler_sample(fn, x, num_steps=5)
    assert model.calls == [2] * 5


@pytest.mark.parametrize("cond_kind", ["namedtuple", "tuple", "list"])
def test_cfg_batched_equals_two_pass(cfg_setup, cond_kind):
    x, cond, empty = cfg_setup
    if cond_kind == "tuple":
        cond, empty = tuple(cond), tuple(empty)
    elif cond_kind == "list":
        cond, empty = list(cond), list(empty)
    t = torch.tensor(0.4)
    ref_model = StandInModel()
    two_pass = cfg_denoiser(ref_model, cond, empty, 4.5, batched=False)(t, x)
    assert ref_model.calls == [2, 2]
    model = StandInModel()
    batched = cfg_denoiser(model, cond, empty, 4.5)(t, x)
    assert model.calls == [4]
    t_vec = torch.full((2,), 0.4)
    p_c = StandInModel().predict_flow(x, t_vec, cond)
    p_u = StandInModel().predict_flow(x, t_vec, empty)
    expect = 4.5 * p_c + (1 - 4.5) * p_u
    assert torch.equal(two_pass, expect)
    torch.testing.assert_close(batched, expect)
    assert not torch.allclose(p_c, p_u)  # the conditions really matter


def test_cfg_interval_off_outside(cfg_setup):
    x, cond, empty = cfg_setup
    model = StandInModel()
    fn = cfg_denoiser(model, cond, empty, 3.0, cfg_interval=(0.2, 0.6))
    cond_only = StandInModel().predict_flow(x, torch.full((2,), 0.8), cond)
    torch.testing.assert_close(fn(torch.tensor(0.8), x), cond_only)
    assert model.calls == [2]  # no unconditional pass outside the interval
    inside = fn(torch.tensor(0.5), x)
    assert model.calls == [2, 4]
    t_vec = torch.full((2,), 0.5)
    expect = 3.0 * StandInModel().predict_flow(x, t_vec, cond) - 2.0 * StandInModel().predict_flow(
        x, t_vec, empty
    )
    torch.testing.assert_close(inside, expect)



def test_cfg_with_real_network_conditions():
    """Batched CFG on the real WavFlowNet `Conditions` (expand-view empty conditions) equals the
    reference two-pass ode_wrapper, and both differ from the conditional prediction."""
    torch.manual_seed(0)
    net = build_model("tiny_16k", latent_seq_len=4, clip_seq_len=8, sync_seq_len=8,
                                text_seq_len=5)
    with torch.no_grad():
        for p in net.parameters():  # a fresh model outputs exactly 0: give it random weights
            p.normal_(0, 0.02)
    net.eval()
    bs = 2
    clip = _rand(bs, 8, net.clip_dim, seed=1)
    sync = _rand(bs, 8, net.sync_dim, seed=2)
    text = _rand(bs, 5, net.text_dim, seed=3)
    x = _rand(bs, 4, 200, seed=4)
    with torch.no_grad():
        cond = net.preprocess_conditions(clip, sync, text)
        empty = net.get_empty_conditions(bs)
        t = torch.tensor(0.3)
        two_pass = cfg_denoiser(net, cond, empty, 4.5, batched=False)(t, x)
        batched = cfg_denoiser(net, cond, empty, 4.5)(t, x)
        cond_only = cfg_denoiser(net, cond, empty, 1.0)(t, x)
    torch.testing.assert_close(batched, two_pass, rtol=1e-4, atol=1e-5)
    assert (two_pass - cond_only).abs().max() > 1e-3


def _counted(fn):
    calls = [0]

    def wrapped(t, x):
        calls[0] += 1
        return fn(t, x)

    return wrapped, calls


def test_adaptive_stops_short_of_t1_and_finishes_with_the_exact_x_step():
    """The x-prediction velocity is singular at t=1; stopping at t_end and taking the last
    prediction as the answer costs far fewer calls than Euler-50 and loses no accuracy."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    exact, calls = _counted(lambda t, x: x1)  # an exact x-predictor
    out = adaptive_sample(exact, x0, rtol=1e-3, atol=1e-3, t_end=0.98)
    assert torch.equal(out, x1) and calls[0] < 50, calls
    # A predictor off by a state-dependent 1e-2: compare with a fine Euler solve.
    off = lambda t, x: x1 + 1e-2 * torch.tanh(x)  # noqa: E731
    fine = euler_sample(off, x0, num_steps=2000)
    e50 = float((euler_sample(off, x0, num_steps=50) - fine).abs().max())
    fn, calls = _counted(off)
    out = adaptive_sample(fn, x0, rtol=1e-3, atol=1e-3, t_end=0.98)
    assert float((out - fine).abs().max()) <= e50 + 1e-4 and calls[0] < 50, (calls, e50)
    # Through the dispatcher, with the solver named; t_end must lie below the end time.
    assert torch.equal(sample("adaptive", exact, x0, num_steps=1, adaptive={"t_end": 0.9, "method": "bosh3"}), x1)
    with pytest.raises(ValueError, match="t_end must lie in"):
        adaptive_sample(exact, x0, t_end=1.0)
