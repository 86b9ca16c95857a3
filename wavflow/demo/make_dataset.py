"""Build a built-in audio-visual data set of the demo (docs/datasets.md).

    python -m wavflow.demo.make_dataset --out DIR --n 48 --seed 0 [--dataset instruments]
        [--duration 2.0] [--classes low_tone,chirp,clicks] [--caption-split heldout]
        [--palette-seed 7] ...

Two sets share this generator, its layout and its determinism: `shapes`, procedural sound
events (sound_events.py) whose shape appears on screen while they sound, and `instruments`,
recorded instrument samples from the General MIDI SoundFont in pretty_midi (instruments.py)
whose picture lights up while a note sounds. Each clip holds one class occurring 1-3 times at
onsets on the video frame grid (onset_sec = k / fps), so the picture reacts exactly on the
frame where the sound starts. Layout of DIR (every path in the CSVs is relative to DIR; consumers
set `data.data_root=DIR`):

    audio/<id>.wav          mono PCM-16 at --sample-rate, --duration seconds
    video/<id>.mp4          --size x --size, --fps, H.264 yuv420p (written for every clip)
    train_vt2a.csv          id,audio_path,video_path,caption,label,onsets   train clips with video
                            (V2A clips have an empty caption -> text_exist=0 at extraction;
                            label/onsets feed only extraction's feature report)
    train_t2a.csv           id,audio_path,caption,label,onsets     train clips without video
    holdout_infer.csv       id,video_path,caption,video_exist,text_exist   inference input
    holdout_reference.csv   id,audio_path,video_path,caption,mode,label,onsets (space-separated s)
    metadata.csv            one row per clip: id,split,mode,label,num_events,onsets,
                            durations,caption,description,audio_path,video_path
    events.json             the same, plus the generation parameters (read by demo.metrics)

Modes: VT2A (video + caption), T2A (caption only), V2A (video only), assigned inside each
split so both splits hold every mode. The output is a pure function of the arguments:
the same seed gives byte-identical wavs and identical CSVs / JSON.

Variations (for checking that a recipe holds on data it was not tuned on), all off by default:
--classes keeps a subset of the classes; --caption-split heldout gives held-out clips wordings
that no training caption uses (their audio and video stay those of the shared split);
--palette-seed gives every class another colour and shape.
"""

from __future__ import annotations

import argparse
import sys
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

from wavflow.demo import instruments
from wavflow.demo.sound_events import (
    blank_frame,
    CLASS_BY_NAME,
    class_looks,
    CLASS_NAMES,
    draw_event,
    Look,
    make_caption,
    palette_looks,
    place_shape,
    ShapePlacement,
    spread_events,
    synthesize_event,
)
from wavflow.errors import ConfigError, ManifestError
from wavflow.exit_codes import EXIT_OK, JobArgumentParser, run_job
from wavflow.io_utils import atomic_write_bytes, atomic_write_csv, atomic_write_text

MODES = ("VT2A", "T2A", "V2A")
BACKGROUND_NOISE_RMS = 0.01  # -40 dBFS
PEAK_LIMIT = 0.95
EVENTS_VERSION = 1
CAPTION_SPLITS = ("shared", "heldout")
DATASETS = ("shapes", "instruments")  # procedural sound events; recorded instrument samples


@dataclass
class ClipInfo:
    id: str
    split: str  # "train" | "holdout"
    mode: str  # "VT2A" | "T2A" | "V2A"
    label: str
    onsets: list[float]  # seconds, multiples of 1/fps
    durations: list[float]  # seconds, multiples of 1/fps
    onset_frames: list[int]
    duration_frames: list[int]
    caption: str  # the caption the CSVs expose ("" for V2A)
    description: str  # the class caption, also kept for V2A clips
    audio_path: str  # relative to the data set root
    video_path: str
    # generation parameters beyond the timing (instruments: "pitches" per note, "velocity")
    details: dict = field(default_factory=dict)

    @property
    def has_video(self) -> bool:
        return self.mode in ("VT2A", "V2A")

    @property
    def has_text(self) -> bool:
        return self.mode in ("VT2A", "T2A")


@dataclass
class DatasetInfo:
    root: Path
    seed: int
    sample_rate: int
    duration: float
    fps: int
    size: int
    classes: list[str]
    clips: list[ClipInfo] = field(default_factory=list)
    caption_split: str = "shared"  # "heldout": holdout captions use wordings training never saw
    palette_seed: int | None = None  # None: the built-in colours and shapes
    dataset: str = "shapes"  # one of DATASETS

    @property
    def events_path(self) -> Path:
        return self.root / "events.json"

    def by_id(self) -> dict[str, ClipInfo]:
        return {c.id: c for c in self.clips}

    def split(self, name: str) -> list[ClipInfo]:
        return [c for c in self.clips if c.split == name]


# ----------------------------------------------------------------------------------------------
# Planning: split, class, mode and event times (no I/O, all from the seed)


def _split_counts(n: int, holdout_frac: float) -> int:
    holdout = int(round(n * holdout_frac))
    if n >= 6:  # keep three holdout clips so every mode can be evaluated
        holdout = max(holdout, 3)
    return min(max(holdout, 0), n)


def _assign_modes(m: int, no_caption_frac: float, no_video_frac: float,
                  rng: np.random.Generator) -> list[str]:
    """Modes for a split of m clips; every mode appears once m >= 3."""
    n_v2a = int(round(m * no_caption_frac))
    n_t2a = int(round(m * no_video_frac))
    if m >= 3:
        n_v2a, n_t2a = max(n_v2a, 1), max(n_t2a, 1)
    n_t2a = min(n_t2a, m)
    n_v2a = min(n_v2a, m - n_t2a)
    modes = ["T2A"] * n_t2a + ["V2A"] * n_v2a + ["VT2A"] * (m - n_t2a - n_v2a)
    return [modes[i] for i in rng.permutation(m)]


def _round_robin_classes(m: int, rng: np.random.Generator,
                         classes: Sequence[str] = CLASS_NAMES) -> list[str]:
    """Each block of len(classes) clips holds every class once, in a shuffled order."""
    labels: list[str] = []
    while len(labels) < m:
        labels.extend(classes[i] for i in rng.permutation(len(classes)))
    return labels[:m]


def _plan_clips(n: int, seed: int, holdout_frac: float, no_caption_frac: float,
                no_video_frac: float, classes: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Split, label and mode of every clip (all from the planning stream of the seed)."""
    plan_rng = np.random.default_rng([seed, 0])
    n_holdout = _split_counts(n, holdout_frac)
    holdout_idx = set(int(i) for i in plan_rng.choice(n, size=n_holdout, replace=False))
    split_of = ["holdout" if i in holdout_idx else "train" for i in range(n)]
    # classes and modes are assigned within each split so both splits cover them
    labels: list[str] = [""] * n
    modes: list[str] = [""] * n
    for split in ("train", "holdout"):
        members = [i for i in range(n) if split_of[i] == split]
        for i, label, mode in zip(members, _round_robin_classes(len(members), plan_rng, classes),
                                  _assign_modes(len(members), no_caption_frac, no_video_frac,
                                                plan_rng)):
            labels[i], modes[i] = label, mode
    return split_of, labels, modes


def _plan_events(label: str, total_frames: int, fps: int,
                 rng: np.random.Generator) -> tuple[list[int], int]:
    """Onset frames of 1-3 non-overlapping events that fit in the clip, and the event length."""
    dur_frames = max(1, int(round(CLASS_BY_NAME[label].duration_sec * fps)))
    return spread_events(label, dur_frames, total_frames, fps, rng), dur_frames


# ----------------------------------------------------------------------------------------------
# Rendering


def render_audio(label: str, onset_frames: Sequence[int], dur_frames: int, *, fps: int,
                 sample_rate: int, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """The clip's waveform (float64): background noise plus each event at its onset sample."""
    wave = BACKGROUND_NOISE_RMS * rng.standard_normal(num_samples)
    for onset in onset_frames:
        start = int(round(onset * sample_rate / fps))
        length = min(int(round(dur_frames * sample_rate / fps)), num_samples - start)
        gain = float(rng.uniform(0.35, 0.6))
        wave[start:start + length] += gain * synthesize_event(label, length, sample_rate, rng)
    peak = float(np.max(np.abs(wave)))
    if peak > PEAK_LIMIT:
        wave *= PEAK_LIMIT / peak
    return wave


def render_frames(label: str, onset_frames: Sequence[int], dur_frames: int, *, total_frames: int,
                  size: int, rng: np.random.Generator, look: Look | None = None) -> np.ndarray:
    """(T, size, size, 3) uint8 frames: the shape is on screen exactly while its event sounds.
    `look` replaces the class's built-in colour and shape (sound_events.class_looks)."""
    frames = np.stack([blank_frame(size) for _ in range(total_frames)])
    for onset in onset_frames:
        placement: ShapePlacement = place_shape(size, rng)
        for k in range(onset, min(onset + dur_frames, total_frames)):
            draw_event(frames[k], label, placement, look)
    return frames


def wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def mp4_bytes(frames: np.ndarray, fps: int) -> bytes:
    """Encode RGB frames as lossless H.264 yuv420p mp4 (mpeg4 where libx264 is missing).

    Lossless (qp 0) so that a seed fixes the decoded frames exactly: with a lossy rate control
    (crf) the bytes this x264 build wrote for the same frames varied now and then from run to
    run under CPU load, even single-threaded, and decoded frames with them. Flat shapes on a flat
    background compress well losslessly (a few kB per second at 96 px)."""
    buf = io.BytesIO()
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"qp": "0", "preset": "veryfast"}
        else:
            stream.bit_rate = 2_000_000
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Data-set kinds: how a clip of each set is planned, described, heard and seen


@dataclass(frozen=True)
class EventPlan:
    """The timing of a clip's events (frames); every event lasts `duration_frames`."""

    onset_frames: list[int]
    duration_frames: int


class ShapesKind:
    """The procedural sound events of sound_events.py."""

    name = "shapes"
    class_names = CLASS_NAMES

    @staticmethod
    def plan(label: str, total_frames: int, fps: int, rng: np.random.Generator) -> EventPlan:
        return EventPlan(*_plan_events(label, total_frames, fps, rng))

    @staticmethod
    def caption(label: str, plan: EventPlan, fps: int, rng: np.random.Generator,
                heldout: bool) -> str:
        return make_caption(label, len(plan.onset_frames), rng, heldout=heldout)

    @staticmethod
    def audio(label: str, plan: EventPlan, fps: int, sample_rate: int, num_samples: int,
              rng: np.random.Generator) -> np.ndarray:
        return render_audio(label, plan.onset_frames, plan.duration_frames, fps=fps,
                            sample_rate=sample_rate, num_samples=num_samples, rng=rng)

    @staticmethod
    def frames(label: str, plan: EventPlan, total_frames: int, size: int,
               rng: np.random.Generator, look: Look) -> np.ndarray:
        return render_frames(label, plan.onset_frames, plan.duration_frames,
                             total_frames=total_frames, size=size, rng=rng, look=look)

    @staticmethod
    def looks(palette_seed: int | None) -> dict[str, Look]:
        return class_looks(palette_seed)

    @staticmethod
    def details(plan: EventPlan) -> dict:
        return {}


class InstrumentsKind:
    """Recorded instrument samples from the General MIDI SoundFont (instruments.py)."""

    name = "instruments"
    class_names = instruments.INSTRUMENT_NAMES

    @staticmethod
    def plan(label: str, total_frames: int, fps: int,
             rng: np.random.Generator) -> instruments.NotePlan:
        return instruments.plan_notes(label, total_frames, fps, rng)

    @staticmethod
    def caption(label: str, plan: instruments.NotePlan, fps: int, rng: np.random.Generator,
                heldout: bool) -> str:
        return instruments.make_caption(label, plan, fps, rng, heldout=heldout)

    @staticmethod
    def audio(label: str, plan: instruments.NotePlan, fps: int, sample_rate: int,
              num_samples: int, rng: np.random.Generator) -> np.ndarray:
        return instruments.render_audio(label, plan, fps=fps, sample_rate=sample_rate,
                                        num_samples=num_samples, rng=rng)

    @staticmethod
    def frames(label: str, plan: instruments.NotePlan, total_frames: int, size: int,
               rng: np.random.Generator, look: Look) -> np.ndarray:
        return instruments.render_frames(label, plan, total_frames=total_frames, size=size,
                                         rng=rng, look=look)

    @staticmethod
    def looks(palette_seed: int | None) -> dict[str, Look]:
        builtin = instruments.default_looks()
        return builtin if palette_seed is None else palette_looks(builtin, palette_seed)

    @staticmethod
    def details(plan: instruments.NotePlan) -> dict:
        return {"pitches": [list(p) for p in plan.pitches], "velocity": plan.velocity}


KINDS = {"shapes": ShapesKind, "instruments": InstrumentsKind}


# ----------------------------------------------------------------------------------------------
# Writing


def _clip_rows(info: DatasetInfo) -> pd.DataFrame:
    return pd.DataFrame([
        {
            "id": c.id, "split": c.split, "mode": c.mode, "label": c.label,
            "num_events": len(c.onsets), "onsets": _fmt_times(c.onsets),
            "durations": _fmt_times(c.durations), "caption": c.caption,
            "description": c.description, "audio_path": c.audio_path, "video_path": c.video_path,
        }
        for c in info.clips
    ])


def _fmt_times(times: Sequence[float]) -> str:
    return " ".join(f"{t:.4f}" for t in times)


def _write_manifests(info: DatasetInfo) -> None:
    root = info.root
    train = info.split("train")
    holdout = info.split("holdout")
    # label / onsets ride along for the feature report of extraction (features/report.py);
    # the encoders never see them.
    atomic_write_csv(pd.DataFrame(
        [{"id": c.id, "audio_path": c.audio_path, "video_path": c.video_path, "caption": c.caption,
          "label": c.label, "onsets": _fmt_times(c.onsets)} for c in train if c.has_video],
        columns=["id", "audio_path", "video_path", "caption", "label", "onsets"]), root / "train_vt2a.csv")
    atomic_write_csv(pd.DataFrame(
        [{"id": c.id, "audio_path": c.audio_path, "caption": c.caption, "label": c.label,
          "onsets": _fmt_times(c.onsets)} for c in train if not c.has_video],
        columns=["id", "audio_path", "caption", "label", "onsets"]), root / "train_t2a.csv")
    atomic_write_csv(pd.DataFrame(
        [{"id": c.id, "video_path": c.video_path if c.has_video else "", "caption": c.caption,
          "video_exist": int(c.has_video), "text_exist": int(c.has_text)} for c in holdout],
        columns=["id", "video_path", "caption", "video_exist", "text_exist"]),
        root / "holdout_infer.csv")
    atomic_write_csv(pd.DataFrame(
        [{"id": c.id, "audio_path": c.audio_path, "video_path": c.video_path,
          "caption": c.caption, "mode": c.mode, "label": c.label, "onsets": _fmt_times(c.onsets)}
         for c in holdout],
        columns=["id", "audio_path", "video_path", "caption", "mode", "label", "onsets"]),
        root / "holdout_reference.csv")
    atomic_write_csv(_clip_rows(info), root / "metadata.csv")
    payload = {
        "version": EVENTS_VERSION, "seed": info.seed, "sample_rate": info.sample_rate,
        "duration": info.duration, "fps": info.fps, "size": info.size, "classes": info.classes,
        "caption_split": info.caption_split, "palette_seed": info.palette_seed,
        "dataset": info.dataset, "clips": [asdict(c) for c in info.clips],
    }
    atomic_write_text(root / "events.json", json.dumps(payload, indent=1) + "\n")


def make_dataset(out_dir: str | Path, n: int, seed: int, duration: float = 2.0,
                 sample_rate: int = 16000, fps: int = 25, size: int = 96,
                 holdout_frac: float = 0.2, no_caption_frac: float = 0.15,
                 no_video_frac: float = 0.15, progress: bool = True, *,
                 classes: Sequence[str] | None = None, caption_split: str = "shared",
                 palette_seed: int | None = None, dataset: str = "shapes") -> DatasetInfo:
    """Write the data set (wavs, mp4s, CSVs, events.json) under `out_dir` and describe it.

    `dataset` picks the sound classes (DATASETS: the procedural sound events or the recorded
    instruments). `classes` (a subset of that set's class names, in this order),
    `caption_split` ("shared" or "heldout") and `palette_seed` vary the data (module
    docstring); the defaults give the built-in data set."""
    check_args(n, duration, sample_rate, fps, size, holdout_frac, no_caption_frac, no_video_frac)
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    kind = KINDS[dataset]
    class_list = check_classes(classes, dataset)
    if caption_split not in CAPTION_SPLITS:
        raise ConfigError(f"--caption-split must be one of {', '.join(CAPTION_SPLITS)}, "
                          f"got {caption_split!r}")
    root = Path(out_dir)
    split_of, labels, modes = _plan_clips(n, seed, holdout_frac, no_caption_frac, no_video_frac,
                                          class_list)
    looks = kind.looks(palette_seed)
    total_frames = int(round(duration * fps))
    num_samples = int(round(duration * sample_rate))
    info = DatasetInfo(root=root, seed=seed, sample_rate=sample_rate, duration=duration, fps=fps,
                       size=size, classes=class_list, caption_split=caption_split,
                       palette_seed=palette_seed, dataset=dataset)
    width = max(5, len(str(n - 1)))
    for i in tqdm(range(n), desc=f"{kind.name} data set", disable=not progress):
        rng = np.random.default_rng([seed, 1, i])  # per-clip stream: clip i is independent of n
        clip_id = f"clip_{i:0{width}d}"
        label = labels[i]
        plan = kind.plan(label, total_frames, fps, rng)
        description = kind.caption(label, plan, fps, rng, False)
        if caption_split == "heldout" and split_of[i] == "holdout":
            # drawn from a stream of its own, so the clip's sound and frames stay the shared ones
            description = kind.caption(label, plan, fps, np.random.default_rng([seed, 2, i]), True)
        wave = kind.audio(label, plan, fps, sample_rate, num_samples, rng)
        frames = kind.frames(label, plan, total_frames, size, rng, looks[label])
        audio_rel, video_rel = f"audio/{clip_id}.wav", f"video/{clip_id}.mp4"
        atomic_write_bytes(root / audio_rel, wav_bytes(wave, sample_rate))
        atomic_write_bytes(root / video_rel, mp4_bytes(frames, fps))
        count = len(plan.onset_frames)
        info.clips.append(ClipInfo(
            id=clip_id, split=split_of[i], mode=modes[i], label=label,
            onsets=[k / fps for k in plan.onset_frames],
            durations=[plan.duration_frames / fps] * count,
            onset_frames=list(plan.onset_frames), duration_frames=[plan.duration_frames] * count,
            caption="" if modes[i] == "V2A" else description, description=description,
            audio_path=audio_rel, video_path=video_rel, details=kind.details(plan),
        ))
    _write_manifests(info)
    return info


def check_classes(classes: Sequence[str] | None, dataset: str = "shapes") -> list[str]:
    """The classes to use: all of the data set's by default, else a subset of at least two
    known, distinct names."""
    known = KINDS[dataset].class_names
    if classes is None:
        return list(known)
    names = [str(c) for c in classes]
    for name in names:
        if name not in known:
            raise ConfigError(f"--classes: unknown class {name!r} of the {dataset} set; known classes: "
                              f"{', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--classes lists a class twice: {','.join(names)}")
    if len(names) < 2:
        raise ConfigError(f"--classes needs at least 2 classes (accuracy needs a choice), got "
                          f"{','.join(names) or 'none'}")
    return names


# What the checks below call each value: the command-line flags; the demo passes its config keys.
CLI_NAMES = {"n": "--n", "duration": "--duration", "sample_rate": "--sample-rate", "fps": "--fps",
             "size": "--size", "holdout_frac": "--holdout-frac", "no_caption_frac": "--no-caption-frac",
             "no_video_frac": "--no-video-frac"}


def check_args(n: int, duration: float, sample_rate: int, fps: int, size: int,
                *fracs: float, names: dict[str, str] = CLI_NAMES) -> None:
    if n < 1:
        raise ConfigError(f"{names['n']} must be >= 1, got {n}")
    if duration < 1.0:
        raise ConfigError(f"{names['duration']} must be >= 1.0 s (room for one event), got {duration}")
    if sample_rate < 8000:
        raise ConfigError(f"{names['sample_rate']} must be >= 8000 Hz, got {sample_rate}")
    if fps < 1 or size < 32 or size % 2:
        raise ConfigError(f"{names['fps']} must be >= 1 and {names['size']} an even number >= 32 (got {fps}, {size})")
    for key, frac in zip(("holdout_frac", "no_caption_frac", "no_video_frac"), fracs):
        if not 0.0 <= frac < 1.0:
            raise ConfigError(f"{names[key]} must be in [0, 1), got {frac}")


def load_dataset_info(reference: str | Path) -> DatasetInfo:
    """Read events.json (or the data set folder holding it) back into a DatasetInfo."""
    path = Path(reference)
    if path.is_dir():
        path = path / "events.json"
    if not path.is_file():
        raise ManifestError(f"demo metadata not found: {path} (expected events.json of a data set "
                            "made by wavflow.demo.make_dataset)")
    try:
        payload = json.loads(path.read_text())
        clips = [ClipInfo(**c) for c in payload["clips"]]
        return DatasetInfo(root=path.parent, seed=payload["seed"],
                           sample_rate=payload["sample_rate"], duration=payload["duration"],
                           fps=payload["fps"], size=payload["size"], classes=payload["classes"],
                           clips=clips,
                           # older events.json files predate the variations: the defaults
                           caption_split=payload.get("caption_split", "shared"),
                           palette_seed=payload.get("palette_seed"),
                           dataset=payload.get("dataset", "shapes"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path} is not a valid demo events.json ({type(exc).__name__}: {exc})"
                            ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("make_dataset", lambda: _make(argv))


def _make(argv: Sequence[str] | None) -> int:
    parser = JobArgumentParser(description=__doc__.split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (the data root)")
    parser.add_argument("--n", type=int, default=48, help="number of clips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per clip")
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--size", type=int, default=96, help="video frame width = height")
    parser.add_argument("--holdout-frac", type=float, default=0.2)
    parser.add_argument("--no-caption-frac", type=float, default=0.15, help="share of V2A clips")
    parser.add_argument("--no-video-frac", type=float, default=0.15, help="share of T2A clips")
    parser.add_argument("--dataset", choices=DATASETS, default="shapes",
                        help="shapes: procedural sound events; instruments: recorded instrument "
                             "samples from the General MIDI SoundFont in pretty_midi")
    parser.add_argument("--classes", default=None,
                        help=f"comma-separated subset of the set's classes (default: all; shapes: "
                             f"{','.join(CLASS_NAMES)}; instruments: "
                             f"{','.join(instruments.INSTRUMENT_NAMES)})")
    parser.add_argument("--caption-split", choices=CAPTION_SPLITS, default="shared",
                        help="heldout: holdout clips get wordings no training caption uses")
    parser.add_argument("--palette-seed", type=int, default=None,
                        help="give every class another colour and shape, drawn from this seed")
    args = parser.parse_args(argv)
    classes = None if args.classes is None else [c.strip() for c in args.classes.split(",") if c.strip()]
    info = make_dataset(args.out, args.n, args.seed, duration=args.duration,
                        sample_rate=args.sample_rate, fps=args.fps, size=args.size,
                        holdout_frac=args.holdout_frac, no_caption_frac=args.no_caption_frac,
                        no_video_frac=args.no_video_frac, classes=classes,
                        caption_split=args.caption_split, palette_seed=args.palette_seed,
                        dataset=args.dataset)
    counts = {m: sum(c.mode == m for c in info.clips) for m in MODES}
    print(f"wrote {len(info.clips)} clips to {info.root} "
          f"(train {len(info.split('train'))}, holdout {len(info.split('holdout'))}; "
          f"modes {counts}); set data.data_root={info.root.resolve()}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
