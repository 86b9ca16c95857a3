"""The demo's long video (docs/long_form.md): held-out clips one after another, generated in
windows and scored per clip-long segment, over the whole length, and at the window junctions.

The data side writes `long/long_v2a.mp4` (the held-out V2A clips' videos joined), its real
audio `long/long_v2a.wav`, `long/long_v2a.json` (the clip ids in order) and `long_infer.csv`
(one V2A row). The metrics side scores predict's `long_v2a.wav` with the demo's scorer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import av
import numpy as np

from wavflow.audio import load_audio, write_wav
from wavflow.demo.audio_measures import onset_errors, summarise_onsets
from wavflow.demo.make_dataset import DatasetInfo
from wavflow.demo.seams import seam_scores
from wavflow.io_utils import atomic_write_text
from wavflow.long_form.plan import plan_windows, resolve_overlap

LONG_ID = "long_v2a"


def join_videos(paths: Sequence[Path], out: Path, fps: int, skip_first: int = 0) -> Path:
    """One H.264 mp4 of the clips one after another (re-encoded; frame times continue), less
    the first clip's first `skip_first` frames."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with av.open(str(tmp), "w", format="mp4") as dst:
        stream, pts = None, 0
        for n, path in enumerate(paths):
            with av.open(str(path)) as src:
                for i, frame in enumerate(src.decode(video=0)):
                    if n == 0 and i < skip_first:
                        continue
                    if stream is None:
                        stream = dst.add_stream("libx264", rate=fps)
                        stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, "yuv420p"
                    picture = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
                    picture.pts, pts = pts, pts + 1
                    for packet in stream.encode(picture):
                        dst.mux(packet)
        if stream is not None:
            for packet in stream.encode(None):
                dst.mux(packet)
    tmp.replace(out)
    return out


def long_clips(info: DatasetInfo) -> list:
    """The held-out V2A clips, in id order."""
    return sorted((c for c in info.split("holdout") if c.mode == "V2A"), key=lambda c: c.id)


def make_long_clip(info: DatasetInfo, min_clips: int) -> Path | None:
    """Write the long video (every held-out V2A clip), its real audio and its one-row CSV; None
    (and nothing written) when there are fewer than `min_clips` such clips, or min_clips < 1."""
    clips = long_clips(info)
    if min_clips < 1 or len(clips) < min_clips:
        return None
    root, sr = info.root, info.sample_rate
    n = int(round(info.duration * sr))
    folder = root / "long"
    join_videos([root / c.video_path for c in clips], folder / f"{LONG_ID}.mp4", int(info.fps))
    real = np.concatenate([load_audio(root / c.audio_path, sr).numpy()[:n] for c in clips])
    write_wav(folder / f"{LONG_ID}.wav", real, sr)
    atomic_write_text(folder / f"{LONG_ID}.json", json.dumps({"clip_ids": [c.id for c in clips]}, indent=1) + "\n")
    csv = root / "long_infer.csv"
    atomic_write_text(csv, f"id,video_path,caption,video_exist,text_exist\n{LONG_ID},long/{LONG_ID}.mp4,,1,0\n")
    return csv


def score_segments(wave: np.ndarray, clips: Sequence[Any], ref: Any, n: int) -> tuple[float, list[np.ndarray]]:
    """Class accuracy of consecutive n-sample segments (one per clip) and their onset errors."""
    right, errors = 0, []
    for i, clip in enumerate(clips):
        seg = wave[i * n: (i + 1) * n]
        right += ref.classify(seg) == clip.label
        errors.append(onset_errors(clip.onsets, ref.onsets(seg, clip.label)))
    return right / len(clips), errors


def score_long_clip(generated: Path, info: DatasetInfo, ref: Any, *, window_sec: float,
                    overlap_sec: float | None, tolerance_ms: float) -> dict[str, Any]:
    """The long row's figures: per-segment class, onsets over the whole length, seams."""
    ids = json.loads((info.root / "long" / f"{LONG_ID}.json").read_text())["clip_ids"]
    by_id = info.by_id()
    clips = [by_id[i] for i in ids]
    sr = info.sample_rate
    n = int(round(info.duration * sr))
    wave = load_audio(generated, sr).numpy()
    real = load_audio(info.root / "long" / f"{LONG_ID}.wav", sr).numpy()
    window = int(round(window_sec * sr))
    overlap = int(round(resolve_overlap(overlap_sec, window_sec) * sr))
    plan = plan_windows(len(real), window, overlap, sr)
    accuracy, errors = score_segments(wave, clips, ref, n)
    real_accuracy, real_errors = score_segments(real, clips, ref, n)
    return {
        "n": len(clips), "seconds": len(wave) / sr, "windows": plan.count, "overlap_sec": overlap / sr,
        "class_accuracy": accuracy, "chance_accuracy": 1.0 / len(info.classes),
        **summarise_onsets(errors, tolerance_ms),
        "real_audio": {"class_accuracy": real_accuracy, **summarise_onsets(real_errors, tolerance_ms)},
        "seams": seam_scores(wave, real, plan.junctions(), sr),
    }
