"""Render notes from the General MIDI SoundFont that ships inside the `pretty_midi` wheel.

The SoundFont (`TimGM6mb.sf2`, GPL-2.0, see NOTICE.txt) is read from the installed package at
run time and never copied into the repository. The synthesiser is TinySoundFont through the
`tinysoundfont` bindings (MIT): a manylinux wheel with no system library, ~13 ms per second of
16 kHz audio on one core (scripts/bench/soundfont_render.py compares it with FluidSynth).
`tinysoundfont` declares `pyaudio` for live playback, which offline rendering never uses and
which does not build without PortAudio headers, so it is installed with `pip install --no-deps`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from wavflow.errors import ConfigError

SOUNDFONT_NAME = "TimGM6mb.sf2"
SOUNDFONT_PACKAGE = "pretty_midi"
DRUM_BANK = 128  # General MIDI percussion lives in bank 128 of a SoundFont


class SoundFontMissingError(ConfigError):
    """The SoundFont package or the synthesiser is not installed."""


@dataclass(frozen=True)
class Note:
    """One note: MIDI pitch (a drum kit piece for percussion), velocity 1-127, times in seconds."""

    pitch: int
    velocity: int
    start: float
    end: float


def soundfont_path() -> Path:
    """Where the installed `pretty_midi` keeps TimGM6mb.sf2 (the package is not imported)."""
    spec = importlib.util.find_spec(SOUNDFONT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SoundFontMissingError(
            f"the instruments data set renders {SOUNDFONT_NAME}, which ships inside the "
            f"'{SOUNDFONT_PACKAGE}' package; install it with `pip install {SOUNDFONT_PACKAGE}` "
            "(scripts/setup.sh does)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SOUNDFONT_NAME
        if path.is_file():
            return path
    raise SoundFontMissingError(
        f"{SOUNDFONT_NAME} is not in the installed '{SOUNDFONT_PACKAGE}' package "
        f"({', '.join(spec.submodule_search_locations)}); reinstall it with "
        f"`pip install --force-reinstall {SOUNDFONT_PACKAGE}`")


def _import_synth():
    try:
        # optional package (pip install --no-deps tinysoundfont); only the instruments data set needs it
        import tinysoundfont
    except ImportError as exc:
        raise SoundFontMissingError(
            "the instruments data set needs the SoundFont synthesiser 'tinysoundfont'; install it "
            "with `pip install --no-deps tinysoundfont` (its pyaudio dependency is only for live "
            f"playback; scripts/setup.sh installs it this way): {exc}") from exc
    return tinysoundfont


@lru_cache(maxsize=1)
def _soundfont_bytes() -> bytes:
    return soundfont_path().read_bytes()


def render_notes(notes: Sequence[Note], *, program: int, drums: bool, sample_rate: int,
                 num_samples: int) -> np.ndarray:
    """Mono float64 waveform of `notes` played by one General MIDI program (or the drum kit).

    A fresh synthesiser per call, so a clip depends only on its notes (no voice state carries
    over between clips); note-on/off events land on their exact sample. Stereo output is
    averaged to mono."""
    tsf = _import_synth()
    synth = tsf.Synth(samplerate=sample_rate)
    sfid = synth.sfload(_soundfont_bytes())
    synth.program_select(0, sfid, DRUM_BANK if drums else 0, 0 if drums else program,
                         is_drums=drums)
    events = sorted([(int(round(n.start * sample_rate)), 1, n) for n in notes]
                    + [(int(round(n.end * sample_rate)), 0, n) for n in notes],
                    key=lambda e: (e[0], e[1]))  # at one sample, note-offs before note-ons
    out = np.zeros((num_samples, 2), dtype=np.float32)
    pos = 0
    for sample, is_on, note in events:
        sample = min(sample, num_samples)
        if sample > pos:
            out[pos:sample] = np.frombuffer(synth.generate(sample - pos), np.float32).reshape(-1, 2)
            pos = sample
        if is_on:
            synth.noteon(0, note.pitch, note.velocity)
        else:
            synth.noteoff(0, note.pitch)
    if pos < num_samples:
        out[pos:] = np.frombuffer(synth.generate(num_samples - pos), np.float32).reshape(-1, 2)
    return out.astype(np.float64).mean(axis=1)
