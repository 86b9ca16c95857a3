"""The sound-event classes of the demo data set: how each one sounds, looks and is described.

Every class has a distinct spectrum and envelope (so a tiny classifier can tell them apart), a
distinct on-screen shape and colour (so video conditioning carries the class and the timing),
and several caption templates that name it. Everything draws from a caller-supplied
`numpy.random.Generator`, so a clip is a pure function of its seed.

Variations for robustness checks: `heldout_templates` are wordings never used for training
captions (each keeps one of the class's `key_words`, so a bag-of-words text encoder can still
recognise the class), and `class_looks(palette_seed)` gives every class another colour and shape.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.signal import butter, sosfilt

from wavflow.errors import ConfigError

ATTACK_SEC = 0.003  # a sharp attack keeps the audio onset precise to a few milliseconds
LEAD_IN_FRAMES = 2  # silence before the first event, so its onset is a clear energy rise
MIN_GAP_SEC = 0.16  # between the end of one event and the start of the next
RELEASE_SEC = 0.015

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass(frozen=True)
class EventClass:
    name: str
    duration_sec: float  # how long the event sounds and its shape stays on screen
    colour: tuple[int, int, int]  # RGB of the on-screen shape
    shape: str
    templates: tuple[str, ...]  # caption templates; {count} = number word, {s} = plural suffix
    # wordings only held-out clips get (caption_split="heldout"); none of them is in `templates`
    heldout_templates: tuple[str, ...] = ()
    # words of `templates` that no other class's wording uses (checked down to CLIP BPE tokens in
    # tests): every held-out wording keeps one, so an unseen wording still names the class
    key_words: tuple[str, ...] = ()


EVENT_CLASSES: tuple[EventClass, ...] = (
    EventClass(
        "low_tone", 0.32, (40, 90, 255), "circle",
        ("a low hum", "a deep tone", "a low-pitched drone", "{count} deep tone{s}"),
        heldout_templates=("a low rumbling hum", "{count} deep drone{s}"),
        key_words=("low", "deep", "hum", "drone"),
    ),
    EventClass(
        "high_tone", 0.20, (255, 225, 0), "small_square",
        ("a high beep", "a high-pitched tone", "a shrill whistle", "{count} high beep{s}"),
        heldout_templates=("a piercing high whistle", "{count} shrill squeak{s}"),
        key_words=("high", "shrill", "whistle"),
    ),
    EventClass(
        "chirp", 0.40, (0, 220, 70), "triangle",
        ("a rising chirp", "an upward sweep", "a tone gliding upwards", "{count} rising chirp{s}"),
        heldout_templates=("a chirp climbing upward", "{count} swift rising sweep{s}"),
        key_words=("chirp", "rising", "sweep", "upward"),
    ),
    EventClass(
        "noise_burst", 0.24, (235, 235, 235), "noisy_blob",
        ("a burst of static", "a short hiss", "a crackle of white noise", "{count} burst{s} of static"),
        heldout_templates=("a blast of white noise", "{count} static crackle{s}"),
        key_words=("static", "white", "noise", "crackle", "burst"),
    ),
    EventClass(
        "clicks", 0.12, (255, 40, 40), "red_dots",
        ("{count} click{s}", "{count} sharp click{s}", "the sound of {count} click{s}"),
        heldout_templates=("{count} quick click{s}", "{count} crisp click{s}"),
        key_words=("click", "clicks", "sharp"),
    ),
    EventClass(
        "two_tone", 0.40, (230, 0, 230), "bar",
        ("a two-tone beep", "a two-note chime", "a doorbell-like ding-dong", "{count} two-tone beep{s}"),
        heldout_templates=("a cheerful doorbell chime", "{count} ding-dong chime{s}"),
        key_words=("doorbell", "dong", "chime", "note"),
    ),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in EVENT_CLASSES)
CLASS_BY_NAME: dict[str, EventClass] = {c.name: c for c in EVENT_CLASSES}


def make_caption(class_name: str, count: int, rng: np.random.Generator, *,
                 heldout: bool = False) -> str:
    """One caption naming the class; count-aware templates say how many events there are.
    `heldout` picks from the class's held-out wordings instead of the training ones."""
    cls = CLASS_BY_NAME[class_name]
    templates = cls.heldout_templates if heldout else cls.templates
    template = templates[int(rng.integers(len(templates)))]
    word = COUNT_WORDS.get(count, str(count))
    if count == 1:
        word = "a single"  # "a single click" reads better than "one click"
    return template.format(count=word, s="" if count == 1 else "s")


def spread_events(label: str, dur_frames: int, total_frames: int, fps: int,
                  rng: np.random.Generator) -> list[int]:
    """Onset frames of 1-3 non-overlapping events of `dur_frames` frames that fit in the clip
    (after LEAD_IN_FRAMES, MIN_GAP_SEC apart, ending before the last frame), at random places.
    Shared by every built-in data set, so their timing statistics are the same."""
    gap_frames = max(1, int(math.ceil(MIN_GAP_SEC * fps)))
    usable = total_frames - LEAD_IN_FRAMES - 1  # one trailing frame so events end inside
    if dur_frames > usable:
        raise ConfigError(
            f"clip duration {total_frames / fps:.2f}s is too short for a {label} event "
            f"({dur_frames / fps:.2f}s); use --duration of at least 1.0")
    count = int(rng.integers(1, 4))
    while count > 1 and count * dur_frames + (count - 1) * gap_frames > usable:
        count -= 1
    slack = usable - (count * dur_frames + (count - 1) * gap_frames)
    # split the slack into count+1 random parts: before, between and after the events
    cuts = np.sort(rng.integers(0, slack + 1, size=count))
    parts = np.diff(np.concatenate([[0], cuts]))
    onsets, pos = [], LEAD_IN_FRAMES
    for part in parts:
        pos += int(part)
        onsets.append(pos)
        pos += dur_frames + gap_frames
    return onsets


# ----------------------------------------------------------------------------------------------
# Audio


def _envelope(n: int, sr: int, *, decay_tau: float | None = None) -> np.ndarray:
    """Linear attack, then either a sustain + linear release, or an exponential decay."""
    t = np.arange(n) / sr
    env = np.minimum(1.0, t / ATTACK_SEC)
    if decay_tau is not None:
        env = env * np.exp(-np.maximum(t - ATTACK_SEC, 0.0) / decay_tau)
    release = max(1, int(RELEASE_SEC * sr))
    tail = np.linspace(1.0, 0.0, min(release, n))
    env[n - tail.size:] *= tail
    return env


def _tone(n: int, sr: int, freqs: list[float], weights: list[float]) -> np.ndarray:
    t = np.arange(n) / sr
    return sum(w * np.sin(2 * np.pi * f * t) for f, w in zip(freqs, weights))


def _low_tone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    return _tone(n, sr, [220.0, 440.0], [1.0, 0.25]) * _envelope(n, sr)


def _high_tone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    return _tone(n, sr, [1760.0], [1.0]) * _envelope(n, sr)


def _chirp(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    # exponential sweep 400 Hz -> 3200 Hz; phase is the integral of the instantaneous frequency
    t = np.arange(n) / sr
    dur = n / sr
    f0, f1 = 400.0, min(3200.0, 0.4 * sr)
    k = np.log(f1 / f0) / dur
    phase = 2 * np.pi * f0 * (np.exp(k * t) - 1.0) / k
    return np.sin(phase) * _envelope(n, sr)


def _noise_burst(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    low, high = 2000.0, min(5000.0, 0.45 * sr)
    sos = butter(4, [low, high], btype="bandpass", fs=sr, output="sos")
    noise = sosfilt(sos, rng.standard_normal(n + 256))[256:]  # drop the filter's start-up
    noise = noise / (np.max(np.abs(noise)) + 1e-12)
    return noise * _envelope(n, sr, decay_tau=0.08)


def _click(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    # one broadband transient: a few ms of decaying noise plus a damped 3 kHz ring
    t = np.arange(n) / sr
    env = np.exp(-t / 0.004)
    ring = np.sin(2 * np.pi * min(3000.0, 0.4 * sr) * t)
    click = (0.6 * rng.standard_normal(n) + 0.8 * ring) * env
    click[: max(1, int(0.0005 * sr))] *= np.linspace(0.3, 1.0, max(1, int(0.0005 * sr)))
    return click / (np.max(np.abs(click)) + 1e-12)


def _two_tone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    # two notes back to back with continuous phase, so the note change is no energy onset
    freq = np.where(np.arange(n) < n // 2, 660.0, 990.0)
    phase = 2 * np.pi * np.cumsum(freq) / sr
    return np.sin(phase) * _envelope(n, sr)


_SYNTH: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "low_tone": _low_tone,
    "high_tone": _high_tone,
    "chirp": _chirp,
    "noise_burst": _noise_burst,
    "clicks": _click,
    "two_tone": _two_tone,
}


def synthesize_event(class_name: str, num_samples: int, sample_rate: int,
                     rng: np.random.Generator) -> np.ndarray:
    """A unit-peak event of `num_samples` samples (float64), starting at its first sample."""
    wave = _SYNTH[class_name](num_samples, sample_rate, rng)
    return wave / (np.max(np.abs(wave)) + 1e-12)


# ----------------------------------------------------------------------------------------------
# Video


@dataclass(frozen=True)
class ShapePlacement:
    """Where and how big one event's shape is drawn (fixed for the event's whole duration)."""

    cx: float
    cy: float
    radius: float
    texture_seed: int


def place_shape(size: int, rng: np.random.Generator) -> ShapePlacement:
    radius = float(rng.uniform(0.16, 0.22) * size)
    margin = radius + 2
    cx = float(rng.uniform(margin, size - margin))
    cy = float(rng.uniform(margin, size - margin))
    return ShapePlacement(cx, cy, radius, int(rng.integers(2**31)))


def _shape_mask(shape: str, size: int, p: ShapePlacement) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy, r = xx - p.cx, yy - p.cy, p.radius
    if shape in ("circle", "noisy_blob"):
        return dx**2 + dy**2 <= r**2
    if shape == "small_square":
        return (np.abs(dx) <= 0.6 * r) & (np.abs(dy) <= 0.6 * r)
    if shape == "triangle":  # upward-pointing: apex at top, base at bottom
        inside_y = (dy >= -r) & (dy <= r)
        half_width = (dy + r) / 2.0
        return inside_y & (np.abs(dx) <= half_width)
    if shape == "red_dots":  # three small dots in a row
        mask = np.zeros((size, size), dtype=bool)
        for offset in (-0.7 * r, 0.0, 0.7 * r):
            mask |= (dx - offset) ** 2 + dy**2 <= (0.28 * r) ** 2
        return mask
    if shape == "bar":
        return (np.abs(dx) <= r) & (np.abs(dy) <= 0.35 * r)
    if shape == "ring":
        return ((dx**2 + dy**2) <= r**2) & ((dx**2 + dy**2) >= (0.55 * r) ** 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        return (((np.abs(dx) <= r) & (np.abs(dy) <= 0.3 * r))
                | ((np.abs(dy) <= r) & (np.abs(dx) <= 0.3 * r)))
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class Look:
    """How a class appears on screen."""

    colour: tuple[int, int, int]
    shape: str
    tinted: bool = False  # noisy_blob: static in `colour` instead of the default grey-white


def class_looks(palette_seed: int | None = None) -> dict[str, Look]:
    """Each class's look: the built-in colours and shapes, or (with a seed) other ones
    (`palette_looks`)."""
    builtin = {c.name: Look(c.colour, c.shape) for c in EVENT_CLASSES}
    return builtin if palette_seed is None else palette_looks(builtin, palette_seed)


def palette_looks(builtin: dict[str, Look], palette_seed: int) -> dict[str, Look]:
    """Other colours and shapes for the classes of `builtin`, drawn from `palette_seed`.

    Evenly spaced hues (random offset, randomly assigned to the classes) with high saturation
    and value, so colours stay far apart and far above the near-black background that the tiny
    CLIP vision tower ignores; the built-in shapes are permuted among the classes. The palette
    covers all classes, so a class looks the same whichever subset a data set uses."""
    rng = np.random.default_rng([palette_seed, 17])
    names = list(builtin)
    k = len(names)
    hues = (rng.uniform(0.0, 1.0) + np.arange(k) / k) % 1.0
    hue_order, shape_order = rng.permutation(k), rng.permutation(k)
    looks = {}
    for i, name in enumerate(names):
        sat, val = rng.uniform(0.75, 0.95), rng.uniform(0.9, 1.0)
        rgb = colorsys.hsv_to_rgb(float(hues[hue_order[i]]), float(sat), float(val))
        r, g, b = (int(round(255 * x)) for x in rgb)
        looks[name] = Look((r, g, b), builtin[names[shape_order[i]]].shape, tinted=True)
    return looks


def draw_event(frame: np.ndarray, class_name: str, placement: ShapePlacement,
               look: Look | None = None) -> None:
    """Paint the class's shape into an RGB uint8 frame (in place); `look` overrides the class's."""
    if look is None:
        cls = CLASS_BY_NAME[class_name]
        look = Look(cls.colour, cls.shape)
    mask = _shape_mask(look.shape, frame.shape[0], placement)
    if look.shape == "noisy_blob":
        # static inside the blob; texture fixed per event so frames are reproducible
        tex = np.random.default_rng(placement.texture_seed).integers(150, 256, size=mask.shape)
        if look.tinted:
            pixels = tex[mask][:, None] / 255.0 * np.asarray(look.colour, dtype=np.float64)
            frame[mask] = np.round(pixels).astype(np.uint8)
        else:
            frame[mask] = np.repeat(tex[mask][:, None], 3, axis=1).astype(np.uint8)
    else:
        frame[mask] = np.asarray(look.colour, dtype=np.uint8)


BACKGROUND_RGB = (14, 14, 22)


def blank_frame(size: int) -> np.ndarray:
    frame = np.empty((size, size, 3), dtype=np.uint8)
    frame[:] = np.asarray(BACKGROUND_RGB, dtype=np.uint8)
    return frame
