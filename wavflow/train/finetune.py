"""Starting a new run from trained weights, and training only part of the network
(TRAINING.md "Fine-tuning").

`training.init_from`: the network of a new run (step 0, fresh AdamW, fresh schedule) is loaded
from a checkpoint of any kind the project reads: a run's `checkpoint_*.pth`, an `ema_epoch_*.pth`
(flat EMA weights) or a reference-layout checkpoint. `training.init_from_ema` takes the
checkpoint's EMA-1 weights instead of its raw ones. The run's two EMAs start at the loaded
weights. The file's SHA-256 goes into `training.init_from_sha256` (so into config.yaml and every
checkpoint's config); a value set there beforehand pins the file.

`training.trainable`: name patterns (fnmatch) of the parameters that train; every other
parameter is frozen (requires_grad off), so it is left out of AdamW, of the EMA updates, of
gradient clipping and of DDP's gradient all-reduce, and stays bit-identical.

`training.lora` (wavflow/train/lora.py): low-rank adapters on the target layers; the network is
frozen and the adapters train, plus whatever `training.trainable` names.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from wavflow.errors import CheckpointError, ConfigError
from wavflow.model.cond_norm import state_has_cond_norm
from wavflow.train.lora import LoRASettings, add_adapters

SOURCE_TAG_KEY = "cond_norm.source_tag"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class InitRecord:
    """Where a fine-tuning run's weights came from (saved in its checkpoints as `init_from`)."""

    path: str
    sha256: str
    weights: str  # "model" or "model_ema1" of a full checkpoint, "flat" for a flat state dict

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256, "weights": self.weights}


def check_pinned_hash(path: Path, digest: str, pinned: Optional[str]) -> None:
    if pinned and str(pinned).strip().lower() != digest:
        raise CheckpointError(
            f"training.init_from {path} has SHA-256 {digest}, but training.init_from_sha256 pins {pinned}: "
            "the file changed since the run was set up (or the pin names another file)"
        )


def initial_weights(ckpt: Mapping[str, Any], *, use_ema: bool, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict a new run starts from, and which of the file's weights it is."""
    if "model" in ckpt:  # a full checkpoint (ours or the reference layout)
        key = "model_ema1" if use_ema else "model"
        if key not in ckpt:
            raise CheckpointError(f"training.init_from_ema=true but {source} holds no model_ema1 (EMA) weights")
        return _tensor_dict(ckpt[key], f"{source} [{key}]"), key
    # a flat state dict: ema_epoch_*.pth (already EMA weights) or bare network weights
    if use_ema:
        raise CheckpointError(
            f"training.init_from_ema=true but {source} is a flat state dict with no separate EMA weights (an "
            "ema_epoch_*.pth already holds EMA weights): set training.init_from_ema=false"
        )
    return _tensor_dict(ckpt, source), "flat"


def _tensor_dict(state: Any, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} is not a state dict of tensors")
    return dict(state)


def check_feature_norm(weights: Mapping[str, torch.Tensor], model: nn.Module, *, source: str,
                       feature_norm_setting: Any) -> None:
    """The loaded network must normalise features as this run's data needs: on or off alike, and
    for the same encoders (the statistics' tag), as prediction checks it."""
    has_norm, want_norm = state_has_cond_norm(weights), getattr(model, "cond_norm", None) is not None
    if has_norm != want_norm:
        raise ConfigError(
            f"training.init_from {source} was trained {'with' if has_norm else 'without'} feature normalisation, "
            f"but data.feature_norm={feature_norm_setting} resolves to {'on' if want_norm else 'off'} for this "
            f"run's features: set data.feature_norm={str(has_norm).lower()}"
        )
    if has_norm and SOURCE_TAG_KEY in weights:
        theirs, ours = int(weights[SOURCE_TAG_KEY].item()), int(model.cond_norm.source_tag.item())
        if theirs != ours:
            raise ConfigError(
                f"training.init_from {source} normalises features of other encoders (statistics tag {theirs:013x}) "
                f"than this run's features (tag {ours:013x}): extract this run's features with the encoders.* "
                "settings of the run it starts from"
            )


# The network's optional parts (docs/method.md §2.14-2.15) and the config key that adds each.
OPTIONAL_PARTS = (("spectral_skip", "model.spectral_skip"), ("level_head", "model.level_head"))


def with_added_parts(weights: Mapping[str, torch.Tensor], model: nn.Module, *, source: str) -> dict[str, torch.Tensor]:
    """`weights` for a new run: an optional part this run adds that the weights lack starts as
    built (so a loudness head can be trained onto a model trained without one); a part the
    weights carry that this run lacks is a CheckpointError naming the key that adds it."""
    own, out = model.state_dict(), dict(weights)
    for part, key in OPTIONAL_PARTS:
        prefix = part + "."
        in_weights, in_run = any(k.startswith(prefix) for k in weights), getattr(model, part, None) is not None
        if in_weights and not in_run:
            raise CheckpointError(f"training.init_from {source} carries {prefix}* weights, which this run's network "
                                  f"lacks: set {key}=true")
        if in_run and not in_weights:
            out.update({k: v for k, v in own.items() if k.startswith(prefix)})
    return out


def trainable_patterns(value: Any) -> Optional[list[str]]:
    """training.trainable as a plain list (None: everything trains)."""
    if value is None:
        return None
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ConfigError(f"training.trainable must be null or a list of parameter name patterns, got {value!r}")
    return [str(v) if isinstance(v, str) else v for v in value]


def apply_trainable(model: nn.Module, patterns: Optional[Sequence[str]], *, require_some: bool = True) -> tuple[int, int]:
    """Freeze every parameter no pattern matches; (trainable, total) parameter counts.

    None trains everything. A pattern that matches no parameter, or patterns that leave
    nothing to train (unless not `require_some`), are ConfigErrors (a typo must not silently
    freeze the whole network)."""
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    if patterns is None:
        return sum(p.numel() for _, p in params if p.requires_grad), total
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"training.trainable must be null or a list of parameter name patterns, got {patterns!r}")
    unused = [pat for pat in patterns if not any(fnmatch.fnmatchcase(name, pat) for name, _ in params)]
    if unused:
        raise ConfigError(
            f"training.trainable pattern(s) {', '.join(map(repr, unused))} match no parameter of this network "
            f"(names look like {params[0][0]!r}, {params[-1][0]!r})"
        )
    trainable = 0
    for name, p in params:
        keep = p.requires_grad and any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(keep)
        trainable += p.numel() if keep else 0
    if trainable == 0 and require_some:
        raise ConfigError(f"training.trainable {list(patterns)} leaves no parameter to train")
    return trainable, total


def configure_trainable(model: nn.Module, tr: Any) -> tuple[int, int]:
    """training.lora and training.trainable applied to a freshly built network: (trainable, total)."""
    patterns = trainable_patterns(tr.get("trainable"))
    settings = LoRASettings.from_config(tr.get("lora"))
    if settings is None:
        return apply_trainable(model, patterns)
    named = set()
    patterns = [p for p in patterns or [] if not p.startswith("lora.")]  # the adapters train anyway
    if patterns:  # checked (and matched) before the adapters freeze the network
        apply_trainable(model, patterns, require_some=False)
        named = {n for n, p in model.named_parameters() if p.requires_grad}
    add_adapters(model, settings)
    for name, p in model.named_parameters():
        if name in named:
            p.requires_grad_(True)
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))
