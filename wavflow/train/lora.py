"""Low-rank adapters (LoRA) on the network's projections, and merging them back into plain
weights (TRAINING.md "Fine-tuning").

An adapted layer computes base(x) + (alpha / rank) * B(A(dropout(x))) with the base layer
frozen. A is a (rank, in) matrix for an nn.Linear and a (rank, in, k) convolution for the
network's channel-last Conv1d layers (same padding as the base), B a (out, rank) matrix that
starts at zero, so an adapted network starts exactly at its base. Merged, the update is
W + (alpha / rank) * B @ A (per tap for a convolution): the same function in one layer.

Written here rather than taken from Hugging Face `peft`: peft's Conv1d adapter runs its A
convolution on (B, C, L) inputs, while this network's convolutions take (B, L, C), so it would
adapt them wrongly; the update itself is a few lines.

The adapters are held in `model.lora` (an nn.ModuleDict) and added to their layer's output by a
forward hook, so the base layers keep their state-dict keys: a base checkpoint loads into the
adapted network unchanged, and an adapter file holds only `lora.*` tensors.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wavflow.errors import CheckpointError, ConfigError
from wavflow.model.layers import ChannelLastConv1d

PREFIX = "lora."
ADAPTER_FORMAT = "wavflow-lora-adapter-1"
DEFAULT_TARGETS = ("*attn.qkv", "*linear1", "*ffn.w1", "*ffn.w2", "*ffn.w3")


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_config(cls, value: Any) -> Optional["LoRASettings"]:
        """training.lora; None when its rank is null or 0 (no adapters)."""
        if value is None or not value.get("rank"):
            return None
        rank, alpha, dropout = value.get("rank"), value.get("alpha"), value.get("dropout", 0.0)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"training.lora.rank must be a whole number >= 1 (or null/0: no adapters), got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"training.lora.alpha must be a positive number, got {value.get('alpha')!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"training.lora.dropout must be in [0, 1), got {dropout!r}")
        targets = value.get("targets")
        targets = DEFAULT_TARGETS if targets is None else tuple(str(t) for t in targets)
        if not targets:
            raise ConfigError("training.lora.targets is empty: name the layers to adapt, or null for the default")
        return cls(int(rank), alpha, float(dropout), targets)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> "LoRASettings":
        return cls(int(value["rank"]), float(value["alpha"]), float(value["dropout"]), tuple(value["targets"]))


class LoRAAdapter(nn.Module):
    """The low-rank update of one Linear or channel-last Conv1d layer."""

    def __init__(self, base: nn.Module, settings: LoRASettings, name: str = "this layer") -> None:
        super().__init__()
        self.scale = settings.scale
        self.dropout = nn.Dropout(settings.dropout)
        rank = settings.rank
        if isinstance(base, ChannelLastConv1d):
            if (base.stride != (1,) or base.dilation != (1,) or base.groups != 1 or base.padding_mode != "zeros"
                    or not isinstance(base.padding, tuple)):
                raise ConfigError(f"training.lora.targets: {name} is not a stride-1, ungrouped, zero-padded convolution")
            self.padding = int(base.padding[0])
            self.A = nn.Parameter(torch.empty(rank, base.in_channels, base.kernel_size[0]))
            out_features = base.out_channels
        elif isinstance(base, nn.Linear):
            self.padding = -1  # a Linear
            self.A = nn.Parameter(torch.empty(rank, base.in_features))
            out_features = base.out_features
        else:
            raise ConfigError(f"training.lora.targets: {name} is a {type(base).__name__}, not a Linear or Conv1d")
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        # as in the LoRA paper: A random (Kaiming-uniform, as nn.Linear), B zero
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(x)
        if self.padding < 0:
            low = F.linear(x, self.A)
        else:  # (B, L, C) in and out, like the base layer
            low = F.conv1d(x.transpose(1, 2), self.A, padding=self.padding).transpose(1, 2)
        return F.linear(low, self.B) * self.scale

    def delta_weight(self) -> Tensor:
        """The update merged into the base weight: scale * B @ A (per tap for a convolution)."""
        if self.padding < 0:
            return self.scale * (self.B @ self.A)
        return self.scale * torch.einsum("or,rik->oik", self.B, self.A)


def _key(module_name: str) -> str:
    return module_name.replace(".", "__")


def adapted_layers(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs the target patterns select: Linear / channel-last Conv1d only."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, ChannelLastConv1d)) and not n.startswith(PREFIX.rstrip("."))]
    unused = [t for t in targets if not any(fnmatch.fnmatchcase(n, t) for n, _ in layers)]
    if unused:
        example = f" (names look like {layers[0][0]!r})" if layers else ""
        raise ConfigError(
            f"training.lora.targets pattern(s) {', '.join(map(repr, unused))} match no Linear or Conv1d layer{example}"
        )
    return [(n, m) for n, m in layers if any(fnmatch.fnmatchcase(n, t) for t in targets)]


def add_adapters(model: nn.Module, settings: LoRASettings) -> int:
    """Freeze the network, attach an adapter to every target layer; the adapters' parameter count."""
    if hasattr(model, "lora"):
        raise ConfigError("this network already has LoRA adapters")
    model.requires_grad_(False)
    adapters = nn.ModuleDict()
    for name, layer in adapted_layers(model, settings.targets):
        adapter = LoRAAdapter(layer, settings, name).to(layer.weight.device)
        adapters[_key(name)] = adapter
        layer.register_forward_hook(lambda _m, inputs, out, a=adapter: out + a(inputs[0]))
    model.lora = adapters
    model.lora_settings = settings
    return sum(p.numel() for p in adapters.parameters())


def adapter_state(state: Mapping[str, Tensor], also: Collection[str] = ()) -> dict[str, Tensor]:
    """The `lora.*` tensors of a full state dict, and those named in `also` (parameters trained
    beside the adapters, which a merge writes over the base)."""
    return {k: v for k, v in state.items() if k.startswith(PREFIX) or k in also}


def merge_state(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor], settings: LoRASettings) -> dict[str, Tensor]:
    """Base weights with every adapter's update added: a plain state dict (no `lora.*` keys).
    Non-adapter tensors in `adapters` (trained beside them) replace the base's."""
    merged = {k: v.clone() for k, v in base.items() if not k.startswith(PREFIX)}
    for k, v in adapters.items():
        if not k.startswith(PREFIX):
            if k not in merged or tuple(merged[k].shape) != tuple(v.shape):
                raise CheckpointError(f"the adapter file's trained tensor {k} does not fit the base")
            merged[k] = v.clone()
    names = sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in adapters if k.startswith(PREFIX)})
    for key in names:
        layer = key.replace("__", ".")
        weight_key = f"{layer}.weight"
        if weight_key not in merged:
            raise CheckpointError(f"the adapter for {layer} has no base weight {weight_key} to merge into")
        a, b = adapters[f"{PREFIX}{key}.A"].float(), adapters[f"{PREFIX}{key}.B"].float()
        delta = settings.scale * (b @ a if a.ndim == 2 else torch.einsum("or,rik->oik", b, a))
        w = merged[weight_key]
        if tuple(delta.shape) != tuple(w.shape):
            raise CheckpointError(f"the adapter for {layer} makes shape {tuple(delta.shape)}, its weight is {tuple(w.shape)}")
        merged[weight_key] = (w.float() + delta).to(w.dtype)
    return merged
