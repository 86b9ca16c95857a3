"""Speed options: how the same network math is executed, for training and for sampling.

None of these change what is computed, only how: kernels, fusion and summation order. Each
option's "reference" value reproduces the original eager code path bit for bit (fp32 CPU);
the other values agree with it to float rounding (tests/test_speed.py checks both). The
options and their measured costs are listed in docs/benchmarks.md.

Config keys (configs/train.yaml, configs/infer.yaml):
- optimizer_impl: AdamW kernel. default (reference: what PyTorch picks, the per-parameter loop on
  CPU and foreach on CUDA) | foreach (multi-tensor) | fused (one fused kernel per group) | auto
  (configs/train.yaml's value: fused on CUDA, where it cut the optimizer's GPU time ~3x on one
  H200, and default elsewhere, so the fp32 CPU path stays the reference's).
- ema_impl: EMA update. loop (reference) | foreach (`torch._foreach_lerp_`; same lerp formula,
  bit-identical on CPU).
- conv_impl: the channel-last Conv1d layers. native (reference: F.conv1d, oneDNN on CPU) |
  matmul (im2col: one GEMM over the k shifted copies of the input).
- attention_backend: scaled_dot_product_attention backend. auto (reference: PyTorch picks) |
  flash | efficient | math | cudnn, or matmul: not SDPA but two GEMMs in the autocast precision
  around a float32 softmax (wavflow.model.layers.matmul_attention; bf16 rounding of the
  attention weights under bf16 autocast, fp32 rounding otherwise).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from wavflow.errors import ConfigError
from wavflow.model.layers import ChannelLastConv1d, JointBlock, MMDitSingleBlock

OPTIMIZER_IMPLS = ("default", "foreach", "fused", "auto")
EMA_IMPLS = ("loop", "foreach")
CONV_IMPLS = ("native", "matmul")
ATTENTION_BACKENDS = ("auto", "flash", "efficient", "math", "cudnn", "matmul")
# torch.optim.AdamW param-group keys that pick the kernel, not the math (kept on resume)
OPTIMIZER_KERNEL_FLAGS = ("foreach", "fused")


@dataclass(frozen=True)
class SpeedOptions:
    optimizer_impl: str = "default"
    ema_impl: str = "loop"
    conv_impl: str = "native"
    attention_backend: str = "auto"
    compile: bool = False

    @classmethod
    def reference(cls) -> "SpeedOptions":
        """Every option off: the original eager path."""
        return cls()

    @classmethod
    def from_config(cls, node: Any, section: str) -> "SpeedOptions":
        """Read the keys present in `node` (a config block such as cfg.training); missing keys
        keep their reference value. ConfigError names `<section>.<key>` on a bad value."""

        def pick(key: str, choices: tuple[str, ...], default: str) -> str:
            value = node.get(key, default) if hasattr(node, "get") else default
            if value not in choices:
                raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(choices)}")
            return str(value)

        compile_ = node.get("compile", False) if hasattr(node, "get") else False
        if not isinstance(compile_, bool):
            raise ConfigError(f"{section}.compile must be true or false, got {compile_!r}")
        return cls(
            optimizer_impl=pick("optimizer_impl", OPTIMIZER_IMPLS, "default"),
            ema_impl=pick("ema_impl", EMA_IMPLS, "loop"),
            conv_impl=pick("conv_impl", CONV_IMPLS, "native"),
            attention_backend=pick("attention_backend", ATTENTION_BACKENDS, "auto"),
            compile=compile_,
        )

    def is_reference(self) -> bool:
        return self == SpeedOptions.reference()


# ------------------------------------------------------------------------------ model
def set_conv_impl(model: nn.Module, impl: str) -> int:
    """Switch every ChannelLastConv1d of `model` to `impl`; returns how many were switched."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl {impl!r} is not one of {CONV_IMPLS}")
    count = 0
    for module in model.modules():
        if isinstance(module, ChannelLastConv1d):
            module.conv_impl = impl
            count += 1
    return count


def set_attention_impl(model: nn.Module, backend: str) -> int:
    """Route every attention block of `model` through two GEMMs (`backend` "matmul") or SDPA
    (any other backend, whose kernel sdpa_context picks); returns how many blocks were set. A
    model attribute, not a global: two models in one process keep their own choice."""
    impl = "matmul" if backend == "matmul" else "sdpa"
    count = 0
    for module in model.modules():
        if isinstance(module, (JointBlock, MMDitSingleBlock)):
            module.attention_impl = impl
            count += 1
    return count


def sdpa_context(backend: str) -> contextlib.AbstractContextManager:
    """A context that restricts scaled_dot_product_attention to `backend` (auto: no restriction)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {backend!r} is not one of {ATTENTION_BACKENDS}")
    if backend in ("auto", "matmul"):  # matmul is not SDPA: a model attribute (set_attention_impl)
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel  # only when a backend is forced

    which = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[backend]
    return sdpa_kernel([which])


@contextlib.contextmanager
def combined(*contexts: contextlib.AbstractContextManager) -> Iterator[None]:
    """Enter several contexts as one (autocast + SDPA backend)."""
    with contextlib.ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        yield


# -------------------------------------------------------------------------- optimizer
def resolve_optimizer_impl(impl: str, device: torch.device) -> str:
    """`auto` -> fused on CUDA, default (PyTorch's pick) elsewhere; other values unchanged."""
    if impl != "auto":
        return impl
    return "fused" if device.type == "cuda" else "default"


def make_adamw(params: Any, impl: str, **kwargs: Any) -> torch.optim.AdamW:
    """torch.optim.AdamW with the chosen kernel; `default` passes no flag (PyTorch's choice).
    `auto` must be resolved first (resolve_optimizer_impl: it depends on the device)."""
    if impl not in OPTIMIZER_IMPLS or impl == "auto":
        kernels = tuple(i for i in OPTIMIZER_IMPLS if i != "auto")
        raise ValueError(f"optimizer_impl {impl!r} is not one of {kernels} (resolve auto first)")
    if impl == "foreach":
        kwargs["foreach"] = True
    elif impl == "fused":
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


def with_kernel_flags_of(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """`state` (an optimizer state dict) with `optimizer`'s kernel flags in its param groups.

    load_state_dict restores the saved groups' `foreach`/`fused` too, so a run resumed with
    another `optimizer_impl` would keep the old kernel. Patching the saved groups (rather than
    the live ones afterwards) lets PyTorch place each `step` where the new kernel wants it (a
    fused kernel keeps it on the parameter's device). Group counts that differ are left for
    load_state_dict to report."""
    saved = state.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(optimizer.param_groups):
        return state
    groups = [{**g, **{k: live.get(k) for k in OPTIMIZER_KERNEL_FLAGS}} for g, live in zip(saved, optimizer.param_groups)]
    return {**state, "param_groups": groups}


def maybe_compile(module: Any, enabled: bool, **kwargs: Any) -> Any:
    """torch.compile(module) when enabled (inductor), else the module itself."""
    return torch.compile(module, **kwargs) if enabled else module
