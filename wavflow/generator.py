"""The Python inference API: load a checkpoint once, generate many clips (docs/method.md §5, §2.11, §3).

    gen = WavFlowGenerator.from_checkpoint("runs/exp/checkpoint_latest.pth")
    wave, sr = gen.generate(video="clip.mp4", text="a dog barks", cfg=4.5, seed=0)

`wavflow.predict` (the CSV job) is built on `encode_row` + `generate_batch`.

Fixes over the reference, on purpose (docs/design.md §4): the initial noise of every item comes
from its own `torch.Generator` (drawn on CPU, then moved), so a clip does not depend on the
batch size or on the rows around it; everything runs on CPU too; a checkpoint's recorded
config supplies the network and data settings the user left unset, and one the user set
differently is an error instead of silent garbage.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from wavflow.audio import loudness_normalize, unpatchify
from wavflow.checkpoint_config import (
    adopt_checkpoint_config,
    check_config_against_checkpoint,
    config_from_checkpoint,
    ema_warning,
    unlocked,
)
from wavflow.conditions import ConditionFeatures, SamplingSettings
from wavflow.config import apply_overrides, copy_config, explicit_keys, load_config, validate_config
from wavflow.errors import CheckpointError, ConfigError, FeatureError
from wavflow.features.report import FeatureStats, identity_tag, STATS_FILENAME
from wavflow.io_utils import safe_torch_load
from wavflow.long_form.plan import check_long_form_mode, wants_windows
from wavflow.long_form.sampler import clip_plan, encode_windows, generate_long, LongFormItem
from wavflow.model import build_model_from_config
from wavflow.model.checkpoint import load_weights, resolve_checkpoint_path, state_dict_from_checkpoint
from wavflow.model.flow import cfg_denoiser, sample, SAMPLING_METHODS
from wavflow.model.presets import PRESETS
from wavflow.runtime import autocast_context, resolve_device
from wavflow.shapes import FeatureShapes, latent_seq_len, target_num_samples, video_seq_lens
from wavflow.speed import maybe_compile, sdpa_context, set_attention_impl, set_conv_impl, SpeedOptions
from wavflow.video import decode_video, sync_segments, video_duration, VideoFrames

log = logging.getLogger("wavflow.generator")

DEFAULT_INFER_CONFIG = "infer.yaml"


# ------------------------------------------------------------------------------- helpers


def row_seed(seed: int, row_id: str) -> int:
    """A stable 32-bit seed for one item from the run seed and the item's id (zlib.crc32)."""
    return zlib.crc32(f"{int(seed)}/{row_id}".encode("utf-8"))


@dataclass
class CheckpointInfo:
    path: str
    source: str  # which weights were loaded (model_ema1, model, flat state dict)
    global_step: Optional[int]
    epoch: Optional[int]
    has_config: bool


class WavFlowGenerator:
    """A loaded network plus its sampling settings; `generate` many times after one load."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: DictConfig,
        *,
        device: str | torch.device = "auto",
        encoders: Any = None,
        checkpoint: Optional[CheckpointInfo] = None,
    ) -> None:
        self.device = resolve_device(device)
        self.cfg = cfg
        self.model = model.to(self.device).eval()
        self.checkpoint = checkpoint
        self._encoders = encoders
        self._encoders_have_video = encoders is not None
        self._checked_dirs: set[Path] = set()
        self.precision = str(OmegaConf.select(cfg, "inference.precision", default="auto"))
        self.sample_rate = int(cfg.data.target_sample_rate)
        self.audio_scale = float(cfg.data.audio_scale)
        self.duration = float(cfg.data.audio_duration)
        # inference.{conv_impl,attention_backend,compile} (wavflow/speed.py)
        self.speed = SpeedOptions.from_config(OmegaConf.select(cfg, "inference", default=None) or {}, "inference")
        set_conv_impl(self.model, self.speed.conv_impl)
        set_attention_impl(self.model, self.speed.attention_backend)
        self._flow = _FlowPredictor(self.model, self.speed.compile)
        self.last_model_calls = 0  # network calls of the last generate_batch (the sampler's cost)

    # ------------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        model_name: Optional[str] = None,
        config: DictConfig | str | os.PathLike | None = None,
        use_ema: bool = True,
        device: str | torch.device = "auto",
        encoders: Any = None,
        overrides: Sequence[str] = (),
    ) -> "WavFlowGenerator":
        """Load a full trainer checkpoint (model / model_ema1) or a flat `ema_epoch_N.pth`.

        `config` (a loaded config or a YAML path, default configs/infer.yaml) and `overrides`
        give the data, sampling and encoder settings. When the checkpoint records its training
        config, the network and data keys (CHECKED_CONFIG_KEYS) the caller did not set are taken
        from there; a key set to another value (an override, a key of the caller's own file,
        `model_name`, any key of a config not made by wavflow.config.load_config) is a
        ConfigError naming both values, unless inference.allow_config_mismatch=true. A flat
        file records nothing: the config decides, and the weight shapes must fit it.
        """
        if isinstance(config, DictConfig):
            cfg = copy_config(config)
            if overrides:
                apply_overrides(cfg, overrides)
        else:
            cfg = load_config(config if config is not None else DEFAULT_INFER_CONFIG, overrides)
        explicit = explicit_keys(cfg)
        if model_name is not None:
            with unlocked(cfg):
                cfg.model.name = model_name
            explicit = explicit | {"model.name"} if explicit is not None else None
        path = resolve_checkpoint_path(path)  # a run directory stands for its checkpoint_latest.pth
        ckpt = safe_torch_load(path, what="model checkpoint")
        if not isinstance(ckpt, Mapping):
            raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
        ckpt_cfg = config_from_checkpoint(ckpt)

        if ckpt_cfg is not None:
            adopt_checkpoint_config(cfg, ckpt_cfg, explicit, path)
        validate_config(cfg)
        if ckpt_cfg is not None:
            allow = bool(OmegaConf.select(cfg, "inference.allow_config_mismatch", default=False))
            check_config_against_checkpoint(cfg, ckpt_cfg, path, allow_mismatch=allow)

        sd, source = state_dict_from_checkpoint(ckpt, use_ema, where=f"checkpoint {path}")
        model = build_model_from_config(cfg)
        load_weights(model, sd, source=f"checkpoint {path} [{source}] (model.name={cfg.model.name})")
        full = "model" in ckpt or "model_ema1" in ckpt
        info = CheckpointInfo(
            path=str(path),
            source=source,
            global_step=_as_int(ckpt.get("global_step")) if full else None,
            epoch=_as_int(ckpt.get("epoch")) if full else None,
            has_config=ckpt_cfg is not None,
        )
        log.info("loaded %s from %s (global_step=%s, epoch=%s)", source, path, info.global_step, info.epoch)
        if use_ema:
            warning = ema_warning(ckpt, ckpt_cfg, source)
            if warning:
                log.warning(warning)
            elif not full:
                log.info("%s is a flat state dict: its training step is unknown, so the EMA age cannot be checked", path)
        return cls(model, cfg, device=device, encoders=encoders, checkpoint=info)

    # ------------------------------------------------------------------------- shapes
    @property
    def num_samples(self) -> int:
        """Samples in a trimmed clip: round(sr * duration)."""
        return target_num_samples(self.sample_rate, self.duration)

    def set_duration(self, duration: float) -> None:
        """Generate clips of `duration` seconds from now on (rebuilds the RoPE tables)."""
        duration = float(duration)
        if not duration > 0:
            raise ConfigError(f"duration must be > 0 seconds, got {duration}")
        if math.isclose(duration, self.duration) and self.model.latent_seq_len == self._n(duration):
            return
        preset = PRESETS[self.model.preset_name]
        if preset.clip_seq_len is not None:  # reference presets pin the video lengths
            clip_len, sync_len = None, None
        else:
            clip_len, sync_len = video_seq_lens(duration)
            if clip_len <= 0 or sync_len <= 0:
                clip_len, sync_len = None, None  # too short for video: keep (empty tokens only)
        self.model.update_seq_lengths(self._n(duration), clip_len, sync_len)
        self.duration = duration

    def _n(self, duration: float) -> int:
        return latent_seq_len(self.sample_rate, duration, int(self.model.latent_dim))

    def check_video_lengths(self) -> None:
        """Video features of `duration` seconds must have the model's clip/sync lengths."""
        want = video_seq_lens(self.duration)
        have = (self.model.clip_seq_len, self.model.sync_seq_len)
        if want != have:
            raise ConfigError(
                f"{self.duration} s of video gives {want[0]} CLIP frames and {want[1]} Synchformer "
                f"tokens, but the model expects data.clip_seq_len={have[0]}, data.sync_seq_len={have[1]}; "
                "set data.audio_duration or the seq lens so they agree"
            )

    # ------------------------------------------------------------------------ features
    def encoders(self, need_video: bool) -> Any:
        """The feature encoders, built on first use (text only until a video needs them)."""
        if self._encoders is None or (need_video and not self._encoders_have_video):
            # lazy: wavflow.features.encoders imports open_clip (~1.6 s after torchvision); generation
            # from cached feature files (the predict job's usual case) never builds the encoders
            from wavflow.features.encoders import encoder_identity, FeatureEncoders

            self._check_feature_source(encoder_identity(self.cfg.encoders), "the encoders of this run (encoders.*)")
            self._encoders = FeatureEncoders.from_config(self.cfg.encoders, need_video=need_video, device=self.device)
            self._encoders_have_video = need_video
        return self._encoders

    def _check_feature_source(self, identity: str, what: str) -> None:
        """A network that normalises its conditions (cond_norm.py) only takes features of the
        encoders its statistics came from: other features would be normalised wrongly."""
        norm = getattr(self.model, "cond_norm", None)
        if norm is None:
            return
        want = int(norm.source_tag.item())
        if int(identity_tag(identity)) != want:
            raise FeatureError(
                f"{what} make features of '{identity}', but this checkpoint normalises features of other encoders "
                f"(statistics tag {want:013x}; its training run's feature_stats.pt names them): use the training "
                "run's encoders.* settings or features extracted with them"
            )

    def _check_features_dir(self, folder: Path) -> None:
        """Cached features: their folder's feature_stats.pt (written by extraction) names the encoders."""
        if getattr(self.model, "cond_norm", None) is None or folder in self._checked_dirs:
            return
        stats_path = folder / STATS_FILENAME
        if stats_path.is_file():
            self._check_feature_source(FeatureStats.load(stats_path).encoder_identity, f"the features in {folder}")
        self._checked_dirs.add(folder)

    def _expect(self, name: str, t: Tensor, where: str) -> Tensor:
        shape = FeatureShapes.of_model(self.model).by_key()[name]
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise FeatureError(f"{where}: {name} has shape {got}, the model expects {shape} (float)")
        if not torch.isfinite(t).all():
            raise FeatureError(f"{where}: {name} holds NaN or infinite values")
        return t.float()

    def load_features(
        self, path: str | os.PathLike, *, video: bool, text: bool
    ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """Cached features (one `<id>.pth`): the requested modalities present in the file."""
        self._check_features_dir(Path(path).absolute().parent)
        data = safe_torch_load(path, what="features file")
        if not isinstance(data, Mapping):
            raise FeatureError(f"features file {path} holds a {type(data).__name__}, not a dict of tensors")
        where = f"features file {path}"
        clip = sync = txt = None
        if video and "clip_features" in data and "sync_features" in data:
            clip = self._expect("clip_features", data["clip_features"], where)
            sync = self._expect("sync_features", data["sync_features"], where)
        if text and "text_features" in data:
            txt = self._expect("text_features", data["text_features"], where)
        return clip, sync, txt

    @torch.inference_mode()
    def encode_video(self, path: str | os.PathLike) -> tuple[Tensor, Tensor]:
        """Decode and encode the first `duration` seconds: (clip_seq_len, D_clip), (sync_seq_len, 768)."""
        self.check_video_lengths()
        clip, sync = self.encode_video_frames([decode_video(path, self.duration)], where=f"features of video {path}")
        return clip[0], sync[0]

    @torch.inference_mode()
    def encode_video_frames(self, frames: Sequence[VideoFrames], *, where: str) -> tuple[list[Tensor], list[Tensor]]:
        """Decoded clips of `duration` seconds, encoded as one batch: (CLIP, Synchformer) features each."""
        enc = self.encoders(need_video=True)
        with autocast_context(self.device, self.precision, tf32=True):
            clip = enc.encode_clip_frames(torch.stack([f.clip for f in frames]).to(self.device))
            sync = enc.encode_sync(torch.stack([sync_segments(f.sync) for f in frames]).to(self.device))
        return ([self._expect("clip_features", c.float(), where) for c in clip],
                [self._expect("sync_features", c.float(), where) for c in sync])

    @torch.inference_mode()
    def encode_text(self, caption: str) -> Tensor:
        enc = self.encoders(need_video=self._encoders_have_video)
        with autocast_context(self.device, self.precision, tf32=True):
            feat = enc.encode_text([caption])[0]
        return self._expect("text_features", feat.float(), f"text features of caption {caption!r}")

    def encode_row(
        self,
        *,
        video: str | os.PathLike | None = None,
        text: Optional[str] = None,
        features_path: str | os.PathLike | None = None,
        want_video: Optional[bool] = None,
    ) -> ConditionFeatures:
        """Conditions of one item. `video=None` / `text=None` select the learned empty tokens.

        Cached features from `features_path` win over on-the-fly encoding, per modality.
        `want_video` (default: `video is not None`) asks for video conditions even without a
        video file: they must then come from `features_path` (FeatureError otherwise).
        """
        want_video = video is not None if want_video is None else bool(want_video)
        clip = sync = txt = None
        if features_path is not None:
            clip, sync, txt = self.load_features(features_path, video=want_video, text=text is not None)
        if want_video and clip is None:
            if video is None:
                where = f"features file {features_path}" if features_path is not None else "this item"
                raise FeatureError(
                    f"video conditions wanted but {where} has no clip_features/sync_features and no video was given"
                )
            clip, sync = self.encode_video(video)
        if text is not None and txt is None:
            txt = self.encode_text(text)
        return ConditionFeatures(clip=clip, sync=sync, text=txt)

    # ------------------------------------------------------------------------ sampling
    def initial_noise(self, seeds: Sequence[int], noise_scale: Optional[float] = None) -> Tensor:
        """x0 (B, N, latent_dim): item i from its own CPU generator seeded with seeds[i]."""
        scale = float(self.cfg.sampling.noise_scale if noise_scale is None else noise_scale)
        shape = (self.model.latent_seq_len, self.model.latent_dim)
        rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return (torch.stack(rows) * scale).to(self.device)

    def stack_conditions(self, items: Sequence[ConditionFeatures]) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model
        clip = [f.clip.to(self.device) if f.clip is not None else m.empty_clip_sequence(1)[0] for f in items]
        sync = [f.sync.to(self.device) if f.sync is not None else m.empty_sync_sequence(1)[0] for f in items]
        text = [f.text.to(self.device) if f.text is not None else m.empty_string_sequence(1)[0] for f in items]
        return torch.stack(clip), torch.stack(sync), torch.stack(text)

    def require_level_head(self, why: str) -> None:
        """ConfigError naming `why` unless the loaded weights carry the loudness head."""
        if getattr(self.model, "level_head", None) is None:
            where = self.checkpoint.path if self.checkpoint is not None else "the loaded network"
            raise ConfigError(f"{why} needs weights trained with the loudness head (model.level_head=true); "
                              f"{where} has none (docs/method.md §2.15)")

    @torch.inference_mode()
    def predict_loudness(self, items: Sequence[ConditionFeatures]) -> list[float]:
        """The loudness head's LUFS for each item's conditions (docs/method.md §2.15)."""
        self.require_level_head("a loudness predicted from the conditions")
        clip, sync, text = self.stack_conditions(items)
        return [float(v) for v in self.model.predict_loudness(clip, sync, text).cpu()]

    def predict_clip_loudness(self, windows: Sequence[ConditionFeatures]) -> float:
        """One loudness for a clip made in windows: the power mean of its windows' predictions."""
        lufs = torch.tensor(self.predict_loudness(windows), dtype=torch.float64)
        return float(10.0 * torch.log10(torch.mean(10.0 ** (lufs / 10.0))))

    def sampling_settings(
        self,
        *,
        cfg: Optional[float] = None,
        steps: Optional[int] = None,
        method: Optional[str] = None,
        cfg_interval: Optional[Sequence[float]] = None,
        batched_cfg: Optional[bool] = None,
    ) -> SamplingSettings:
        """The sampler's settings: the arguments, else inference.* / sampling.* of the config."""
        icfg, scfg = self.cfg.inference, self.cfg.sampling
        method = str(scfg.method if method is None else method)
        if method not in SAMPLING_METHODS:
            raise ConfigError(f"sampling.method must be one of {SAMPLING_METHODS}, got {method!r}")
        if cfg_interval is None and icfg.get("cfg_interval") is not None:
            cfg_interval = list(icfg.cfg_interval)
        return SamplingSettings(
            cfg=float(icfg.cfg if cfg is None else cfg),
            steps=int(scfg.num_steps if steps is None else steps),
            method=method,
            cfg_interval=list(cfg_interval) if cfg_interval is not None else None,
            batched_cfg=bool(icfg.get("batched_cfg", True) if batched_cfg is None else batched_cfg),
        )

    def sampling_context(self) -> contextlib.ExitStack:
        """Precision and attention settings around a whole sampling run."""
        stack = contextlib.ExitStack()
        stack.enter_context(autocast_context(self.device, self.precision, tf32=True))
        stack.enter_context(sdpa_context(self.speed.attention_backend))
        return stack

    def guided_network(self, items: Sequence[ConditionFeatures], settings: SamplingSettings) -> Callable[[Tensor, Tensor], Tensor]:
        """f(t, x) -> the guided prediction for these items (x: (B, N, latent_dim)); inside sampling_context."""
        clip, sync, text = self.stack_conditions(items)
        cond = self.model.preprocess_conditions(clip, sync, text)
        empty = self.model.get_empty_conditions(len(items))
        return cfg_denoiser(self._flow, cond, empty, settings.cfg, cfg_interval=settings.cfg_interval,
                            batched=settings.batched_cfg)

    def solve(self, fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, settings: SamplingSettings) -> Tensor:
        """Run the sampler from x0 with prediction function fn (sampling.* of the config)."""
        scfg = self.cfg.sampling
        return sample(
            settings.method,
            fn,
            x0,
            num_steps=settings.steps,
            shift=float(scfg.noise_shift),
            min_sigma=float(scfg.min_sigma),
            prediction_type=str(scfg.prediction_type),
            adaptive={"method": str(scfg.adaptive_solver), "rtol": float(scfg.rtol), "atol": float(scfg.atol),
                      "t_end": float(scfg.adaptive_t_end)},
        )

    @torch.inference_mode()
    def generate_batch(
        self,
        items: Sequence[ConditionFeatures],
        seeds: Sequence[int],
        *,
        cfg: Optional[float] = None,
        steps: Optional[int] = None,
        method: Optional[str] = None,
        cfg_interval: Optional[Sequence[float]] = None,
        batched_cfg: Optional[bool] = None,
        noise_scale: Optional[float] = None,
        trim: Optional[bool] = None,
        on_step: Optional[Callable[[int], None]] = None,
    ) -> Tensor:
        """Sample a batch: (B, round(sr*duration)) when trimmed, else (B, N*latent_dim), float32 CPU.

        Arguments left as None come from the config (inference.*, sampling.*). `on_step(calls)`
        is called after each network call of the sampler with the count so far (progress bars).
        """
        if len(items) != len(seeds) or not items:
            raise ValueError(f"generate_batch needs one seed per item and at least one item ({len(items)} items, {len(seeds)} seeds)")
        settings = self.sampling_settings(cfg=cfg, steps=steps, method=method, cfg_interval=cfg_interval,
                                          batched_cfg=batched_cfg)
        trim = bool(self.cfg.inference.get("trim_to_duration", True) if trim is None else trim)
        x0 = self.initial_noise(seeds, noise_scale)
        with self.sampling_context():
            guided = self.guided_network(items, settings)
            self.last_model_calls = 0  # calls of the guided network (one batched CFG pass = 1)

            def fn(t: Tensor, x: Tensor) -> Tensor:
                out = guided(t, x)
                self.last_model_calls += 1
                if on_step is not None:
                    on_step(self.last_model_calls)
                return out

            x1 = self.solve(fn, x0, settings)
        audio = unpatchify(x1.float() / self.audio_scale).cpu()
        return audio[:, : self.num_samples] if trim else audio

    def long_form_setting(self, name: str) -> Any:
        """inference.long_form ("auto" when unset) / inference.window_overlap_sec (null when unset)."""
        default = "auto" if name == "long_form" else None
        return OmegaConf.select(self.cfg, f"inference.{name}", default=default)

    def clip_length(self, video: str | os.PathLike | None, duration: Optional[float], mode: str) -> float:
        """Seconds to generate: `duration`, else the video's length (long_form on/auto), else the trained duration."""
        if duration is not None:
            if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
                raise ConfigError(f"duration must be a positive number of seconds, got {duration!r}")
            return float(duration)
        if video is not None and mode != "off":
            return video_duration(video)
        return self.duration

    def generate(
        self,
        video: str | os.PathLike | None = None,
        text: Optional[str] = None,
        duration: Optional[float] = None,
        cfg: float = 4.5,
        steps: Optional[int] = None,
        seed: int = 0,
        method: Optional[str] = None,
        *,
        features_path: str | os.PathLike | None = None,
        cfg_interval: Optional[Sequence[float]] = None,
        loudness_lufs: Optional[float] | str = None,
        trim: bool = True,
        long_form: Optional[str] = None,
        window_overlap_sec: Optional[float] | str = "config",
    ) -> tuple[Tensor, int]:
        """One clip -> (waveform (T,) float32 CPU, sample_rate).

        video / text None use the learned empty tokens (both None: an unconditional sample).
        `loudness_lufs` (e.g. -23.0) applies the pyloudnorm gain of the CSV job; `"model"`: to the
        loudness the network's loudness head predicts for these conditions (docs/method.md §2.15).

        Length: `duration` seconds, else the whole video, else the trained duration. A clip
        longer than the trained duration is made in overlapping windows (docs/long_form.md)
        unless `long_form="off"` (then a video gives its first trained-duration seconds and a
        longer `duration` stretches the positional tables). `long_form` and
        `window_overlap_sec` default to inference.long_form / inference.window_overlap_sec.
        """
        if isinstance(loudness_lufs, str) and loudness_lufs != "model":
            raise ConfigError(f"loudness_lufs must be a number (LUFS), 'model' or None, got {loudness_lufs!r}")
        mode = check_long_form_mode(long_form if long_form is not None else self.long_form_setting("long_form"))
        overlap = self.long_form_setting("window_overlap_sec") if window_overlap_sec == "config" else window_overlap_sec
        length = self.clip_length(video, duration, mode)
        if wants_windows(mode, target_num_samples(self.sample_rate, length), self.num_samples):
            plan = clip_plan(self, length, overlap)
            txt = self.encode_row(text=text, features_path=features_path).text if text is not None else None
            item = LongFormItem(plan=plan, windows=encode_windows(self, plan, video=video, text=txt), seed=seed)
            if loudness_lufs == "model":
                loudness_lufs = self.predict_clip_loudness(item.windows)
            wave = generate_long(self, [item], cfg=cfg, steps=steps, method=method, cfg_interval=cfg_interval)[0]
        else:
            if duration is not None:
                self.set_duration(duration)
            features = self.encode_row(video=video, text=text, features_path=features_path)
            if loudness_lufs == "model":
                loudness_lufs = self.predict_loudness([features])[0]
            wave = self.generate_batch([features], [seed], cfg=cfg, steps=steps, method=method,
                                       cfg_interval=cfg_interval, trim=trim)[0]
        if loudness_lufs is not None:
            wave, _ = loudness_normalize(wave, self.sample_rate, loudness_lufs)
        return wave, self.sample_rate


class _FlowPredictor:
    """What the samplers call: the model's predict_flow, compiled once when asked (the same
    shapes come back every step, so it compiles on the first call of a batch shape only)."""

    def __init__(self, model: torch.nn.Module, compile_: bool) -> None:
        self.model = model
        self._compiled = maybe_compile(model.predict_flow, True, dynamic=False) if compile_ else None

    def predict_flow(self, x: Tensor, t: Tensor, conditions: Any) -> Tensor:
        if self._compiled is None:
            return self.model.predict_flow(x, t, conditions)  # looked up per call (tests patch it)
        return self._compiled(x, t, conditions)


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, Tensor) and value.numel() == 1:
        return int(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return None
