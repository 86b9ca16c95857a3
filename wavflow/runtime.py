"""Where a job runs and at what precision: the one device resolver and the one autocast/TF32
policy that training, prediction (and the generator API) and evaluation share."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from wavflow.errors import ConfigError
from wavflow.speed import sdpa_context

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(device: str | torch.device = "auto", *, key: str = "inference.device") -> torch.device:
    """auto: CUDA when present, else CPU. Asking for CUDA on a machine without it is an error
    naming `key`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={str(device)!r} but CUDA is not available on this machine")
    return dev


def effective_precision(device: torch.device, precision: str, *, key: str = "inference.precision") -> str:
    """What `autocast_context` will run: 'bf16' or 'fp32' (auto: bf16 on CUDA, fp32 elsewhere)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key} must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@contextlib.contextmanager
def tf32_scope(device: torch.device) -> Iterator[None]:
    """TF32 matmul / cuDNN on CUDA (as the reference samples) for the duration of one call only;
    the caller's process-wide flags are restored afterwards."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def autocast_context(device: torch.device, precision: str, *, tf32: bool = False,
                     attention_backend: str = "auto", key: str = "inference.precision"
                     ) -> contextlib.AbstractContextManager:
    """The forward context: bf16 autocast per `precision` (auto: on CUDA only), TF32 when
    `tf32` (sampling, as the reference does; training keeps the process's own flags), and
    the SDPA backend when one is forced (training.attention_backend)."""
    stack = contextlib.ExitStack()
    if tf32:
        stack.enter_context(tf32_scope(device))
    if effective_precision(device, precision, key=key) != "fp32":
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if attention_backend != "auto":
        stack.enter_context(sdpa_context(attention_backend))
    return stack
