"""Every clip in every mode: per-mode class accuracy of a checkpoint on more rows than a demo holds out.

    python scripts/bench/mode_probe.py --checkpoint RUN_DIR_OR_PTH --data DATA_DIR \
        [--splits holdout,train] [--cfg 1.5] [--steps 25] [--cfg-interval LO HI] [--live] [--json OUT]

A built-in data set (wavflow.demo.make_dataset) holds each clip in one mode. This probe
generates every clip of a split in all three modes: T2A from the clip's caption (its class
description, also kept for V2A clips) with the video withheld, V2A from the video alone, VT2A
from both, with the seeds of the predict job, and scores each mode on its own with the demo's
metrics (class accuracy beside chance, onset median for the video modes, median level and noise
floor beside the real clips). `train` uses every second training clip. docs/benchmarks.md
("Every mode on its own") reports its numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wavflow.audio import load_audio  # noqa: E402
from wavflow.demo import metrics  # noqa: E402
from wavflow.demo.make_dataset import MODES, ClipInfo, load_dataset_info  # noqa: E402
from wavflow.generator import WavFlowGenerator, row_seed  # noqa: E402
from wavflow.io_utils import atomic_write_text  # noqa: E402


def _conditions(gen: WavFlowGenerator, root: Path, clip: ClipInfo, mode: str):
    video = root / clip.video_path if mode != "T2A" else None
    text = clip.description if mode != "V2A" else None
    return gen.encode_row(video=video, text=text)


def score_mode(gen: WavFlowGenerator, ref: metrics.ReferenceModel, clips: list[ClipInfo], mode: str,
               *, cfg: float, steps: int, cfg_interval: list[float] | None) -> dict:
    info, sr = ref.info, ref.info.sample_rate
    items = [_conditions(gen, info.root, c, mode) for c in clips]
    seeds = [row_seed(int(gen.cfg.inference.seed), c.id) for c in clips]
    waves = gen.generate_batch(items, seeds, cfg=cfg, steps=steps, cfg_interval=cfg_interval).numpy()
    real = [load_audio(info.root / c.audio_path, sr).numpy() for c in clips]
    predicted = [ref.classify(w) for w in waves]
    gen_levels = np.array([metrics.clip_levels(w, sr) for w in waves])  # (n, [level, floor])
    real_levels = np.array([metrics.clip_levels(w, sr) for w in real])
    out = {
        "n": len(clips), "chance": 1.0 / len(info.classes),
        "class_accuracy": float(np.mean([p == c.label for p, c in zip(predicted, clips)])),
        "level_db": float(np.median(gen_levels[:, 0])), "real_level_db": float(np.median(real_levels[:, 0])),
        "noise_floor_db": float(np.median(gen_levels[:, 1])),
        "real_noise_floor_db": float(np.median(real_levels[:, 1])),
    }
    out["predicted"] = {c.id: p for c, p in zip(clips, predicted)}  # per clip, for the confusion table
    if mode != "T2A":
        errors = [metrics.onset_errors(c.onsets, ref.onsets(w, c.label)) for w, c in zip(waves, clips)]
        out["onset_median_ms"] = metrics.summarise_onsets(errors, 100.0)["onset_median_ms"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="built-in data set folder (events.json)")
    ap.add_argument("--splits", default="holdout,train")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    ap.add_argument("--live", action="store_true", help="live weights instead of the EMA")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    gen = WavFlowGenerator.from_checkpoint(a.checkpoint, use_ema=not a.live, device="cpu")
    info = load_dataset_info(a.data)
    ref = metrics.fit_reference(info)
    report: dict[str, dict] = {}
    for split in a.splits.split(","):
        clips = info.split(split)[:: 2 if split == "train" else 1]
        for mode in MODES:
            r = score_mode(gen, ref, clips, mode, cfg=a.cfg, steps=a.steps, cfg_interval=a.cfg_interval)
            report[f"{split}/{mode}"] = r
            onset = f"  onset {r['onset_median_ms']:.1f} ms" if "onset_median_ms" in r else ""
            print(f"{split:8s} {mode:5s} n={r['n']:3d}  class_acc {r['class_accuracy']:.3f} (chance {r['chance']:.3f})"
                  f"{onset}  level {r['level_db']:.1f} dB (real {r['real_level_db']:.1f})"
                  f"  floor {r['noise_floor_db']:.1f} dB (real {r['real_noise_floor_db']:.1f})", flush=True)
    for split in a.splits.split(","):
        print(confusion_table(info, report, split))
    if a.json:
        atomic_write_text(a.json, json.dumps(report, indent=1) + "\n")


def confusion_table(info, report: dict[str, dict], split: str) -> str:
    """Per class and mode, how many clips were named right and what the others were named; and
    how many clips each mode got wrong alone or together with another mode."""
    label = {c.id: c.label for c in info.clips}
    lines = [f"{split}: per class, right / n and the classes wrong clips were named (VT2A | T2A | V2A)"]
    for k in info.classes:
        cells = []
        for mode in MODES:
            pred = {i: p for i, p in report[f"{split}/{mode}"]["predicted"].items() if label[i] == k}
            wrong = sorted(p for p in pred.values() if p != k)
            cells.append(f"{len(pred) - len(wrong)}/{len(pred)} {','.join(wrong) or '-'}")
        lines.append(f"  {k:12s} " + " | ".join(f"{c:32s}" for c in cells))
    wrong_in = {m: {i for i, p in report[f"{split}/{m}"]["predicted"].items() if p != label[i]} for m in MODES}
    both = wrong_in["VT2A"] & (wrong_in["T2A"] | wrong_in["V2A"])
    lines.append(f"  VT2A wrong {len(wrong_in['VT2A'])}: also wrong in T2A or V2A {len(both)}; "
                 f"T2A wrong {len(wrong_in['T2A'])}, V2A wrong {len(wrong_in['V2A'])}, "
                 f"T2A and V2A both wrong {len(wrong_in['T2A'] & wrong_in['V2A'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
