"""Audio I/O and the waveform pipeline: read any audio, mono, resample, amplitude lifting,
patchify/unpatchify, atomic wav writing and loudness normalisation.

Spec: docs/method.md §4 (the training audio pipeline, steps 1-10) and §5 (the save step).
Reading goes through soundfile (wav/flac/ogg/mp3/...); containers (mp4, mkv, ...) and files
soundfile cannot open are decoded with PyAV. Resampling uses torchaudio.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import Tensor

from wavflow.errors import AudioError
from wavflow.io_utils import atomic_write_bytes
from wavflow.shapes import latent_seq_len

# Suffixes soundfile cannot read: decode the audio stream with PyAV straight away.
CONTAINER_SUFFIXES = frozenset({".mp4", ".mkv", ".webm", ".mov", ".m4a", ".aac", ".avi"})

RMS_TARGET = 0.33  # docs/method.md §4 step 5
MIN_RMS_FOR_PEAK_SCALE = 0.3  # docs/method.md §4 step 6
SILENCE_RMS = 1e-8  # below this the RMS normalisation is skipped (docs/method.md §4 step 5)
LOUDNESS_FLOOR_LUFS = -70.0  # docs/method.md §5: quieter clips are not gain-normalised
PEAK_LIMIT = 0.99  # docs/method.md §5: peak after normalisation when it went above 1


# ----------------------------------------------------------------------------- reading


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    """(channels, samples) float32 and the sample rate, via libsndfile."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), int(sr)


def _open_audio_container(path: Path, before: str = "") -> Any:
    """`path` opened by PyAV, holding at least one audio stream (AudioError naming it otherwise).
    `before` prefixes the reason (what libsndfile said first)."""
    import av  # imported lazily: only containers need it

    try:
        container = av.open(str(path))
    except Exception as exc:  # PyAV raises several error kinds for foreign files
        raise AudioError(f"audio file {path} could not be opened ({before}{type(exc).__name__}: {exc})") from exc
    if not container.streams.audio:
        container.close()
        raise AudioError(f"audio file {path} has no audio stream")
    return container


def _read_pyav(path: Path) -> tuple[np.ndarray, int]:
    """(channels, samples) float32 and the sample rate of the first audio stream, via PyAV."""
    import av  # imported lazily: only containers need it

    container = _open_audio_container(path)
    with container:
        stream = container.streams.audio[0]
        # Convert every frame to planar float32, keeping the layout and rate of the stream.
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        sr = stream.codec_context.sample_rate or stream.rate
        try:
            for frame in container.decode(stream):
                sr = frame.sample_rate or sr
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        except Exception as exc:
            raise AudioError(
                f"audio stream of {path} could not be decoded ({type(exc).__name__}: {exc})"
            ) from exc
    if not chunks or not sr:
        raise AudioError(f"audio file {path} holds no audio samples (zero length)")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), int(sr)


def load_audio(path: str | os.PathLike, target_sr: int) -> Tensor:
    """Read `path` as mono float32 (T,) at `target_sr` (docs/method.md §4 steps 1-4).

    Channels are averaged; a differing rate is resampled with `torchaudio.transforms.Resample`
    (default parameters, as the reference does). Raises `AudioError` naming the file when it
    is missing, unreadable, has no audio stream, is empty or non-finite.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    if path.suffix.lower() in CONTAINER_SUFFIXES:
        data, sr = _read_pyav(path)
    else:
        try:
            data, sr = _read_soundfile(path)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_exc:
            try:
                data, sr = _read_pyav(path)
            except AudioError as av_exc:
                raise AudioError(
                    f"audio file {path} could not be read: soundfile said "
                    f"'{sf_exc}', PyAV said '{av_exc}'"
                ) from av_exc
    if data.size == 0 or data.shape[-1] == 0:
        raise AudioError(f"audio file {path} holds no audio samples (zero length)")
    if not np.isfinite(data).all():
        raise AudioError(f"audio file {path} holds NaN or Inf samples")
    wave = torch.from_numpy(data).mean(dim=0)  # (T,) mono
    if sr != target_sr:
        wave = _resampler(int(sr), int(target_sr))(wave.to(torch.float32))
    return wave.reshape(-1).to(torch.float32)


def probe_audio(path: str | os.PathLike) -> None:
    """Raise `AudioError` naming `path` unless it opens as audio that holds at least one sample.

    Cheap, for checking many files before a job counts them as usable: libsndfile reads the
    header only; a container (or a file libsndfile cannot open) is decoded by PyAV up to its
    first audio frame.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    sf_problem = "a container format"
    if path.suffix.lower() not in CONTAINER_SUFFIXES:
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            sf_problem = f"soundfile said '{exc}'"
        else:
            if info.frames <= 0:
                raise AudioError(f"audio file {path} holds no audio samples (zero length)")
            return
    container = _open_audio_container(path, f"{sf_problem}; PyAV: ")
    with container:
        try:
            for frame in container.decode(container.streams.audio[0]):
                if frame.samples > 0:
                    return
        except Exception as exc:
            raise AudioError(f"audio stream of {path} could not be decoded ({type(exc).__name__}: {exc})") from exc
    raise AudioError(f"audio file {path} holds no audio samples (zero length)")


@functools.lru_cache(maxsize=16)
def _resampler(orig_sr: int, target_sr: int) -> torch.nn.Module:
    """`torchaudio.transforms.Resample` with default parameters, as the reference data set uses.

    Not `torchaudio.functional.resample`: the transform builds its sinc kernel in float64
    before casting, which differs from the functional form by ~1e-5.
    """
    return torchaudio.transforms.Resample(orig_sr, target_sr)


# ----------------------------------------------------------------------------- lifting


def amplitude_lift(
    w: Tensor,
    *,
    rms_target: float = RMS_TARGET,
    min_rms_for_peak_scale: float = MIN_RMS_FOR_PEAK_SCALE,
) -> Tensor:
    """docs/method.md §4 steps 5-7 on the whole clip (before any crop).

    5. rms = sqrt(mean(w^2)); if rms > 1e-8: w = w * 0.33 / rms.
    6. rms2, peak = sqrt(mean(w^2)), max|w|; if peak > 1 with s = 1/peak and rms2*s > 0.3:
       w = w * s (otherwise w is left unscaled and the clamp below limits it).
    7. clamp to [-1, 1].
    Silence (rms <= 1e-8) passes through unscaled (zeros stay zeros, no NaN).
    """
    if w.numel() == 0:
        return w.clone()
    rms = torch.sqrt(torch.mean(w**2))
    if rms > SILENCE_RMS:
        w = w * rms_target / rms
    rms2 = torch.sqrt(torch.mean(w**2))
    peak = torch.max(torch.abs(w))
    if peak > 1.0:
        s = 1 / peak
        if rms2 * s > min_rms_for_peak_scale:
            w = w * s
    return torch.clamp(w, -1.0, 1.0)


def crop_or_pad(w: Tensor, num_samples: int) -> Tensor:
    """Keep samples [0, num_samples) of the last dim, zero-padding at the end (no random crop)."""
    length = w.shape[-1]
    if length >= num_samples:
        return w[..., :num_samples]
    return torch.nn.functional.pad(w, (0, num_samples - length))


def patchify(w: Tensor, audio_dim: int = 200) -> Tensor:
    """(T,) -> (T/audio_dim, audio_dim): token k holds samples audio_dim*k .. audio_dim*k+audio_dim-1."""
    if w.ndim != 1:
        raise ValueError(f"patchify expects a 1-D waveform, got shape {tuple(w.shape)}")
    if w.shape[0] % audio_dim != 0:
        raise ValueError(
            f"waveform length {w.shape[0]} is not a multiple of audio_dim={audio_dim}; "
            "crop_or_pad it to N*audio_dim first"
        )
    return w.reshape(-1, audio_dim)


def unpatchify(tokens: Tensor) -> Tensor:
    """(N, D) -> (N*D,) and (B, N, D) -> (B, N*D)."""
    if tokens.ndim == 2:
        return tokens.reshape(-1)
    if tokens.ndim == 3:
        return tokens.reshape(tokens.shape[0], -1)
    raise ValueError(f"unpatchify expects (N, D) or (B, N, D) tokens, got shape {tuple(tokens.shape)}")


def load_audio_tokens(
    path: str | os.PathLike,
    sample_rate: int,
    duration: float,
    audio_dim: int = 200,
    audio_scale: float = 3.0,
) -> Tensor:
    """The training target x1 (N, audio_dim): load -> lift -> crop/pad -> patchify -> x scale.

    N = `wavflow.shapes.latent_seq_len(sample_rate, duration, audio_dim)`. All-silent audio
    (RMS <= 1e-8 over the whole file) raises `AudioError`: the reference would keep it as an
    all-zero target, which teaches the model nothing useful for a "sound" caption and is
    almost always a broken file; the data set treats the error like any unreadable sample.
    """
    return lift_to_tokens(load_audio(path, sample_rate), path, sample_rate, duration, audio_dim, audio_scale)


def lift_to_tokens(
    wave: Tensor, path: str | os.PathLike, sample_rate: int, duration: float, audio_dim: int = 200,
    audio_scale: float = 3.0,
) -> Tensor:
    """`load_audio_tokens` after the read: a mono (T,) wave at `sample_rate` to x1 (N, audio_dim);
    `path` names the file in the error for silence."""
    rms = torch.sqrt(torch.mean(wave.double() ** 2))
    if not rms > SILENCE_RMS:
        raise AudioError(f"audio file {path} is silent (RMS {float(rms):.3g} <= {SILENCE_RMS:g})")
    wave = amplitude_lift(wave)
    n = latent_seq_len(sample_rate, duration, audio_dim)
    return patchify(crop_or_pad(wave, n * audio_dim), audio_dim) * audio_scale


# ----------------------------------------------------------------------------- writing


def _as_mono_numpy(wave: Tensor | np.ndarray, what: str) -> np.ndarray:
    if isinstance(wave, Tensor):
        wave = wave.detach().to("cpu", torch.float32).numpy()
    data = np.asarray(wave, dtype=np.float32)
    if data.ndim == 2 and 1 in data.shape:
        data = data.reshape(-1)
    if data.ndim != 1:
        raise AudioError(f"{what}: expected a mono waveform (T,), got shape {data.shape}")
    return data


def write_wav(path: str | os.PathLike, wave: Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write a mono float32 wav atomically (temp file beside `path`, fsync, rename)."""
    data = _as_mono_numpy(wave, f"write_wav({path})")
    if not np.isfinite(data).all():
        raise AudioError(f"refusing to write {path}: the waveform holds NaN or Inf samples")
    buf = io.BytesIO()
    sf.write(buf, data, int(sample_rate), format="WAV", subtype="FLOAT")
    return atomic_write_bytes(path, buf.getvalue())


def integrated_loudness(wave: Tensor | np.ndarray, sample_rate: int) -> float:
    """BS.1770 integrated loudness in LUFS (pyloudnorm); nan for a clip shorter than one 0.4 s
    gating block or with non-finite samples, -inf for silence."""
    import pyloudnorm as pyln  # lazy: 1.2 s to import (scipy), only loudness needs it

    data = _as_mono_numpy(wave, "integrated_loudness").astype(np.float64)
    if data.size < int(math.ceil(0.4 * sample_rate)) or not np.isfinite(data).all():
        return float("nan")
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        return float(pyln.Meter(sample_rate).integrated_loudness(data))


def loudness_normalize(
    wave: Tensor | np.ndarray, sample_rate: int, target_lufs: float = -23.0
) -> tuple[Tensor | np.ndarray, float]:
    """docs/method.md §5 save step 2: BS.1770 integrated loudness gain to `target_lufs`, then peak limit.

    Returns (wave, measured LUFS) with `wave` of the input's kind (Tensor or ndarray). If the
    measured loudness is not finite or is <= -70 LUFS (silence), or the clip is shorter than
    one 0.4 s gating block (measured = nan), the wave is returned unchanged. After the gain,
    a peak above 1 is scaled to 0.99.
    """
    import pyloudnorm as pyln  # lazy: see integrated_loudness

    is_tensor = isinstance(wave, Tensor)
    data = _as_mono_numpy(wave, "loudness_normalize").astype(np.float64)
    measured = integrated_loudness(data, sample_rate)
    if math.isfinite(measured) and measured > LOUDNESS_FLOOR_LUFS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pyloudnorm warns about clipping; limited below
            out = pyln.normalize.loudness(data, measured, target_lufs)
        peak = float(np.max(np.abs(out)))
        if peak > 1.0:
            out = out / peak * PEAK_LIMIT
    else:
        return wave, measured  # silence / too short: untouched
    out32 = out.astype(np.float32)
    if is_tensor:
        return torch.from_numpy(out32).to(wave.device), measured
    return out32, measured
