"""Compare SoundFont synthesisers for the instruments data set: render speed and fidelity.

    python scripts/bench/soundfont_render.py [--sample-rate 16000] [--repeats 3] [--out JSON]

Renders every instrument of wavflow/demo/instruments.py (a 0.5 s note at three pitches) from
TimGM6mb.sf2 with each synthesiser that is installed:

- tinysoundfont (the one the data set uses; pip install --no-deps tinysoundfont)
- FluidSynth through pyfluidsynth (needs the system library: apt-get install libfluidsynth3)

each straight at --sample-rate and at 44.1 kHz resampled to --sample-rate with a polyphase
anti-aliasing filter (the band-limited reference). It prints, in one run:

- speed: seconds of audio rendered per second of wall time (one thread), including the
  SoundFont load the data set pays per clip;
- aliasing: log-mel RMS difference (dB, 40 dB range below each clip's peak) between the
  direct rendering and the band-limited one of the same synthesiser;
- pitch: the error (cents) of the strongest spectral peak's nearest harmonic against the MIDI
  pitch, median over the pitched notes;
- agreement: log-mel RMS difference between the two synthesisers' band-limited renderings.
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction
from pathlib import Path
import sys

import numpy as np
from scipy.signal import resample_poly

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from wavflow.demo import soundfont  # noqa: E402
from wavflow.demo.instruments import INSTRUMENTS  # noqa: E402
from wavflow.demo.metrics import log_mel  # noqa: E402

HIGH_RATE = 44100
NOTE_SEC, CLIP_SEC = 0.5, 1.0


def render_tinysoundfont(program: int, drums: bool, pitch: int, sr: int) -> np.ndarray:
    note = soundfont.Note(pitch, 100, 0.1, 0.1 + NOTE_SEC)
    return soundfont.render_notes([note], program=program, drums=drums, sample_rate=sr,
                                  num_samples=int(CLIP_SEC * sr))


def render_fluidsynth(program: int, drums: bool, pitch: int, sr: int) -> np.ndarray:
    import fluidsynth  # pyfluidsynth

    synth = fluidsynth.Synth(samplerate=float(sr))
    sfid = synth.sfload(str(soundfont.soundfont_path()))
    channel = 9 if drums else 0
    synth.program_select(channel, sfid, soundfont.DRUM_BANK if drums else 0, 0 if drums else program)
    pre, held = int(0.1 * sr), int(NOTE_SEC * sr)
    parts = [synth.get_samples(pre)]
    synth.noteon(channel, pitch, 100)
    parts.append(synth.get_samples(held))
    synth.noteoff(channel, pitch)
    parts.append(synth.get_samples(int(CLIP_SEC * sr) - pre - held))
    synth.delete()
    stereo = np.concatenate(parts).astype(np.float64).reshape(-1, 2) / 32768.0
    return stereo.mean(axis=1)


def _available() -> dict:
    synths = {"tinysoundfont": render_tinysoundfont}
    try:
        import fluidsynth  # noqa: F401

        fluidsynth.Synth().delete()
        synths["fluidsynth"] = render_fluidsynth
    except Exception as exc:  # the module or its system library is missing
        print(f"FluidSynth not measured: {type(exc).__name__}: {exc}")
    return synths


def _logmel_db(wave: np.ndarray, sr: int) -> np.ndarray:
    lm = log_mel(wave, sr)
    return np.maximum(lm - lm.max(), -40.0)


def _pitch_cents(wave: np.ndarray, sr: int, pitch: int) -> float:
    seg = wave[int(0.15 * sr):int(0.55 * sr)]
    spec = np.abs(np.fft.rfft(seg * np.hanning(seg.size), n=1 << 16))
    freqs = np.fft.rfftfreq(1 << 16, 1.0 / sr)
    peak = freqs[int(np.argmax(spec[1:])) + 1]
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    harmonic = max(1, int(round(peak / f0)))
    return float(1200 * np.log2(peak / (harmonic * f0)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample-rate", type=int, default=16000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    sr = args.sample_rate
    ratio = Fraction(sr, HIGH_RATE)
    report: dict = {"sample_rate": sr, "synths": {}}
    limited: dict[str, dict] = {}
    for name, render in _available().items():
        speed, alias, cents, limited[name] = [], [], [], {}
        for inst in INSTRUMENTS:
            for pitch in (inst.pitches[0], inst.pitches[len(inst.pitches) // 2], inst.pitches[-1]):
                start = time.perf_counter()
                for _ in range(args.repeats):
                    direct = render(inst.program, inst.drums, pitch, sr)
                speed.append(CLIP_SEC * args.repeats / (time.perf_counter() - start))
                band = resample_poly(render(inst.program, inst.drums, pitch, HIGH_RATE),
                                     ratio.numerator, ratio.denominator)[: direct.size]
                limited[name][(inst.name, pitch)] = band
                diff = _logmel_db(direct, sr) - _logmel_db(band, sr)
                alias.append(float(np.sqrt(np.mean(diff**2))))
                if not inst.drums:
                    cents.append(abs(_pitch_cents(band, sr, pitch)))
        report["synths"][name] = {
            "audio_seconds_per_wall_second": float(np.median(speed)),
            "aliasing_logmel_db": float(np.median(alias)),
            "pitch_error_cents_median": float(np.median(cents)),
        }
        print(f"{name:14s} speed {np.median(speed):7.1f}x real time   aliasing {np.median(alias):5.2f} dB   "
              f"pitch error {np.median(cents):5.1f} cents")
    if len(limited) == 2:
        a, b = limited.values()
        agree = [float(np.sqrt(np.mean((_logmel_db(a[k], sr) - _logmel_db(b[k], sr)) ** 2))) for k in a]
        report["agreement_logmel_db"] = float(np.median(agree))
        names = list(limited)
        speed_ratio = (report["synths"][names[0]]["audio_seconds_per_wall_second"]
                       / report["synths"][names[1]]["audio_seconds_per_wall_second"])
        report["speed_ratio"] = {f"{names[0]}/{names[1]}": speed_ratio}
        print(f"agreement between the two (band-limited, log-mel RMS): {np.median(agree):.2f} dB; "
              f"speed {names[0]}/{names[1]} = {speed_ratio:.2f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
