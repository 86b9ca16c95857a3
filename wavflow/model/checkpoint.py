"""Loading network weights from training checkpoints or flat (EMA) state dicts (docs/method.md §2.13, §5).

Accepted inputs (docs/design.md §3):
- a full checkpoint dict with `model` (live weights) and `model_ema1` / `model_ema2`
  ({param name: tensor}), plus `epoch`, `global_step`, optimizer state, ...;
- a flat state dict such as `ema_epoch_<N>.pth`.
Neither needs the non-persistent buffers (`latent_rot`, `clip_rot`, `t_embed.freqs`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from wavflow.errors import CheckpointError
from wavflow.io_utils import safe_torch_load
from wavflow.model.cond_norm import migrate_empty_tokens, state_has_cond_norm
from wavflow.model.network import NON_PERSISTENT_BUFFERS
from wavflow.model.presets import PRESETS
from wavflow.model.level_head import state_has_level_head
from wavflow.model.spectral_skip import state_has_spectral_skip, state_is_lapped

_log = logging.getLogger("wavflow.checkpoint")

_MAX_LISTED = 5
_FULL_KEYS = ("model", "model_ema1")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def state_dict_from_checkpoint(
    ckpt: Any, use_ema: bool, *, where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the weights to load and describe where they came from.

    Precedence (reference inference loader): `model_ema1` when use_ema and present, else
    `model`, else the dict itself as a flat state dict.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{where} holds a {type(ckpt).__name__}, not a dict of weights")
    if any(k in ckpt for k in _FULL_KEYS):
        if use_ema and "model_ema1" in ckpt:
            key, source = "model_ema1", "model_ema1 (EMA weights of a full checkpoint)"
        elif "model" in ckpt:
            key = "model"
            source = "model (live weights of a full checkpoint"
            source += "; no model_ema1 in it)" if use_ema else ")"
        else:
            raise CheckpointError(f"{where} has 'model_ema1' but no 'model', and EMA weights were not requested")
        sd = ckpt[key]
        if not _is_tensor_dict(sd):
            raise CheckpointError(f"{where}: entry '{key}' is not a dict of tensors")
        return dict(sd), source
    if not ckpt:
        raise CheckpointError(f"{where} is an empty dict")
    if not _is_tensor_dict(ckpt):
        odd = [k for k, v in ckpt.items() if not isinstance(v, torch.Tensor)][:_MAX_LISTED]
        raise CheckpointError(
            f"{where} is neither a full checkpoint (no 'model' / 'model_ema1') nor a flat state dict "
            f"(non-tensor entries: {odd})"
        )
    return dict(ckpt), "flat state dict"


def _architecture_of(sd: Mapping[str, torch.Tensor]) -> dict[str, int] | None:
    """(hidden, joint, fused, text/clip/sync shapes) read off a WavFlow state dict, if it is one."""
    try:
        arch = {
            "hidden_dim": sd["t_embed.mlp.0.weight"].shape[0],
            "text_seq_len": sd["empty_string_feat"].shape[0],
            "text_dim": sd["empty_string_feat"].shape[1],
            "clip_dim": sd["empty_clip_feat"].shape[1],
            "sync_dim": sd["empty_sync_feat"].shape[1],
        }
    except (KeyError, IndexError):
        return None
    for stack in ("joint_blocks", "fused_blocks"):
        pattern = re.compile(rf"^{stack}\.(\d+)\.")
        idx = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
        arch[stack] = max(idx) + 1 if idx else 0
    return arch


def _mismatch_hint(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    arch = _architecture_of(sd)
    if arch is None:
        return " The weights do not look like a WavFlow network at all."
    matches = [
        name
        for name, p in PRESETS.items()
        if p.hidden_dim == arch["hidden_dim"]
        and p.joint_depth == arch["joint_blocks"]
        and p.fused_depth == arch["fused_blocks"]
    ]
    hint = (
        f" The checkpoint has hidden width {arch['hidden_dim']}, {arch['joint_blocks']} joint and "
        f"{arch['fused_blocks']} fused blocks"
    )
    hint += f", like preset(s) {', '.join(matches)}." if matches else " (no known preset)."
    for field in ("text_seq_len", "text_dim", "clip_dim", "sync_dim"):
        mine = getattr(model, field, None)
        if mine is not None and mine != arch[field]:
            hint += f" It was built for {field}={arch[field]} (this model: {mine}); set data.{field} to match."
    if getattr(model, "spectral_skip", None) is not None and not state_has_spectral_skip(sd):
        hint += " The weights were trained without the spectral skip: set model.spectral_skip=false."
    elif getattr(model, "spectral_skip", None) is not None and model.spectral_skip.lapped != state_is_lapped(sd):
        hint += (" The weights hold the spectral skip's per-token DCT form of an earlier build, this network"
                 " its lapped form: predict loads them as trained; training cannot continue them.")
    if getattr(model, "level_head", None) is not None and not state_has_level_head(sd):
        hint += " The weights were trained without the loudness head: set model.level_head=false."
    return hint


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Strictly load `state_dict` (without the non-persistent buffers) into `model`.

    Any missing, unexpected or wrongly shaped key raises a CheckpointError that names the first
    few of each, the model's preset, and the preset the weights look like.
    """
    sd = migrate_empty_tokens({k: v for k, v in state_dict.items() if k not in NON_PERSISTENT_BUFFERS})
    if state_has_cond_norm(sd) and getattr(model, "cond_norm", False) is None:
        # weights trained with feature normalisation carry its statistics (cond_norm.py)
        model.attach_condition_norm()
    if state_has_spectral_skip(sd) and getattr(model, "spectral_skip", False) is None:
        # weights trained with the Wiener skip carry it, and say which transform (spectral_skip.py)
        model.attach_spectral_skip(lapped=state_is_lapped(sd))
    if state_has_level_head(sd) and getattr(model, "level_head", False) is None:
        model.attach_level_head()  # weights trained with the loudness head carry it (level_head.py)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong_shape = [
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if unexpected and all(k.startswith("lora.") for k in unexpected) and not missing and not wrong_shape:
        raise CheckpointError(
            f"{source} holds LoRA adapters ({len(unexpected)} lora.* tensors): to predict or evaluate, merge them into "
            "a plain checkpoint with `python -m wavflow.train.lora_merge --adapter <run>/adapter_checkpoint_latest.pth "
            "--out merged.pth`; to resume the run, pass its training.lora settings (they are in its config.yaml)"
        )
    if missing or unexpected or wrong_shape:
        preset = getattr(model, "preset_name", type(model).__name__)
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if keys:
                more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:_MAX_LISTED])}{more}")
        raise CheckpointError(
            f"{source} does not fit model preset '{preset}': " + "; ".join(parts) + "." + _mismatch_hint(model, sd)
        )
    model.load_state_dict(sd, strict=True)


RUN_DIR_CHECKPOINT = "checkpoint_latest.pth"


def resolve_checkpoint_path(path: str | os.PathLike, *, key: str = "model.ckpt_path") -> Path:
    """A checkpoint file, or a training run directory standing for its checkpoint_latest.pth.

    A directory without that file is a CheckpointError naming the files it could be given instead.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    latest = path / RUN_DIR_CHECKPOINT
    if latest.is_file():
        _log.info("%s=%s is a run directory: using its %s", key, path, RUN_DIR_CHECKPOINT)
        return latest
    found = sorted(p.name for p in path.glob("*.pth"))[:5]
    raise CheckpointError(
        f"{key}={path} is a directory without {RUN_DIR_CHECKPOINT}; give checkpoint_latest.pth, "
        f"checkpoint_epoch_N.pth or ema_epoch_N.pth inside it"
        + (f" (found: {', '.join(found)})" if found else " (it holds no .pth file)")
    )


def load_checkpoint_file(model: nn.Module, path: str | os.PathLike, use_ema: bool) -> dict[str, Any]:
    """Load weights from `path` (full checkpoint or flat state dict) into `model`.

    Returns metadata: path, source (which weights), kind ("full" / "flat"), and epoch /
    global_step when the checkpoint records them (else None).
    """
    path = resolve_checkpoint_path(path)
    ckpt = safe_torch_load(path, what="model checkpoint")
    sd, source = state_dict_from_checkpoint(ckpt, use_ema, where=f"checkpoint {path}")
    load_weights(model, sd, source=f"checkpoint {path} [{source}]")
    full = any(k in ckpt for k in _FULL_KEYS)
    return {
        "path": str(path),
        "source": source,
        "kind": "full" if full else "flat",
        "epoch": ckpt.get("epoch") if full else None,
        "global_step": ckpt.get("global_step") if full else None,
    }
