"""Where the energy of generated clips lies in frequency, beside the real clips, per sound class.

    python scripts/bench/spectral_bands.py --data DEMO_OUT/data --generated DEMO_OUT/predict \
        [--split holdout] [--bands 0,1000,2000,5000,8000] [--json OUT]
    python scripts/bench/spectral_bands.py --data DEMO_OUT/data --checkpoint DEMO_OUT/train/demo \
        [--times 0.5,0.8,0.9,0.96] [--split holdout] [--bands ...]

For every clip of the split of a built-in data set (wavflow.demo.make_dataset) that has a wav in
`--generated` (the demo's predict/ folder, or any folder of `<id>.wav`), the share of the clip's
energy in each band (from one FFT of the whole clip), for the real and the generated clip; printed
as per-class medians. Broadband classes (noise bursts, clicks) show whether a model renders their
noise at the right frequencies; docs/benchmarks.md ("The demo") reports it.

With `--checkpoint`, the network itself is probed instead: each real clip is noised to x_t at the
given training times (its own video and caption as conditions, no guidance, seeded noise) and the
bands of the network's x̂ are compared with those of the training target x1 (the amplitude-lifted
clip, whose clamped peaks give clicks more high-frequency energy than their wav): does the network
keep a band that x_t shows, or remove it?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wavflow.audio import load_audio_tokens, unpatchify  # noqa: E402
from wavflow.generator import WavFlowGenerator  # noqa: E402
from wavflow.io_utils import atomic_write_text  # noqa: E402


def band_shares(wave: np.ndarray, sample_rate: int, edges: list[float]) -> list[float]:
    """Share of the clip's energy in [edges[i], edges[i+1]) Hz (the last band includes Nyquist)."""
    wave = wave if wave.ndim == 1 else wave.mean(axis=1)
    power = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1.0 / sample_rate)
    total = max(float(power.sum()), 1e-20)
    shares = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == len(edges) - 2
        inside = (freqs >= low) & ((freqs <= high) if last else (freqs < high))
        shares.append(float(power[inside].sum()) / total)
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="built-in data set folder (metadata.csv)")
    ap.add_argument("--generated", type=Path, help="folder of generated <id>.wav")
    ap.add_argument("--checkpoint", type=Path, help="probe this model's x̂ on noised real clips instead")
    ap.add_argument("--times", default="0.5,0.8,0.9,0.96", help="training times t of x_t for --checkpoint")
    ap.add_argument("--split", default="holdout")
    ap.add_argument("--bands", default="0,1000,2000,5000,8000", help="band edges in Hz")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    edges = [float(x) for x in a.bands.split(",")]
    meta = pd.read_csv(a.data / "metadata.csv", dtype=str, keep_default_na=False)
    meta = meta[meta["split"] == a.split]
    if (a.generated is None) == (a.checkpoint is None):
        raise SystemExit("give one of --generated DIR or --checkpoint RUN")
    if a.checkpoint is not None:
        times = [float(t) for t in a.times.split(",")]
        for t, per_class in denoised_bands(a.checkpoint, a.data, meta, edges, times).items():
            print_table(per_class, edges, f"x̂ of the network at t = {t:g} | real, {a.split} clips, VT2A conditions",
                        a.json.with_name(f"{a.json.stem}_t{t:g}.json") if a.json else None)
        return
    per_class: dict[str, dict[str, list[list[float]]]] = {}
    for row in meta.itertuples(index=False):
        generated = a.generated / f"{row.id}.wav"
        if not generated.is_file():
            continue
        real, sr_real = sf.read(a.data / row.audio_path)
        fake, sr_fake = sf.read(generated)
        entry = per_class.setdefault(row.label, {"real": [], "generated": []})
        entry["real"].append(band_shares(real, sr_real, edges))
        entry["generated"].append(band_shares(fake, sr_fake, edges))
    if not per_class:
        raise SystemExit(f"no generated wav in {a.generated} matches a {a.split} clip of {a.data}")
    print_table(per_class, edges, a.split, a.json)


def denoised_bands(checkpoint: Path, data: Path, meta: pd.DataFrame, edges: list[float],
                   times: list[float]) -> dict[float, dict[str, dict[str, list[list[float]]]]]:
    """{t: {class: {"real": shares, "generated": shares of x̂ at t}}} over the clips of `meta`."""
    gen = WavFlowGenerator.from_checkpoint(checkpoint, use_ema=True, device="cpu")
    sr, n = int(gen.cfg.data.target_sample_rate), gen.num_samples
    out: dict[float, dict[str, dict[str, list[list[float]]]]] = {t: {} for t in times}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for row in meta.itertuples(index=False):
            x1 = load_audio_tokens(data / row.audio_path, sr, float(gen.cfg.data.audio_duration),
                                   audio_dim=int(gen.cfg.data.audio_dim), audio_scale=gen.audio_scale)[None]
            cond = gen.model.preprocess_conditions(*gen.stack_conditions(
                [gen.encode_row(video=data / row.video_path, text=row.caption)]))
            x0 = torch.randn(x1.shape, generator=generator)
            real = band_shares(unpatchify(x1 / gen.audio_scale)[0, :n].numpy(), sr, edges)
            for t in times:
                x_hat = gen.model.predict_flow(x0 * (1 - t) + x1 * t, torch.tensor([t]), cond)
                entry = out[t].setdefault(row.label, {"real": [], "generated": []})
                entry["real"].append(real)
                entry["generated"].append(band_shares(unpatchify(x_hat.float() / gen.audio_scale)[0, :n].numpy(),
                                                      sr, edges))
    return out


def print_table(per_class: dict[str, dict[str, list[list[float]]]], edges: list[float], what: str,
                json_path: Path | None) -> None:
    names = [f"{edges[i] / 1000:g}-{edges[i + 1] / 1000:g} kHz" for i in range(len(edges) - 1)]
    print(f"median share of each clip's energy per band, real | generated ({what})")
    print(f"{'class':12s} {'n':>3s}  " + "  ".join(f"{n:>17s}" for n in names))
    result = {}
    for label, entry in sorted(per_class.items()):
        real, fake = np.median(entry["real"], axis=0), np.median(entry["generated"], axis=0)
        result[label] = {"n": len(entry["real"]), "bands_hz": edges, "real": real.round(3).tolist(),
                         "generated": fake.round(3).tolist()}
        cells = "  ".join(f"{r:7.2f} | {g:7.2f}" for r, g in zip(real, fake))
        print(f"{label:12s} {len(entry['real']):3d}  {cells}")
    if json_path:
        atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
