#!/usr/bin/env python
"""Do the sampling speed settings keep a trained model's quality? The demo metrics per setting.

Predicts the held-out clips of a finished learning-benchmark generalise stage with each
setting (the benchmark's own predict call, EMA weights; a setting's key=value words replace
the benchmark's value of that key), scores them with the demo metrics per mode, never pooled
(class accuracy of VT2A, T2A and V2A rows with their row counts, onset median of the modes with
video, VT2A and V2A; the Fréchet distance of all rows) and compares every waveform with the
first setting's (max / mean absolute difference), at each guidance scale given.

    python scripts/bench/sampling_quality.py --stage-dir bench_output/learning/generalise \\
        --setting reference= \\
        --setting euler12_bf16=sampling.num_steps=12,inference.precision=bf16 \\
        [--cfg 1.0 --cfg 1.5] [--out quality.json] [bench key=value ... as the run was made]

`--setting NAME=k=v,k=v` (an empty list is the benchmark's evaluation itself). Trailing
key=value words are the benchmark overrides the stage was run with (bench.precision=...), so
the predict calls see the same model and data settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a plain clone too

from wavflow.audio import load_audio  # noqa: E402
from wavflow.config import load_config  # noqa: E402
from wavflow.demo.learning_benchmark import predict_stage, stage_eval_cfg  # noqa: E402
from wavflow.demo.make_dataset import MODES  # noqa: E402
from wavflow.demo.metrics import evaluate  # noqa: E402
from wavflow.io_utils import atomic_write_text  # noqa: E402


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, sep, words = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--setting {text!r}: expected NAME=key=value,key=value (or NAME= for none)")
    overrides = [w.strip() for w in words.split(",") if w.strip()]
    for w in overrides:
        if "=" not in w:
            raise SystemExit(f"--setting {name}: {w!r} is not key=value")
    return name, overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage-dir", type=Path, required=True, help="<bench.out_dir>/generalise of a finished run")
    p.add_argument("--setting", action="append", required=True, type=parse_setting,
                   help="NAME=key=value,... (repeatable; the first is the reference of the differences)")
    p.add_argument("--cfg", action="append", type=float, default=None, help="guidance scales (default: the stage's)")
    p.add_argument("--out", type=Path, default=None)
    args, bench_overrides = p.parse_known_args(argv)
    unknown = [w for w in bench_overrides if "=" not in w or w.startswith("-")]
    if unknown:
        p.error(f"unrecognised arguments: {' '.join(unknown)}")
    args.bench_overrides = bench_overrides
    names = [n for n, _ in args.setting]
    if len(set(names)) != len(names):
        p.error(f"--setting names must differ: {names}")
    return args


def wave_differences(reference_dir: Path, other_dir: Path, sample_rate: int) -> dict[str, float]:
    """Max and mean absolute sample difference over the clips both folders hold (by file name)."""
    names = sorted(p.name for p in reference_dir.glob("*.wav"))
    if not names:
        raise SystemExit(f"no .wav files in {reference_dir}")
    maxima, sums, count, peak = [], 0.0, 0, 0.0
    for name in names:
        other = other_dir / name
        if not other.is_file():
            raise SystemExit(f"{other} is missing: the settings predicted different clips")
        a = load_audio(reference_dir / name, sample_rate).numpy()
        b = load_audio(other, sample_rate).numpy()
        n = min(a.shape[-1], b.shape[-1])
        diff = np.abs(a[..., :n] - b[..., :n])
        maxima.append(float(diff.max()))
        sums += float(diff.sum())
        count += diff.size
        peak = max(peak, float(np.abs(a).max()))
    return {"max_abs_diff": max(maxima), "mean_abs_diff": sums / count, "reference_peak": peak, "clips": len(names)}


VIDEO_MODES = ("VT2A", "V2A")  # onsets follow the video; T2A timing is luck, not reported


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per mode (demo metrics groups, never pooled): rows, class accuracy and, for the modes
    with video, the onset median; the Fréchet distance of all rows."""
    groups = metrics["groups"]
    modes: dict[str, Any] = {}
    for mode in MODES:
        g = groups.get(mode, {})
        modes[mode] = {"n": g.get("n", 0), "class_accuracy": g.get("class_accuracy")}
        if mode in VIDEO_MODES:
            modes[mode]["onset_median_ms"] = g.get("onset_median_ms")
    return {"modes": modes, "frechet": groups.get("overall", {}).get("frechet")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = load_config("bench_learning.yaml", args.bench_overrides, job="bench_learning")
    stage = args.stage_dir.absolute()
    data, ckpt = stage / "data", stage / "train" / "run" / "checkpoint_latest.pth"
    for needed in (data / "holdout_infer.csv", ckpt):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing: --stage-dir must be a generalise stage the benchmark has trained")
    scales = args.cfg or [stage_eval_cfg(cfg, "generalise")]
    sr = int(cfg.data.target_sample_rate)
    result: dict[str, Any] = {"stage_dir": str(stage), "checkpoint": str(ckpt), "settings": {}}
    for g in scales:
        reference_dir = None
        for name, words in args.setting:
            out = stage / "sampling_quality" / f"{name}_cfg{g:g}"
            seconds = predict_stage(cfg, "generalise", data / "holdout_infer.csv", data, ckpt, out, stage / "logs",
                               f"quality_{name}_cfg{g:g}", use_ema=True, extra=[f"inference.cfg={g}", *words])
            metrics, _ = evaluate(out, data, out_dir=out, progress=False)
            row = {"overrides": words, "cfg": g, "predict_wall_seconds": round(seconds, 1), **headline(metrics)}
            if reference_dir is None:
                reference_dir = out
            else:
                row.update(wave_differences(reference_dir, out, sr))
            result["settings"][f"{name}@cfg{g:g}"] = row
            if args.out is not None:
                atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    """One line per setting: class accuracy (rows) of each mode, onset median of VT2A and V2A,
    Fréchet distance and the differences to the first setting's waveforms."""
    def cell(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = f"{'setting':<34}" + "".join(f" {m + ' acc':>9} {'(n)':>4}" for m in MODES)
    head += "".join(f" {m + ' onset':>11}" for m in VIDEO_MODES)
    lines = [head + f" {'Fréchet':>9} {'max diff':>9} {'mean diff':>10}"]
    for key, r in result["settings"].items():
        modes = r["modes"]
        line = f"{key:<34}" + "".join(f" {cell(modes[m]['class_accuracy'], '.3f'):>9} {modes[m]['n']:>4}"
                                      for m in MODES)
        line += "".join(f" {cell(modes[m]['onset_median_ms'], '.1f'):>11}" for m in VIDEO_MODES)
        lines.append(line + f" {cell(r['frechet'], '.0f'):>9} {cell(r.get('max_abs_diff'), '.3g'):>9} "
                            f"{cell(r.get('mean_abs_diff'), '.3g'):>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
