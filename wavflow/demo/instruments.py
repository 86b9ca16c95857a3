"""The instrument classes of the `instruments` data set: recorded samples, pictures and captions.

Every clip is 1-3 notes (or drum hits) of one General MIDI instrument rendered from the
SoundFont in `pretty_midi` (soundfont.py), with pitch, velocity and note length drawn per clip,
played in a small synthetic room over a quiet room tone. On screen each instrument is a picture
of its own (shape, colour, place): dim while it is silent, lit from the exact frame a note
starts until the frame it ends. Captions name the instrument, how many notes it plays and
often how (soft, loud, short, long); `heldout_templates` are wordings only held-out clips get.

Everything draws from a caller-supplied `numpy.random.Generator`, so a clip is a pure function
of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, fftconvolve, sosfilt

from wavflow.demo.soundfont import Note, render_notes
from wavflow.demo.sound_events import (COUNT_WORDS, Look, ShapePlacement, blank_frame, draw_event,
                                       spread_events)

ROOM_TONE_RMS = 0.0056  # -45 dBFS of low-passed noise: the room's noise floor
ROOM_RT60_SEC = 0.25  # reverberation time of the synthetic room
ROOM_WET_GAIN = 0.2  # reverberant part relative to the dry sound (-14 dB)
PEAK_AT_FULL_VELOCITY = 0.8  # a velocity-127 clip peaks here; softer clips scale down with it
IDLE_BRIGHTNESS = 0.3  # the picture's brightness while its instrument is silent
SOFT_VELOCITY, LOUD_VELOCITY = 70, 105  # caption words "soft" below, "loud" above
SHORT_SEC, LONG_SEC = 0.22, 0.40  # caption words "short" below, "long" above


@dataclass(frozen=True)
class Instrument:
    name: str
    program: int  # General MIDI program, 0-based (ignored for the drum kit)
    drums: bool
    pitches: tuple[int, ...]  # the clip's pitch (or kit piece) is drawn from these
    note_sec: tuple[float, float]  # the clip's note length is drawn from this range
    chord: bool  # plays major/minor triads instead of single notes
    noun: str  # what one event is called in captions: note, chord, hit
    colour: tuple[int, int, int]
    shape: str  # a shape of sound_events._shape_mask
    place: tuple[float, float]  # centre of the picture as fractions of the frame (x, y)
    templates: tuple[str, ...]  # {count} number word, {adj} "soft " / "" ..., {noun}, {s}
    heldout_templates: tuple[str, ...]
    # words of `templates` that no other instrument's captions use; every held-out wording keeps one
    key_words: tuple[str, ...]


# kick, snare, hand clap, low tom, high-mid tom. No cymbals or hi-hats: General MIDI drums
# ignore note-off, and a ringing crash masks the onset of a quiet hi-hat after it.
_KIT = (36, 38, 39, 45, 48)

INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument(
        "piano", 0, False, tuple(range(48, 68)), (0.25, 0.5), True, "chord",
        (250, 250, 250), "bar", (0.25, 0.25),
        ("{count} {adj}piano {noun}{s}", "a piano plays {count} {adj}{noun}{s}",
         "someone plays {count} {adj}{noun}{s} on the piano"),
        ("{count} {adj}{noun}{s} struck on a grand piano", "a piano player strikes {count} {adj}{noun}{s}"),
        ("piano",),
    ),
    Instrument(
        "guitar", 24, False, tuple(range(45, 65)), (0.2, 0.4), False, "note",
        (255, 150, 30), "triangle", (0.5, 0.25),
        ("a guitar plucks {count} {adj}{noun}{s}", "{count} {adj}plucked guitar {noun}{s}",
         "an acoustic guitar plays {count} {adj}{noun}{s}"),
        ("{count} {adj}{noun}{s} picked on a nylon-string guitar", "a guitarist plucks {count} {adj}{noun}{s}"),
        ("guitar", "plucks", "plucked"),
    ),
    Instrument(
        "violin", 40, False, tuple(range(60, 80)), (0.3, 0.55), False, "note",
        (200, 30, 30), "circle", (0.75, 0.25),
        ("a violin plays {count} {adj}{noun}{s}", "{count} {adj}bowed violin {noun}{s}",
         "a fiddle bows {count} {adj}{noun}{s}"),
        ("{count} {adj}{noun}{s} drawn with a bow on a violin", "a violinist bows {count} {adj}{noun}{s}"),
        ("violin", "bowed", "fiddle", "bows"),
    ),
    Instrument(
        "trumpet", 56, False, tuple(range(58, 75)), (0.2, 0.45), False, "note",
        (255, 220, 0), "small_square", (0.25, 0.5),
        ("a trumpet plays {count} {adj}{noun}{s}", "{count} {adj}trumpet {noun}{s}",
         "a brass trumpet blows {count} {adj}{noun}{s}"),
        ("{count} {adj}{noun}{s} blasted on a trumpet", "a trumpet player sounds {count} {adj}{noun}{s}"),
        ("trumpet", "brass", "blows"),
    ),
    Instrument(
        "flute", 73, False, tuple(range(72, 89)), (0.25, 0.5), False, "note",
        (80, 200, 255), "ring", (0.75, 0.5),
        ("a flute plays {count} {adj}{noun}{s}", "{count} {adj}flute {noun}{s}",
         "someone whistles {count} {adj}{noun}{s} on a flute"),
        ("{count} {adj}airy {noun}{s} from a flute", "a flute player breathes {count} {adj}{noun}{s}"),
        ("flute", "whistles"),
    ),
    Instrument(
        "organ", 16, False, tuple(range(48, 68)), (0.25, 0.5), False, "note",
        (170, 60, 255), "diamond", (0.25, 0.75),
        ("an organ plays {count} {adj}{noun}{s}", "{count} {adj}organ {noun}{s}",
         "an electric organ holds {count} {adj}{noun}{s}"),
        ("{count} {adj}{noun}{s} on a drawbar organ", "an organ player holds {count} {adj}{noun}{s}"),
        ("organ", "electric"),
    ),
    Instrument(
        "marimba", 12, False, tuple(range(60, 80)), (0.15, 0.3), False, "note",
        (140, 90, 40), "cross", (0.5, 0.75),
        ("a marimba plays {count} {adj}{noun}{s}", "{count} {adj}marimba {noun}{s}",
         "wooden mallets strike {count} {adj}marimba {noun}{s}"),
        ("{count} {adj}{noun}{s} tapped on a wooden marimba", "a marimba player taps {count} {adj}{noun}{s}"),
        ("marimba", "mallets", "wooden"),
    ),
    Instrument(
        "drums", 0, True, _KIT, (0.1, 0.2), False, "hit",
        (40, 230, 90), "noisy_blob", (0.75, 0.75),
        ("a drum kit plays {count} {adj}{noun}{s}", "{count} {adj}drum {noun}{s}",
         "a drummer plays {count} {adj}{noun}{s}"),
        ("{count} {adj}{noun}{s} on a drum set", "someone bangs {count} {adj}drum {noun}{s}"),
        ("drum", "drummer", "kit"),
    ),
)
INSTRUMENT_NAMES: tuple[str, ...] = tuple(i.name for i in INSTRUMENTS)
INSTRUMENT_BY_NAME: dict[str, Instrument] = {i.name: i for i in INSTRUMENTS}


@dataclass(frozen=True)
class NotePlan:
    """What one clip plays: note-on frames, the note length (frames), pitches and velocity."""

    onset_frames: list[int]
    duration_frames: int
    pitches: list[tuple[int, ...]]  # per note: one pitch, or the three of a chord
    velocity: int


def plan_notes(label: str, total_frames: int, fps: int, rng: np.random.Generator) -> NotePlan:
    """1-3 non-overlapping notes on the frame grid, with the clip's length, pitch and velocity."""
    inst = INSTRUMENT_BY_NAME[label]
    dur_frames = max(1, int(round(rng.uniform(*inst.note_sec) * fps)))
    onsets = spread_events(label, dur_frames, total_frames, fps, rng)
    velocity = int(rng.integers(50, 128))
    pitches = []
    for _ in onsets:
        root = int(inst.pitches[int(rng.integers(len(inst.pitches)))])
        if inst.chord:
            third = 4 if rng.random() < 0.5 else 3  # major or minor triad
            pitches.append((root, root + third, root + 7))
        else:
            pitches.append((root,))
    return NotePlan(onsets, dur_frames, pitches, velocity)


def make_caption(label: str, plan: NotePlan, fps: int, rng: np.random.Generator, *,
                 heldout: bool = False) -> str:
    """A caption naming the instrument and the number of notes, often with how they sound."""
    inst = INSTRUMENT_BY_NAME[label]
    templates = inst.heldout_templates if heldout else inst.templates
    template = templates[int(rng.integers(len(templates)))]
    count = len(plan.onset_frames)
    adjectives = [""]
    if plan.velocity < SOFT_VELOCITY:
        adjectives.append("soft ")
    elif plan.velocity > LOUD_VELOCITY:
        adjectives.append("loud ")
    note_sec = plan.duration_frames / fps
    if note_sec < SHORT_SEC:
        adjectives.append("short ")
    elif note_sec > LONG_SEC:
        adjectives.append("long ")
    adj = adjectives[int(rng.integers(len(adjectives)))]
    word = "a single" if count == 1 else COUNT_WORDS.get(count, str(count))
    return template.format(count=word, adj=adj, noun=inst.noun, s="" if count == 1 else "s")


# ----------------------------------------------------------------------------------------------
# Audio


def _room_response(sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Impulse response of a small room: the direct sound plus exponentially decaying noise."""
    n = int(ROOM_RT60_SEC * sample_rate)
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / ROOM_RT60_SEC)  # -60 dB at RT60
    tail[: int(0.005 * sample_rate)] = 0.0  # first reflections after 5 ms
    tail *= ROOM_WET_GAIN / (np.sqrt(np.sum(tail**2)) + 1e-12)
    tail[0] = 1.0
    return tail


def _room_tone(num_samples: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    sos = butter(2, min(2000.0, 0.45 * sample_rate), btype="lowpass", fs=sample_rate, output="sos")
    noise = sosfilt(sos, rng.standard_normal(num_samples + 512))[512:]
    return noise * (ROOM_TONE_RMS / (np.sqrt(np.mean(noise**2)) + 1e-12))


def render_audio(label: str, plan: NotePlan, *, fps: int, sample_rate: int, num_samples: int,
                 rng: np.random.Generator) -> np.ndarray:
    """The clip's waveform (float64): the notes in the room, peak set by velocity, room tone."""
    inst = INSTRUMENT_BY_NAME[label]
    notes = [Note(p, plan.velocity, onset / fps, (onset + plan.duration_frames) / fps)
             for onset, chord in zip(plan.onset_frames, plan.pitches) for p in chord]
    dry = render_notes(notes, program=inst.program, drums=inst.drums, sample_rate=sample_rate,
                       num_samples=num_samples)
    wet = fftconvolve(dry, _room_response(sample_rate, rng))[:num_samples]
    peak = float(np.max(np.abs(wet)))
    if peak <= 0.0:
        raise RuntimeError(f"{label}: the SoundFont rendered silence for {notes}")
    wet *= PEAK_AT_FULL_VELOCITY * (plan.velocity / 127.0) / peak
    return wet + _room_tone(num_samples, sample_rate, rng)


# ----------------------------------------------------------------------------------------------
# Video


def default_looks() -> dict[str, Look]:
    return {i.name: Look(i.colour, i.shape) for i in INSTRUMENTS}


def render_frames(label: str, plan: NotePlan, *, total_frames: int, size: int,
                  rng: np.random.Generator, look: Look | None = None) -> np.ndarray:
    """(T, size, size, 3) uint8 frames: the instrument's picture at its place, dim while silent
    and lit from the frame a note starts to the frame it ends."""
    inst = INSTRUMENT_BY_NAME[label]
    look = look or Look(inst.colour, inst.shape)
    radius = float(rng.uniform(0.13, 0.16) * size)
    jitter = rng.uniform(-0.04, 0.04, size=2) * size
    placement = ShapePlacement(inst.place[0] * size + float(jitter[0]),
                               inst.place[1] * size + float(jitter[1]), radius,
                               int(rng.integers(2**31)))
    lit = blank_frame(size)
    draw_event(lit, label, placement, look)
    background = blank_frame(size).astype(np.float64)
    idle = background + IDLE_BRIGHTNESS * (lit - background)  # the background stays as it is
    frames = np.repeat(np.round(idle).astype(np.uint8)[None], total_frames, axis=0)
    for onset in plan.onset_frames:
        frames[onset:min(onset + plan.duration_frames, total_frames)] = lit
    return frames
