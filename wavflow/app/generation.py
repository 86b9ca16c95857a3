"""What one request of the web page does, without the page: check the inputs, sample with the
same generator calls, seed and output writing as `wavflow.predict`, and write the results into
a folder of its own.

A request of the page equals one predict row with id `app`: the noise seed is
`row_seed(seed, "app")`, the conditions come from `encode_row`, the clip from
`generate_batch`, and the wav/mp4 from predict's `write_outputs` (loudness as `output.*`). The
settings file holds the equivalent `predict.sh` command and CSV row, so a result made on the
page can be made again in batch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import tempfile
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from omegaconf import DictConfig

from wavflow.audio import load_audio
from wavflow.config import format_override
from wavflow.demo.audio_measures import log_mel
from wavflow.errors import ConfigError, WavFlowError
from wavflow.generator import WavFlowGenerator, row_seed
from wavflow.infer_rows import InferRow
from wavflow.io_utils import atomic_write_bytes, atomic_write_text
from wavflow.long_form.plan import check_long_form_mode, resolve_overlap, wants_windows
from wavflow.long_form.sampler import clip_plan, encode_windows, generate_long, LongFormItem
from wavflow.model.flow import SAMPLING_METHODS
from wavflow.predict import loudness_from_model, write_outputs
from wavflow.shapes import target_num_samples, video_seq_lens
from wavflow.video import video_duration

ROW_ID = "app"  # the id of the equivalent predict row (its seed is row_seed(seed, ROW_ID))
MODES = ("VT2A", "V2A", "T2A")
MAX_STEPS = 1000


class RequestError(WavFlowError):
    """An input of the page that cannot be used; its message is shown in the page."""


@dataclass(frozen=True)
class Request:
    video: Optional[Path]  # an uploaded file (already in the request's own folder), or None
    caption: Optional[str]
    steps: int
    cfg: float
    seed: int
    duration: float
    method: str = "euler"
    cfg_interval: Optional[tuple[float, float]] = None
    use_ema: bool = True
    long_form: str = "auto"  # inference.long_form for this request (docs/long_form.md)
    window_overlap_sec: Optional[float] = None  # inference.window_overlap_sec (None: half the window)

    @property
    def mode(self) -> str:
        return {(True, True): "VT2A", (True, False): "V2A", (False, True): "T2A"}[(self.video is not None, self.caption is not None)]

    def without(self, mode: str) -> "Request":
        """The same request in `mode` (compare modes: VT2A, V2A, T2A from one video + caption)."""
        fields = asdict(self)
        if mode == "V2A":
            fields["caption"] = None
        elif mode == "T2A":
            fields["video"] = None
        return Request(**fields)


@dataclass
class Result:
    mode: str
    folder: Path
    wav: Path
    mp4: Optional[Path]
    spectrogram: Path
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Limits:
    """What the loaded checkpoint can make, shown in the page and checked per request."""

    max_duration: float  # the longest clip the page makes (app.max_duration_sec; windows past the trained length)
    trained_duration: float  # the checkpoint's clip length: one window
    min_video_duration: float  # shortest clip that still has one CLIP frame and one sync segment
    context_length: Optional[int] = None  # the caption tokenizer's tokens, when known


def parse_request(*, video: Optional[str], caption: Optional[str], steps: Any, cfg: Any, seed: Any, duration: Any,
                  method: Any, cfg_interval: Any, use_ema: Any, limits: Limits, long_form: Any = "auto",
                  window_overlap_sec: Any = None) -> Request:
    """The page's raw widget values -> a checked Request (RequestError names the field)."""
    caption = (caption or "").strip() or None
    video_path = Path(video) if video else None
    if video_path is None and caption is None:
        raise RequestError("Give a video, a caption, or both: with neither there is nothing to condition on.")
    steps_i = _integer(steps, "Steps", 1, MAX_STEPS)
    seed_i = _integer(seed, "Seed", 0, 2**32 - 1)
    cfg_f = _number(cfg, "CFG scale", 0.0, 50.0)
    duration_f = 0.0 if duration is None or str(duration).strip() == "" else _number(duration, "Duration", 0.0, math.inf)
    if duration_f == 0:  # 0 or empty (the page's empty number): the whole video, else the trained length
        duration_f = _video_length(video_path) if video_path is not None else limits.trained_duration
        if duration_f > limits.max_duration + 1e-9:
            raise RequestError(f"The uploaded video lasts {duration_f:.2f} s; this page makes clips of up to "
                               f"{limits.max_duration:g} s (app.max_duration_sec): set Duration to {limits.max_duration:g} or less.")
    if not 0 < duration_f <= limits.max_duration + 1e-9:
        raise RequestError(f"Duration {duration_f:g} s: this page makes clips of up to {limits.max_duration:g} s "
                           f"(app.max_duration_sec); choose 0 < duration <= {limits.max_duration:g}.")
    try:
        long_form_s = check_long_form_mode(long_form, "Long form")
        overlap = None if str(window_overlap_sec or "").strip() == "" else _number(window_overlap_sec, "Window overlap", 0.0, math.inf)
        resolve_overlap(overlap, limits.trained_duration, "Window overlap (s)")
    except ConfigError as exc:
        raise RequestError(f"{exc}.") from None
    if long_form_s == "off" and duration_f > limits.trained_duration + 1e-9:
        raise RequestError(f"Duration {duration_f:g} s is longer than the trained {limits.trained_duration:g} s: "
                           "choose Long form auto or on (overlapping windows), or a shorter duration.")
    if video_path is not None and duration_f < limits.min_video_duration:
        raise RequestError(f"Duration {duration_f:g} s is too short for video conditions (at least "
                           f"{limits.min_video_duration:g} s: one CLIP frame and one Synchformer segment).")
    if str(method) not in SAMPLING_METHODS:
        raise RequestError(f"Sampler {method!r} is not one of {', '.join(SAMPLING_METHODS)}.")
    return Request(video=video_path, caption=caption, steps=steps_i, cfg=cfg_f, seed=seed_i, duration=duration_f,
                   method=str(method), cfg_interval=_interval(cfg_interval), use_ema=bool(use_ema),
                   long_form=long_form_s, window_overlap_sec=overlap)


def _number(value: Any, name: str, low: float, high: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {value!r}.") from None
    if not (math.isfinite(out) or high == math.inf) or not low <= out <= high:
        raise RequestError(f"{name} must be between {low:g} and {high:g}, got {out:g}.")
    return out


def _integer(value: Any, name: str, low: int, high: int) -> int:
    out = _number(value, name, low, high)
    if out != int(out):
        raise RequestError(f"{name} must be a whole number, got {out:g}.")
    return int(out)


def _interval(value: Any) -> Optional[tuple[float, float]]:
    """'' / None: guide at every step; 'lo, hi' (flow times, 0 = noise, 1 = data)."""
    text = str(value or "").strip()
    if not text:
        return None
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise RequestError(f"CFG interval must be two numbers 'lo, hi' between 0 and 1, got {text!r}.") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise RequestError(f"CFG interval must satisfy 0 <= lo <= hi <= 1, got {lo:g}, {hi:g}.")
    return lo, hi


class Studio:
    """The loaded model(s) behind the page: the EMA (or live) weights loaded at start-up, the
    other ones on first use; the encoders loaded once and shared (the text encoder as soon as
    the page answers, the video encoders with the first video). One lock: a request's duration
    and sampling never mix with another's."""

    def __init__(self, cfg: DictConfig, generator: WavFlowGenerator) -> None:
        self.cfg = cfg
        self.out_root = Path(str(cfg.output.output_dir)).absolute()
        self._generators = {bool(cfg.model.use_ema): generator}
        self._lock = threading.Lock()
        info = generator.checkpoint
        # a full trainer checkpoint (it records its step) holds the live weights and model_ema1
        self.has_both_weights = info is not None and info.global_step is not None
        self.trained_duration = float(generator.duration)
        self.limits = Limits(max_duration=max(float(cfg.app.max_duration_sec), self.trained_duration),
                             trained_duration=self.trained_duration, min_video_duration=_min_video_duration(),
                             context_length=None)

    @classmethod
    def load(cls, cfg: DictConfig) -> "Studio":
        """Load the checkpoint named by model.ckpt_path (errors: one line, at start-up)."""
        if not cfg.model.ckpt_path:
            raise ConfigError("model.ckpt_path is required: the checkpoint the page generates from")
        gen = WavFlowGenerator.from_checkpoint(cfg.model.ckpt_path, config=cfg, use_ema=bool(cfg.model.use_ema),
                                               device=str(cfg.inference.device))
        if loudness_from_model(cfg):
            gen.require_level_head("output.loudness_from_model=true")
        return cls(cfg, gen)

    def generator(self, use_ema: bool) -> WavFlowGenerator:
        if use_ema not in self._generators:
            if not self.has_both_weights:
                raise RequestError("This checkpoint holds one set of weights only; leave 'EMA weights' as it is.")
            first = next(iter(self._generators.values()))
            shared = first.encoders(need_video=True)  # one set of encoders for both weights
            self._generators[use_ema] = WavFlowGenerator.from_checkpoint(
                self.cfg.model.ckpt_path, config=self.cfg, use_ema=use_ema, device=str(self.cfg.inference.device),
                encoders=shared)
        return self._generators[use_ema]

    def warm_up(self) -> None:
        """Load the text encoder now rather than in the first request (under the lock: a
        request that arrives meanwhile waits for it instead of loading it twice)."""
        with self._lock:
            next(iter(self._generators.values())).encoders(need_video=False)

    def check_caption(self, caption: Optional[str]) -> None:
        """A caption the tokenizer would cut is refused (the cut words would be ignored silently)."""
        if caption is None:
            return
        gen = next(iter(self._generators.values()))
        clip = getattr(gen.encoders(need_video=False), "clip", None)
        tokenizer = getattr(clip, "tokenizer", None)
        encode = getattr(tokenizer, "encode", None)
        if clip is None or encode is None:
            return
        n = len(encode(caption)) + 2  # start and end tokens
        if n > clip.context_length:
            raise RequestError(f"The caption has {n} tokens; the text encoder takes at most {clip.context_length}. "
                               "Shorten it.")

    def run(self, request: Request, *, on_step: Optional[Callable[[int], None]] = None) -> Result:
        """Generate one clip into a new folder under output.output_dir (the request's own)."""
        if request.video is not None:
            _check_video(request.video, request.duration)
        with self._lock:
            self.check_caption(request.caption)
            gen = self.generator(request.use_ema)
            folder = self.out_root / f"{uuid.uuid4().hex[:12]}_{request.mode}"
            folder.mkdir(parents=True, exist_ok=False)
            row = InferRow(index=0, name=ROW_ID, video=request.video, caption=request.caption, features_path=None,
                           wants_video=request.video is not None)
            try:
                wave, row.predicted_lufs = self._sample(gen, request, on_step)
            except WavFlowError as exc:
                shutil.rmtree(folder, ignore_errors=True)
                raise RequestError(str(exc).splitlines()[0]) from exc
            write_outputs(gen, row, wave, folder, self.cfg)
        wav = Path(row.wav_path)
        spectrogram = write_spectrogram(wav, folder / "spectrogram.png", gen.sample_rate, title=request.mode)
        settings = settings_record(request, gen.cfg, gen, trained_duration=self.trained_duration,
                                   loudness_lufs=row.loudness_lufs)
        atomic_write_text(folder / "settings.json", json.dumps(settings, indent=1) + "\n")
        return Result(mode=request.mode, folder=folder, wav=wav, mp4=Path(row.mp4_path) if row.mp4_path else None,
                      spectrogram=spectrogram, settings=settings)

    def _sample(self, gen: WavFlowGenerator, request: Request,
                on_step: Optional[Callable[[int], None]]) -> tuple[Any, Optional[float]]:
        """One clip, as predict makes the same row (in windows past the trained length), and the
        loudness head's prediction for it when output.loudness_from_model asks for one."""
        sampling = dict(cfg=request.cfg, steps=request.steps, method=request.method,
                        cfg_interval=list(request.cfg_interval) if request.cfg_interval else None)
        seed = row_seed(request.seed, ROW_ID)
        from_model = loudness_from_model(self.cfg)
        gen.set_duration(self.trained_duration)
        if not wants_windows(request.long_form, target_num_samples(gen.sample_rate, request.duration), gen.num_samples):
            gen.set_duration(request.duration)
            features = gen.encode_row(video=request.video, text=request.caption)
            lufs = gen.predict_loudness([features])[0] if from_model else None
            return gen.generate_batch([features], [seed], on_step=on_step, **sampling)[0], lufs
        plan = clip_plan(gen, request.duration, request.window_overlap_sec)
        text = gen.encode_row(text=request.caption).text if request.caption is not None else None
        item = LongFormItem(plan=plan, windows=encode_windows(gen, plan, video=request.video, text=text), seed=seed)
        lufs = gen.predict_clip_loudness(item.windows) if from_model else None
        return generate_long(gen, [item], on_step=on_step, **sampling)[0], lufs


def _min_video_duration() -> float:
    """The shortest duration with at least one CLIP frame and one Synchformer segment."""
    d = 0.05
    while d < 10.0:
        clip_len, sync_len = video_seq_lens(d)
        if clip_len > 0 and sync_len > 0:
            return round(d, 2)
        d += 0.05
    return 10.0


def _video_length(path: Path) -> float:
    try:
        length = video_duration(path)
    except Exception as exc:  # noqa: BLE001 - PyAV raises many kinds for a file that is not a video
        why = str(exc).splitlines()[0].replace(str(path), path.name) if str(exc) else type(exc).__name__
        raise RequestError(f"The upload {path.name} is not a video that can be read: {why}") from exc
    if not length > 0:
        raise RequestError("The uploaded video has no frames.")
    return length


def _check_video(path: Path, duration: float) -> None:
    length = _video_length(path)
    if length + 1e-3 < duration:
        raise RequestError(f"The uploaded video lasts {length:.2f} s, shorter than the requested {duration:g} s: "
                           "choose a shorter duration or a longer video.")


def write_spectrogram(wav: Path, out_png: Path, sample_rate: int, *, title: str) -> Path:
    """A log-mel picture of the generated clip (10 ms hop)."""
    import matplotlib  # lazy: matplotlib costs ~0.6 s to import; only pictures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    wave = load_audio(wav, sample_rate).numpy()
    mel = log_mel(wave, sample_rate)
    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.imshow(np.maximum(mel, mel.max() - 80.0), origin="lower", aspect="auto", cmap="magma",
              extent=(0, len(wave) / sample_rate, 0, mel.shape[0]))
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel bin")
    ax.set_title(f"{title}: log-mel (dB)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(out_png, buf.getvalue())


def settings_record(request: Request, cfg: DictConfig, gen: WavFlowGenerator, *,
                    trained_duration: float, loudness_lufs: Optional[float] = None) -> dict[str, Any]:
    """What was used, and how to make the same clip with predict.sh (a one-row CSV + overrides)."""
    # video_path: the uploaded file's name (the upload itself is deleted after the request)
    row = {"id": ROW_ID, "video_path": request.video.name if request.video else "",
           "caption": request.caption or "", "video_exist": int(request.video is not None),
           "text_exist": int(request.caption is not None)}
    overrides = [
        format_override("model.ckpt_path", str(cfg.model.ckpt_path)),
        format_override("model.use_ema", request.use_ema),
        "data.csv_path=app.csv",
        "output.output_dir=app_predict",
        format_override("inference.seed", request.seed),
        format_override("inference.cfg", request.cfg),
        format_override("inference.cfg_interval", list(request.cfg_interval) if request.cfg_interval else None),
        format_override("sampling.method", request.method),
        format_override("sampling.num_steps", request.steps),
    ]
    if loudness_from_model(cfg):
        overrides.append("output.loudness_from_model=true")
    windows = wants_windows(request.long_form, target_num_samples(gen.sample_rate, request.duration),
                            target_num_samples(gen.sample_rate, trained_duration))
    overrides += [format_override("inference.long_form", request.long_form),
                  format_override("inference.window_overlap_sec", request.window_overlap_sec)]
    row["duration"] = request.duration  # predict's duration column: the same length (and windows)
    if not windows and not math.isclose(request.duration, trained_duration):
        overrides.append(format_override("data.audio_duration", request.duration))
        overrides.append("inference.allow_config_mismatch=true")  # a length other than the trained one
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row), lineterminator="\n")
    writer.writeheader()
    writer.writerow(row)
    return {
        "mode": request.mode,
        "checkpoint": str(cfg.model.ckpt_path),
        "weights": "EMA" if request.use_ema else "live",
        "seed": request.seed,
        "noise_seed": row_seed(request.seed, ROW_ID),
        "steps": request.steps,
        "cfg": request.cfg,
        "cfg_interval": list(request.cfg_interval) if request.cfg_interval else None,
        "sampler": request.method,
        "duration_s": request.duration,
        "long_form": request.long_form,
        "window_overlap_sec": request.window_overlap_sec,
        "windows": clip_plan(gen, request.duration, request.window_overlap_sec).count if windows else 1,
        "sample_rate": gen.sample_rate,
        "loudness_lufs": loudness_lufs,
        "csv": buf.getvalue(),
        "command": "bash scripts/launch/predict.sh --config configs/infer.yaml " + " ".join(overrides),
    }


def request_folder(root: Path) -> Path:
    """A new folder for one request's uploads, removed when the request ends."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="upload_", dir=root))
