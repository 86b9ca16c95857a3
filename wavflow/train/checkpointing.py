"""Checkpoint files of a training run: what they hold, RNG states, loading with clear errors.

Layout (docs/design.md §3): the reference keys `model`, `optimizer`, `epoch`, `global_step`,
`model_ema1`, `model_ema2` plus what exact resume needs: `batch_in_epoch`, `sampler_epoch`,
`rng` (one entry per global rank), `lr`, `config` (YAML text), `format`. Everything is plain
tensors / dicts / lists / numbers / strings, so `torch.load(weights_only=True)` reads it.
`ema_epoch_<N>.pth` is a flat {name: tensor} dict (the EMA-1 weights).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from wavflow.errors import CheckpointError
from wavflow.io_utils import safe_torch_load
from wavflow.train.fsdp import full_tensor

CHECKPOINT_FORMAT = "wavflow-train-1"
LATEST_NAME = "checkpoint_latest.pth"


def epoch_checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch}.pth"


def ema_checkpoint_name(epoch: int) -> str:
    return f"ema_epoch_{epoch}.pth"


# ----------------------------------------------------------------------------- RNG states


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """This process's RNG states as tensors / numbers (the trainer generator and the globals)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Mapping[str, Any], generator: torch.Generator) -> list[str]:
    """Inverse of `capture_rng`, as far as this machine allows; returns what was NOT restored.

    A run moved between machine kinds (written on CUDA, resumed on CPU, or the reverse) cannot
    take over the training generator's state (a CUDA Philox state is not a CPU Mersenne-Twister
    state) nor a CUDA global state without CUDA; those are left alone and named in the result,
    so the caller can reseed and say so. Everything else is restored.
    """
    skipped: list[str] = []
    saved_kind = torch.device(str(state.get("generator_device", "cpu"))).type
    if saved_kind == generator.device.type:
        generator.set_state(state["generator"])
    else:
        skipped.append(f"the training generator (saved on {saved_kind}, this run uses {generator.device.type})")
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"]))
    )
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            skipped.append("the CUDA global RNG (no CUDA here)")
    return skipped


# ------------------------------------------------------------------------------- model IO


def model_state_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict as CPU copies (no rot/freq buffers: they are non-persistent)."""
    return {k: full_tensor(v).detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------- loading


def load_latest_checkpoint(path: Path) -> dict[str, Any]:
    """Read `checkpoint_latest.pth` for auto-resume; a bad file is an error, never a fresh start."""
    try:
        ckpt = safe_torch_load(path, what="resume checkpoint")
        if not isinstance(ckpt, Mapping) or "model" not in ckpt:
            raise CheckpointError(f"resume checkpoint {path} is not a full training checkpoint (no 'model' key)")
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}\nCannot resume from {path}. To fall back: move it aside (mv {path} {path}.bad), "
            f"optionally copy an older checkpoint_epoch_<N>.pth from {path.parent} to {LATEST_NAME}, "
            "and run again; or set training.resume=false to start from scratch (the file is then overwritten)."
        ) from exc
    return dict(ckpt)


def load_initial_checkpoint(path: str | Path, key: str = "checkpoint.initial_load_path") -> dict[str, Any]:
    """A checkpoint named by `key` (the config key): full (has 'model') or flat state dict."""
    ckpt = safe_torch_load(path, what=key)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{key} {path} does not hold a dict")
    return dict(ckpt)
