"""Shared helpers of the training tests: a tiny generated data set and config (no tests here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
import torch

from wavflow.config import load_config
from wavflow.io_utils import safe_torch_load
from wavflow.train.trainer import run_training

SR = 16000
DURATION = 0.2  # 3200 samples -> N = 16 patches
SHAPES = {"clip_seq_len": 8, "sync_seq_len": 16, "text_seq_len": 8, "clip_dim": 32, "sync_dim": 24, "text_dim": 32}

# (video_exist, text_exist): VT2A, T2A, V2A
MODES = {"vt2a": (1, 1), "t2a": (0, 1), "v2a": (1, 0)}


def write_sample(root: Path, sample_id: str, mode: str, seed: int) -> tuple[Path, Path]:
    """A tone + noise wav and its feature file (T2A files hold only text_features)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * DURATION * 1.5)) / SR  # longer than the clip: exercises the crop
    wave = 0.3 * np.sin(2 * math.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.shape)
    audio = root / "audio" / f"{sample_id}.wav"
    audio.parent.mkdir(parents=True, exist_ok=True)
    sf.write(audio, wave.astype(np.float32), SR)
    g = torch.Generator().manual_seed(seed)
    video, text = MODES[mode]
    feats: dict[str, torch.Tensor] = {}
    if mode != "t2a":
        feats["clip_features"] = torch.randn(SHAPES["clip_seq_len"], SHAPES["clip_dim"], generator=g)
        feats["sync_features"] = torch.randn(SHAPES["sync_seq_len"], SHAPES["sync_dim"], generator=g)
    feats["text_features"] = torch.randn(SHAPES["text_seq_len"], SHAPES["text_dim"], generator=g)
    pth = root / "features" / f"{sample_id}.pth"
    pth.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, pth)
    return audio, pth


def make_dataset(root: Path, modes: Sequence[str] = ("vt2a", "t2a", "v2a", "vt2a"), relative: bool = False) -> Path:
    """Write samples, `features/empty_string.pt` and `train.csv`; return the CSV path."""
    lines = ["id,audio_path,features_path,video_exist,text_exist"]
    for i, mode in enumerate(modes):
        sid = f"{mode}_{i}"
        audio, pth = write_sample(root, sid, mode, seed=i + 1)
        if relative:
            audio, pth = audio.relative_to(root), pth.relative_to(root)
        video, text = MODES[mode]
        lines.append(f"{sid},{audio},{pth},{video},{text}")
    empty = torch.randn(SHAPES["text_seq_len"], SHAPES["text_dim"], generator=torch.Generator().manual_seed(99))
    torch.save(empty.unsqueeze(0), root / "features" / "empty_string.pt")  # (1, L, D) like the extractor may write
    csv = root / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def overrides(root: Path, csv: Path | str | list, **extra: object) -> list[str]:
    base = {
        "model.name": "tiny_16k",
        "data.target_sample_rate": SR,
        "data.audio_duration": DURATION,
        **{f"data.{k}": v for k, v in SHAPES.items()},
        "data.train_csv": csv if isinstance(csv, list) else str(csv),
        "training.output_dir": str(root / "out"),
        "training.experiment_id": "exp",
        "training.device": "cpu",
        "training.epochs": 2,
        "training.batch_size": 2,
        "training.warmup_steps": 2,
        "training.log_freq": 1,
        "training.gen_train_freq": 0,
        "training.checkpoint_freq": 1,
        "training.checkpoint_save_epoch": 0,
        "training.ema_checkpoint_save_epoch": 0,
        "training.tensorboard": False,
        "eval.num_steps": 2,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    out = []
    for key, value in base.items():
        if isinstance(value, list):
            value = "[" + ",".join(str(v) for v in value) + "]"
        elif value is None:
            value = "null"
        elif isinstance(value, bool):
            value = str(value).lower()
        out.append(f"{key}={value}")
    return out


def make_config(root: Path, csv: Path | str | list, **extra: object):
    return load_config("train.yaml", overrides(root, csv, **extra))


def run_resumed_twice(root: Path, csv: Path, **common: object) -> tuple[Path, dict, dict]:
    """A 4-step run in one go (root/a) and the same run stopped after 3 steps and resumed
    (root/b); returns (the first run's folder, its checkpoint, the resumed run's checkpoint) after
    checking the step counts and that both checkpoints' weights and EMA-1 are bit-identical."""
    full = run_training(make_config(root / "a", csv, **common))
    part = run_training(make_config(root / "b", csv, training__max_steps=3, **common))
    rest = run_training(make_config(root / "b", csv, **common))
    a = safe_torch_load(full.exp_dir / "checkpoint_latest.pth")
    b = safe_torch_load(rest.exp_dir / "checkpoint_latest.pth")
    assert part.global_step == 3 and rest.global_step == a["global_step"] == 4
    for entry in ("model", "model_ema1"):
        assert set(a[entry]) == set(b[entry])
        for k in a[entry]:
            assert torch.equal(a[entry][k], b[entry][k]), (entry, k)
    return full.exp_dir, a, b
