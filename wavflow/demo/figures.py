"""Real vs generated waveforms and log-mel spectrograms for a few held-out clips (PNG)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wavflow.audio import load_audio  # noqa: E402
from wavflow.demo.make_dataset import load_dataset_info  # noqa: E402
from wavflow.demo.metrics import log_mel  # noqa: E402
from wavflow.io_utils import atomic_write_bytes  # noqa: E402


def plot_real_vs_generated(data_dir: str | Path, generated_dir: str | Path, out_png: str | Path,
                           max_clips: int = 4) -> Path:
    """One row per held-out clip that has a generated `<id>.wav`: real and generated audio,
    each as waveform and log-mel, with the video's event onsets marked."""
    info = load_dataset_info(data_dir)
    generated_dir = Path(generated_dir)
    clips = [c for c in info.split("holdout") if (generated_dir / f"{c.id}.wav").is_file()][:max_clips]
    if not clips:
        raise FileNotFoundError(f"no generated wav in {generated_dir} matches a held-out clip of {data_dir}")
    sr = info.sample_rate
    fig, axes = plt.subplots(len(clips), 4, figsize=(16, 2.6 * len(clips)), squeeze=False)
    for row, clip in enumerate(clips):
        real = load_audio(Path(info.root) / clip.audio_path, sr).numpy()
        gen = load_audio(generated_dir / f"{clip.id}.wav", sr).numpy()
        for col, (name, wave) in enumerate((("real", real), ("generated", gen))):
            t = np.arange(len(wave)) / sr
            ax_w, ax_m = axes[row, 2 * col], axes[row, 2 * col + 1]
            ax_w.plot(t, wave, linewidth=0.4, color="tab:blue" if name == "real" else "tab:orange")
            ax_w.set_xlim(0, info.duration)
            ax_w.set_title(f"{clip.id} [{clip.mode}] {name}: {clip.caption or '(no caption)'}"[:70], fontsize=8)
            mel = log_mel(wave, sr)
            ax_m.imshow(mel, origin="lower", aspect="auto", extent=(0, len(wave) / sr, 0, mel.shape[0]),
                        cmap="magma")
            ax_m.set_title(f"log-mel ({name})", fontsize=8)
            for onset in clip.onsets if clip.has_video or name == "real" else []:
                for ax in (ax_w, ax_m):
                    ax.axvline(onset, color="lime", linewidth=0.8, linestyle="--")
    fig.suptitle("WavFlow demo: real (left) vs generated (right); dashed lines = event onsets", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(out_png, buf.getvalue())
