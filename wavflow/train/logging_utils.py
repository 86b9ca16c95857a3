"""Console + `training.log` + TensorBoard for the trainer (rank 0 writes; others only warn)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
_HANDLER_TAG = "_wavflow_train_handler"


def setup_logging(exp_dir: Path, is_main: bool, rank: int) -> logging.Logger:
    """Logger `wavflow.train`: console (INFO on rank 0, WARNING elsewhere) and, on rank 0,
    `<exp_dir>/training.log` in append mode. Re-running in one process replaces the handlers."""
    logger = logging.getLogger("wavflow.train")
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter(LOG_FORMAT if is_main else f"[rank {rank}] {LOG_FORMAT}")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    console.setFormatter(fmt)
    setattr(console, _HANDLER_TAG, True)
    logger.addHandler(console)
    if is_main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(exp_dir / "training.log", mode="a")
        file_handler.setFormatter(fmt)
        setattr(file_handler, _HANDLER_TAG, True)
        logger.addHandler(file_handler)
    return logger


def close_logging() -> None:
    logger = logging.getLogger("wavflow.train")
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            logger.removeHandler(handler)
            handler.close()


def log_mel_image(wave: torch.Tensor, sample_rate: int) -> "Any":
    """A (H, W, 3) uint8 picture of the log-mel spectrogram (matplotlib Agg, no display)."""
    import matplotlib  # lazy: pyplot takes 0.6 s, only images in TensorBoard need it

    matplotlib.use("Agg")  # headless: no display on servers and CI
    # matplotlib.pyplot costs 0.6 s to import; only the TensorBoard images need it
    import matplotlib.pyplot as plt

    n_fft = 1024 if sample_rate >= 16000 else 512
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=80
    )(wave.float().reshape(1, -1))[0]
    log_mel = torch.log10(mel.clamp_min(1e-10)).numpy()
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    ax.imshow(log_mel, origin="lower", aspect="auto", cmap="magma")
    ax.set_xlabel("frame")
    ax.set_ylabel("mel bin")
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


class TensorBoard:
    """A SummaryWriter on rank 0 when enabled; every call is a no-op otherwise."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            # lazy: torch.utils.tensorboard costs ~0.1 s to import; only rank 0 with
            # training.tensorboard=true writes events (other ranks, tests, benchmarks do not)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def audio(self, tag: str, wave: torch.Tensor, sample_rate: int, step: int) -> None:
        if self.writer is None:
            return
        self.writer.add_audio(tag, wave.float().reshape(1, -1).clamp(-1, 1), step, sample_rate=sample_rate)
        self.writer.add_image(tag + "_logmel", log_mel_image(wave, sample_rate), step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
