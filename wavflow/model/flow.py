"""Flow matching: time sampling, interpolant, losses, ODE samplers and classifier-free guidance.

Spec: docs/method.md §3 (flow matching) and §2.11 (ode_wrapper / CFG). Time convention: t=0 is
noise (x0), t=1 is data (x1). Nothing here imports the network: samplers take any callable
`fn(t, x) -> model output` (t a 0-d tensor), and `cfg_denoiser` only needs an object with
`predict_flow(x, t_vec, conditions)`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

PredictionFn = Callable[[Tensor, Tensor], Tensor]

PREDICTION_TYPES = ("x", "v")
LOSS_TYPES = ("x", "v")
SAMPLING_METHODS = ("euler", "heun", "adaptive")
# torchdiffeq solvers with step-size control (they accept the `step_t` option).
_ADAPTIVE_RK_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")

# Clamp of (1 - t) in the x-prediction -> velocity conversion and in the x/v loss (docs/method.md §3).
ONE_MINUS_T_MIN = 1e-6


# ----------------------------------------------------------------------------- time


def sample_t(
    batch: int,
    *,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    scale: float = 1.0,
    uniform_frac: float = 0.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Logit-normal training times `sigmoid(n*scale + mean)`, n ~ N(0, 1) of shape (batch,).

    With `uniform_frac` > 0 each time is instead uniform on (0, 1) with that probability (two
    more draws per row, after n), so both ends of the flow are trained: near t = 1 the network
    learns to keep the fine texture x_t already shows, such as a recording's noise floor.
    `n` is drawn from `generator` (on the generator's device unless `device` is given).
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    n = torch.randn(batch, generator=generator, device=device)
    t = torch.sigmoid(n * scale + mean)
    if uniform_frac > 0.0:  # the reference's stream of draws is untouched when off
        pick = torch.rand(batch, generator=generator, device=device) < uniform_frac
        t = torch.where(pick, torch.rand(batch, generator=generator, device=device), t)
    return t


def shift_time(t: Tensor, shift: float) -> Tensor:
    """`t / (t + shift*(1 - t))`; returns `t` itself (no arithmetic) when shift == 1.0."""
    if shift == 1.0:
        return t
    return t / (t + shift * (1 - t))


def shift_time_derivative(t: Tensor, shift: float) -> Tensor:
    """d t_s / d t = shift / (t + shift*(1 - t))^2 (the Jacobian of `shift_time`)."""
    if shift == 1.0:
        return torch.ones_like(t)
    return shift / (t + shift * (1 - t)) ** 2


def _per_sample(t_s: Tensor, like: Tensor) -> Tensor:
    """Broadcast a (B,) time vector over the non-batch dims of `like`."""
    if t_s.ndim == 0:
        return t_s
    return t_s.reshape(t_s.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, x1: Tensor, t_s: Tensor, min_sigma: float = 0.0) -> Tensor:
    """The interpolant `x_t = (1 - (1 - min_sigma) t_s) x0 + t_s x1` (t_s of shape (B,))."""
    t = _per_sample(t_s, x0)
    return (1 - (1 - min_sigma) * t) * x0 + t * x1


# ----------------------------------------------------------------------------- losses


def _mean_per_sample(err: Tensor) -> Tensor:
    return err.mean(dim=tuple(range(1, err.ndim))) if err.ndim > 1 else err


def flow_loss(
    pred: Tensor,
    x0: Tensor,
    x1: Tensor,
    xt: Tensor,
    t_s: Tensor,
    *,
    prediction_type: str,
    loss_type: str,
    min_sigma: float = 0.0,
) -> Tensor:
    """Per-sample flow-matching loss, shape (B,) (docs/method.md §3 table; the trainer takes the mean).

    x/x: mean((pred - x1)^2).
    x/v: with c = clamp(1 - t_s, 1e-6), mean(((pred - xt)/c - (x1 - xt)/c)^2); the two
         quotients are computed separately, then subtracted (bitwise like the reference).
    v/v: target x1 - (1 - min_sigma) x0; mean((pred - target)^2).
    v/x: x1_hat = xt + (1 - t_s) pred (no clamp); mean((x1_hat - x1)^2).
    """
    t = _per_sample(t_s, pred)
    if prediction_type == "x" and loss_type == "x":
        err = (pred - x1) ** 2
    elif prediction_type == "x" and loss_type == "v":
        c = torch.clamp(1 - t, min=ONE_MINUS_T_MIN)
        err = ((pred - xt) / c - (x1 - xt) / c) ** 2
    elif prediction_type == "v" and loss_type == "v":
        target = x1 - (1 - min_sigma) * x0
        err = (pred - target) ** 2
    elif prediction_type == "v" and loss_type == "x":
        x1_hat = xt + (1 - t) * pred
        err = (x1_hat - x1) ** 2
    else:
        raise ValueError(
            f"unsupported flow loss: prediction_type={prediction_type!r}, loss_type={loss_type!r} "
            f"(each must be one of {PREDICTION_TYPES})"
        )
    return _mean_per_sample(err)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")


def velocity(pred: Tensor, x: Tensor, t: Tensor | float, prediction_type: str) -> Tensor:
    """Model output -> velocity. x-prediction: (pred - x) / max(1 - t, 1e-6); v: pred itself.

    `t` is a 0-d tensor (the sampler's grid value) or a float. Under bf16 autocast `pred` is
    bf16 and the float32 promotion happens here, in (pred - x), as in the reference.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "v":
        return pred
    t = torch.as_tensor(t)
    return (pred - x) / torch.clamp(1 - t, min=ONE_MINUS_T_MIN)


# ----------------------------------------------------------------------------- samplers


def time_grid(num_steps: int, shift: float = 1.0, min_sigma: float = 0.0) -> Tensor:
    """Shifted float32 CPU grid `shift(linspace(0, 1 - min_sigma, num_steps + 1))`."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    r = torch.linspace(0, 1 - min_sigma, num_steps + 1, dtype=torch.float32, device="cpu")
    return shift_time(r, shift)


def euler_sample(
    fn: PredictionFn,
    x0: Tensor,
    *,
    num_steps: int,
    shift: float = 1.0,
    min_sigma: float = 0.0,
    prediction_type: str = "x",
) -> Tensor:
    """Euler from noise (t=0) to data (reference `to_data`). The model is never called at t=1:
    the last evaluation is at steps[-2] (0.98 for 50 unshifted steps)."""
    _check_prediction_type(prediction_type)
    steps = time_grid(num_steps, shift, min_sigma)
    x = x0
    for i in range(num_steps):
        t = steps[i]
        v = velocity(fn(t, x), x, t, prediction_type)
        x = x + (steps[i + 1] - t) * v
    return x


def heun_sample(
    fn: PredictionFn,
    x0: Tensor,
    *,
    num_steps: int,
    shift: float = 1.0,
    min_sigma: float = 0.0,
    prediction_type: str = "x",
) -> Tensor:
    """Heun (explicit trapezoid, 2nd order) on the same shifted grid as `euler_sample`.

    The corrector evaluates the model at steps[i+1]. When that point is t = 1 (min_sigma = 0,
    the last step) the x-prediction velocity is singular there (division by the 1e-6 clamp)
    and the model never saw t = 1 in training, so that last step is a plain Euler step. The
    model is therefore never called at t >= 1; it costs 2*num_steps - 1 calls with min_sigma=0.
    """
    _check_prediction_type(prediction_type)
    steps = time_grid(num_steps, shift, min_sigma)
    x = x0
    for i in range(num_steps):
        t, t_next = steps[i], steps[i + 1]
        h = t_next - t
        v = velocity(fn(t, x), x, t, prediction_type)
        x_euler = x + h * v
        if float(t_next) >= 1.0:
            x = x_euler
            continue
        v_next = velocity(fn(t_next, x_euler), x_euler, t_next, prediction_type)
        x = x + h * 0.5 * (v + v_next)
    return x


def adaptive_sample(
    fn: PredictionFn,
    x0: Tensor,
    *,
    shift: float = 1.0,
    prediction_type: str = "x",
    min_sigma: float = 0.0,
    rtol: float | None = None,
    atol: float | None = None,
    method: str = "dopri5",
    t_end: float | None = None,
) -> Tensor:
    """Adaptive ODE solve with torchdiffeq `odeint` (dopri5 by default) from t=0.

    `t_end=None`: integrate to t=1-min_sigma, as the reference does (torchdiffeq's default
    tolerances unless given). `t_end < 1 - min_sigma` (what the inference config uses): stop
    there and finish with one exact step. The x-prediction velocity (x1_hat - x) / (1 - t) is
    singular at t=1, and an adaptive solver spends most of its model calls just below it
    (measured: 77 % of them in [0.9999, 1)); but the step from t to 1 along that velocity
    lands exactly on the prediction x1_hat, so the last call's prediction is the answer
    (docs/method.md §3). With v-prediction the last step is an Euler step.

    Adaptive steps land exactly on the end time (torchdiffeq `step_t`), so the model is never
    called past it.

    Correct under noise_shift (fixes the reference quirk of docs/method.md §10.2): the solver
    integrates in the unshifted time t, and the model lives in t_s = shift(t), so by the chain rule
        dx/dt = dx/dt_s * dt_s/dt = v(t_s, x) * shift / (t + shift*(1 - t))^2.
    This is the same ODE as integrating dx/dt_s = v(t_s, x) directly over t_s, written in t
    so that the solver's step control still sees the shifted time axis. For shift == 1 the
    factor is exactly 1 and this is the reference computation. (The reference omits the
    factor, which solves a different ODE whenever shift != 1.)
    """
    from torchdiffeq import odeint  # imported lazily: only this sampler needs it

    _check_prediction_type(prediction_type)
    t_final = 1.0 - min_sigma
    if t_end is not None and not 0.0 < t_end < t_final:
        raise ValueError(f"adaptive t_end must lie in (0, {t_final}), got {t_end}")

    def velocity_in_t(t: Tensor, x: Tensor) -> Tensor:
        t_s = shift_time(t, shift)
        v = velocity(fn(t_s, x), x, t_s, prediction_type)
        if shift == 1.0:
            return v
        return v * shift_time_derivative(t, shift)

    kwargs: dict[str, Any] = {"method": method}
    if rtol is not None:
        kwargs["rtol"] = rtol
    if atol is not None:
        kwargs["atol"] = atol
    stop = t_final if t_end is None else t_end
    times = torch.tensor([0.0, stop], dtype=torch.float32, device=x0.device)
    if method in _ADAPTIVE_RK_METHODS:
        # Land exactly on the end time instead of stepping past it and interpolating back,
        # so the model is never called at t > 1 (outside anything it was trained on).
        kwargs["options"] = {"step_t": times[1:]}
    x = odeint(velocity_in_t, x0, times, **kwargs)[-1]
    if t_end is None:
        return x
    t_s = shift_time(torch.tensor(t_end, dtype=torch.float32), shift)
    pred = fn(t_s, x)
    if prediction_type == "x" and t_final == 1.0:
        return pred.to(x.dtype)  # the exact step to t=1: x + (1 - t)(pred - x)/(1 - t) = pred
    return x + (t_final - t_s) * velocity(pred, x, t_s, prediction_type)


def sample(
    method: str,
    fn: PredictionFn,
    x0: Tensor,
    *,
    num_steps: int,
    shift: float = 1.0,
    min_sigma: float = 0.0,
    prediction_type: str = "x",
    adaptive: dict[str, Any] | None = None,
) -> Tensor:
    """Dispatch to `euler_sample` / `heun_sample` / `adaptive_sample`. num_steps is unused by
    the adaptive solver; `adaptive` holds its keyword arguments (rtol, atol, method, t_end)."""
    if method == "euler":
        return euler_sample(fn, x0, num_steps=num_steps, shift=shift, min_sigma=min_sigma,
                            prediction_type=prediction_type)
    if method == "heun":
        return heun_sample(fn, x0, num_steps=num_steps, shift=shift, min_sigma=min_sigma,
                           prediction_type=prediction_type)
    if method == "adaptive":
        return adaptive_sample(fn, x0, shift=shift, min_sigma=min_sigma,
                               prediction_type=prediction_type, **(adaptive or {}))
    raise ValueError(f"sampling method {method!r} is not one of {SAMPLING_METHODS}")


# ----------------------------------------------------------------------------- guidance


def _concat_conditions(cond: Any, empty_cond: Any) -> Any:
    """Batch-concatenate (cond, empty_cond): NamedTuples keep their type, tuples/lists too."""
    if cond is None and empty_cond is None:
        return None
    if isinstance(cond, Tensor):
        return torch.cat([cond, empty_cond])
    if isinstance(cond, (tuple, list)):
        if len(cond) != len(empty_cond):
            raise ValueError(
                f"conditions and empty conditions differ in length ({len(cond)} vs {len(empty_cond)})"
            )
        parts = [_concat_conditions(a, b) for a, b in zip(cond, empty_cond)]
        if hasattr(cond, "_fields"):  # NamedTuple such as model Conditions
            return type(cond)(*parts)
        return type(cond)(parts)
    raise TypeError(f"cannot batch conditions of type {type(cond).__name__}")


def cfg_denoiser(
    model: Any,
    cond: Any,
    empty_cond: Any,
    cfg: float,
    *,
    cfg_interval: tuple[float, float] | Sequence[float] | None = None,
    batched: bool = True,
) -> PredictionFn:
    """Classifier-free-guided model output as `fn(t, x)` for the samplers (docs/method.md §2.11).

    - `t_vec = t * ones(B, dtype=x.dtype, device=x.device)`; `model.predict_flow(x, t_vec, c)`.
    - cfg <= 1: the conditional prediction only (one forward pass, no unconditional pass).
    - cfg > 1: `cfg * cond_pred + (1 - cfg) * uncond_pred`, mixed on the model output
      (the x1-prediction by default) before the conversion to velocity.
    - batched=True: one forward pass on cat([x, x]) with cat(cond, empty_cond) (faster, equal
      up to float rounding); batched=False: two separate passes exactly like the reference
      ode_wrapper (bitwise parity).
    - cfg_interval=(lo, hi): guidance only where lo <= t <= hi, conditional only elsewhere.
    """
    if cfg_interval is not None:
        lo, hi = (float(v) for v in cfg_interval)
        if lo > hi:
            raise ValueError(f"cfg_interval {cfg_interval!r}: lower bound is above upper bound")
    batched_cond: list[Any] = []  # built once, on first use

    def fn(t: Tensor | float, x: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        t_vec = t * torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        guide = cfg > 1.0
        if guide and cfg_interval is not None:
            guide = lo <= float(t) <= hi
        if not guide:
            return model.predict_flow(x, t_vec, cond)
        if not batched:
            return cfg * model.predict_flow(x, t_vec, cond) + (1 - cfg) * model.predict_flow(
                x, t_vec, empty_cond
            )
        if not batched_cond:
            batched_cond.append(_concat_conditions(cond, empty_cond))
        out = model.predict_flow(torch.cat([x, x]), torch.cat([t_vec, t_vec]), batched_cond[0])
        cond_pred, uncond_pred = out.chunk(2)
        return cfg * cond_pred + (1 - cfg) * uncond_pred

    return fn
