"""Long-form generation with a demo model: sync, class, seams, speed and memory (docs/long_form.md).

    python scripts/bench/long_form.py --demo DEMO_OUT [--clips 8] [--overlap 0.25] [--steps 25]
        [--cfg 1.5] [--seeds 4] [--lengths 10 60] [--precision auto|fp32|bf16] [--json OUT]

Quality: the held-out V2A clips of a finished demo (DEMO_OUT, `bash scripts/launch/demo.sh`)
are joined into one long video (and their real audio into one long wav), generated in windows
(V2A: the video alone) with --seeds seeds, and scored per trained-duration segment with the
demo's scorer: class accuracy and onset median beside the same model's per-clip figures (each
clip generated alone with the same seeds), and the seam scores of wavflow.demo.seams at the window junctions beside the real
audio's. Speed: --lengths videos (the held-out clips looped) are generated, each in a fresh
process, reporting wall time and peak resident memory. Not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wavflow.audio import load_audio, write_wav  # noqa: E402
from wavflow.demo import metrics  # noqa: E402
from wavflow.demo.audio_measures import summarise_onsets  # noqa: E402
from wavflow.demo.long_clip import join_videos, long_clips, score_segments  # noqa: E402
from wavflow.demo.make_dataset import load_dataset_info  # noqa: E402
from wavflow.demo.seams import seam_scores  # noqa: E402
from wavflow.generator import WavFlowGenerator  # noqa: E402
from wavflow.long_form.sampler import clip_plan  # noqa: E402


TOLERANCE_MS = 100.0  # as the demo's metrics


def checkpoint_of(demo: Path) -> Path:
    found = sorted((demo / "train").glob("*/checkpoint_latest.pth"))
    if not found:
        raise SystemExit(f"no train/*/checkpoint_latest.pth in {demo}: run the demo first")
    return found[0]


def load_generator(args: argparse.Namespace) -> WavFlowGenerator:
    """The demo's model on the CPU, at --precision (inference.precision: encoders and sampler)."""
    return WavFlowGenerator.from_checkpoint(checkpoint_of(args.demo), device="cpu",
                                           overrides=[f"inference.precision={args.precision}"])


def quality(args: argparse.Namespace, gen: WavFlowGenerator) -> dict:
    info = load_dataset_info(args.demo / "data")
    clips = long_clips(info)[: args.clips]
    ref = metrics.fit_reference(info)
    sr = info.sample_rate
    work = args.demo / "long_form"
    work.mkdir(exist_ok=True)
    n = int(round(info.duration * sr))  # one clip's samples
    # --lead-in-frames: the last frames of the last held-out clip go first as well, so that windows
    # start off the joined clips' boundaries (at the default overlap of half a window, every
    # other window would otherwise hold exactly one held-out clip); scoring starts after it.
    fps = int(info.fps)
    lead_frames = max(0, min(args.lead_in_frames, int(round(info.duration * fps))))
    lead_clip = clips[-1] if lead_frames else None  # any held-out clip will do
    skip = int(round(info.duration * fps)) - lead_frames
    paths = ([info.root / lead_clip.video_path] if lead_clip else []) + [info.root / c.video_path for c in clips]
    video = join_videos(paths, work / "long_v2a.mp4", fps, skip_first=skip if lead_clip else 0)
    lead = int(round(lead_frames / fps * sr))
    lead_audio = [load_audio(info.root / lead_clip.audio_path, sr).numpy()[n - lead: n]] if lead_clip else []
    real = np.concatenate(lead_audio + [load_audio(info.root / c.audio_path, sr).numpy()[:n] for c in clips])
    plan = clip_plan(gen, len(real) / sr, args.overlap)
    long_right, clip_right, long_err, clip_err, seconds = 0.0, 0.0, [], [], 0.0  # errors: one array per segment
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        wave, _ = gen.generate(video=str(video), cfg=args.cfg, steps=args.steps, seed=seed,
                               window_overlap_sec=args.overlap)
        seconds += time.perf_counter() - t0
        if seed == 0:
            write_wav(work / "long_v2a.wav", wave.numpy(), sr)
            first = wave.numpy()  # with the lead-in: the seams are scored on the whole axis
        wave = wave.numpy()[lead:]
        acc, err = score_segments(wave, clips, ref, n)
        long_right, long_err = long_right + acc, long_err + err
        # the same model on each clip alone (one trained-duration clip per video), same seed
        per_clip = [gen.generate(video=str(info.root / c.video_path), cfg=args.cfg, steps=args.steps, seed=seed,
                                 long_form="off")[0].numpy() for c in clips]
        acc, err = score_segments(np.concatenate(per_clip), clips, ref, n)
        clip_right, clip_err = clip_right + acc, clip_err + err
    wave = first
    return {
        "segments": len(clips), "seeds": args.seeds, "windows": plan.count,
        "overlap_sec": plan.known_samples(1) / sr, "generation_seconds_per_clip": round(seconds / args.seeds, 2),
        "class_accuracy_long": long_right / args.seeds, "class_accuracy_per_clip": clip_right / args.seeds,
        "onsets_long": summarise_onsets(long_err, TOLERANCE_MS),
        "onsets_per_clip": summarise_onsets(clip_err, TOLERANCE_MS),
        "seams": seam_scores(wave, real, plan.junctions(), sr),
    }


def speed_child(args: argparse.Namespace) -> None:
    """In a fresh process: generate one --child-length video, print seconds and peak RSS."""
    info = load_dataset_info(args.demo / "data")
    clips = long_clips(info)
    n = int(round(args.child_length))
    paths = [info.root / clips[i % len(clips)].video_path for i in range(n)]
    video = join_videos(paths, args.demo / "long_form" / f"speed_{n}s.mp4", int(info.fps))
    gen = load_generator(args)
    gen.encoders(need_video=True)  # loading the encoders is start-up, not generation
    t0 = time.perf_counter()
    wave, _ = gen.generate(video=str(video), cfg=args.cfg, steps=args.steps, seed=0, window_overlap_sec=args.overlap)
    seconds = time.perf_counter() - t0
    print(json.dumps({"length_s": len(wave) / gen.sample_rate, "seconds": round(seconds, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, required=True)
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--overlap", type=float, default=None)
    p.add_argument("--lead-in-frames", type=int, default=0,
                   help="the last N frames of the last scored clip put before the scored ones (windows then start off the clips' boundaries)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--lengths", type=float, nargs="*", default=[10, 60])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="inference.precision; bf16 pays off only on CPUs with native bf16 (AVX512-BF16, AMX)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child-length", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.child_length is not None:
        speed_child(args)
        return
    gen = load_generator(args)
    result = {"quality": quality(args, gen), "speed": []}
    print(json.dumps(result["quality"], indent=1), flush=True)
    for length in args.lengths:
        cmd = [sys.executable, __file__, "--demo", str(args.demo), "--steps", str(args.steps), "--cfg", str(args.cfg),
               "--precision", args.precision, "--child-length", str(length)] + (["--overlap", str(args.overlap)] if args.overlap is not None else [])
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        result["speed"].append(json.loads(line))
        print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
