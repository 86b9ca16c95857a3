"""FeatureEncoders: the CLIP text/frame and Synchformer encoders behind one config block.

`encoders.profile: default` uses DFN5B CLIP + the public Synchformer weights; `tiny` creates
small random-init models with the real output widths (text 1024, CLIP 1024, sync 768), writes
them to the cache once (deterministic seed) and loads them back through the same file-loading
code as real weights. A missing real weight is always an error, never a silent tiny fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import open_clip
import torch
from torch import Tensor

from wavflow.errors import CheckpointError, ConfigError, WeightsError
from wavflow.features.clip import HUB_PREFIX, ClipEncoder
from wavflow.features.synchformer import Synchformer, SynchformerConfig
from wavflow.features.tiny_encoders import craft_tiny_clip, craft_tiny_synchformer
from wavflow.features.weights import (
    SYNCHFORMER_FILENAME,
    SYNCHFORMER_URL,
    resolve_cache_dir,
    resolve_weight,
)
from wavflow.io_utils import atomic_torch_save, atomic_write_text, safe_torch_load, sanitize_filename

PROFILES = ("default", "tiny")
# Architecture used for a local open_clip file when `clip_model` is a hub id (docs/method.md §6.3).
LOCAL_CLIP_ARCH = "ViT-H-14-378-quickgelu"
SYNC_TOKENS_PER_SEGMENT = 8

# Tiny profile. Bump the version when the configs change so stale cache files are not reused.
TINY_VERSION = 3
TINY_SEED = 1234
TINY_CLIP_ARCH = f"wavflow-tiny-clip-v{TINY_VERSION}"
TINY_CLIP_FILENAME = f"{TINY_CLIP_ARCH}.pt"
TINY_SYNC_FILENAME = f"wavflow-tiny-synchformer-v{TINY_VERSION}.pth"
# Real widths (text 1024 = per-token hidden width, image embed 1024), one layer each, coarse
# 32-px patches. The text tower keeps the real 49408-token vocabulary of the real tokenizer.
# The weights are set by tiny_encoders.craft_tiny_clip (average pooling, no ln_pre, LayerNorm
# after pooling: see there).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 1024,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 384, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32,
                   "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 1, "mlp_ratio": 1.0},
}


def _cfg_get(cfg: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    getter = getattr(cfg, "get", None)
    return getter(key, default) if getter else getattr(cfg, key, default)


def _half_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    # fp16 on disk halves the tiny files (the CLIP vocabulary table alone is 49408 x 1024).
    return {k: v.detach().to(torch.float16).clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------ tiny profile
def register_tiny_clip_arch(cache_dir: Path) -> str:
    """Make the tiny CLIP config known to open_clip (a JSON beside the weights)."""
    if open_clip.get_model_config(TINY_CLIP_ARCH) is None:
        path = cache_dir / f"{TINY_CLIP_ARCH}.json"
        if not path.is_file():
            atomic_write_text(path, json.dumps(TINY_CLIP_CONFIG, indent=1))
        open_clip.add_model_config(path)
    return TINY_CLIP_ARCH


def ensure_tiny_clip(cache_dir: Path) -> Path:
    """Write the deterministic random-init tiny CLIP into the cache if absent; return its path."""
    arch = register_tiny_clip_arch(cache_dir)
    path = cache_dir / TINY_CLIP_FILENAME
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            # open_clip logs a "no pretrained weights" warning for this intended random init
            previous = logging.root.manager.disable  # the caller's setting, restored below
            logging.disable(max(previous, logging.WARNING))
            try:
                model = open_clip.create_model(arch, pretrained=None)
            finally:
                logging.disable(previous)
            craft_tiny_clip(model, torch.Generator().manual_seed(TINY_SEED))
        atomic_torch_save(_half_state_dict(model), path)
    return path


def ensure_tiny_synchformer(cache_dir: Path) -> Path:
    path = cache_dir / TINY_SYNC_FILENAME
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = Synchformer.tiny()
            craft_tiny_synchformer(model, torch.Generator().manual_seed(TINY_SEED + 1))
        atomic_torch_save(_half_state_dict(model), path)
    return path


# ----------------------------------------------------------------------------- loading
def read_synchformer_state(path: Path) -> Mapping[str, Any]:
    """A Synchformer state-dict file, weights-only; WeightsError naming the file otherwise."""
    try:
        state = safe_torch_load(path, what="Synchformer weights")
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from exc
    if not isinstance(state, Mapping):
        raise WeightsError(f"Synchformer weights {path} hold a {type(state).__name__}, not a state dict")
    return state


def load_synchformer(path: Path, cfg: SynchformerConfig | None = None) -> Synchformer:
    """Build Synchformer and load a (public or tiny) state dict file, weights-only."""
    state = read_synchformer_state(path)
    with torch.device("meta"):  # no random init of 122M parameters that are overwritten anyway
        model = Synchformer(cfg)
    state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"Synchformer weights {path} do not match the model: {exc}") from exc
    return model.eval().requires_grad_(False)


def encoder_identity(encoders_cfg: Mapping[str, Any] | Any) -> str:
    """Names the encoders that make a feature set (stable across machines): recorded with the
    feature statistics and, as a tag, in networks that normalise their conditions."""
    profile = _cfg_get(encoders_cfg, "profile", "default")
    if profile == "tiny":
        return f"tiny-v{TINY_VERSION}"
    pretrained = _cfg_get(encoders_cfg, "clip_pretrained")
    clip = Path(str(pretrained)).name if pretrained else _cfg_get(encoders_cfg, "clip_model", "")
    sync = _cfg_get(encoders_cfg, "synchformer_ckpt")
    return f"default|clip={clip}|synchformer={Path(str(sync)).name if sync else SYNCHFORMER_FILENAME}"


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


class FeatureEncoders:
    """Text (CLIP), frame (CLIP) and sync (Synchformer) encoders. Outputs are float32 on CPU."""

    def __init__(
        self,
        clip: ClipEncoder,
        synchformer: Synchformer | None,
        *,
        device: str | torch.device = "cpu",
        cache_dir: Path,
        clip_identity: str,
    ) -> None:
        self.device = torch.device(device)
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.synchformer = synchformer.to(self.device) if synchformer is not None else None
        self.cache_dir = cache_dir
        self.clip_identity = clip_identity  # names the empty-string cache file
        self.text_dim = clip.text_dim
        self.clip_dim = clip.image_dim
        self.sync_dim = synchformer.out_dim if synchformer is not None else SynchformerConfig().embed_dim
        self._empty: Tensor | None = None

    # ------------------------------------------------------------------------- building
    @classmethod
    def from_config(
        cls, encoders_cfg: Mapping[str, Any] | Any, *, need_video: bool, device: str | torch.device = "cpu"
    ) -> "FeatureEncoders":
        profile = _cfg_get(encoders_cfg, "profile", "default")
        if profile not in PROFILES:
            raise ConfigError(f"encoders.profile must be one of {PROFILES}, got {profile!r}")
        cache_dir = resolve_cache_dir(_cfg_get(encoders_cfg, "cache_dir"))
        tokenizer = _cfg_get(encoders_cfg, "clip_tokenizer", LOCAL_CLIP_ARCH)
        allow_download = bool(_cfg_get(encoders_cfg, "allow_download", True))

        sync: Synchformer | None = None
        if profile == "tiny":
            clip_path = ensure_tiny_clip(cache_dir)
            clip = ClipEncoder.from_file(TINY_CLIP_ARCH, clip_path, tokenizer)
            identity = f"{TINY_CLIP_ARCH}|{_file_identity(clip_path)}"
            if need_video:
                sync = load_synchformer(ensure_tiny_synchformer(cache_dir), SynchformerConfig.tiny())
            return cls(clip, sync, device=device, cache_dir=cache_dir, clip_identity=identity)

        # Resolve the Synchformer file before loading CLIP so a missing weight fails fast.
        sync_path = None
        if need_video:
            sync_path = resolve_weight(
                "Synchformer",
                configured_path=_cfg_get(encoders_cfg, "synchformer_ckpt"),
                cache_dir=cache_dir,
                filename=SYNCHFORMER_FILENAME,
                url=SYNCHFORMER_URL,
                allow_download=allow_download,
            )
        clip_model = _cfg_get(encoders_cfg, "clip_model", HUB_PREFIX + "apple/DFN5B-CLIP-ViT-H-14-384")
        pretrained = _cfg_get(encoders_cfg, "clip_pretrained")
        if pretrained:
            clip_path = resolve_weight("CLIP", configured_path=pretrained, cache_dir=cache_dir, filename=Path(pretrained).name)
            arch = LOCAL_CLIP_ARCH if clip_model.startswith(HUB_PREFIX) else clip_model
            clip = ClipEncoder.from_file(arch, clip_path, tokenizer)
            identity = f"{arch}|{_file_identity(clip_path)}"
        elif clip_model.startswith(HUB_PREFIX):
            clip = ClipEncoder.from_hub(clip_model, tokenizer, allow_download=allow_download)
            identity = clip_model
        else:
            raise WeightsError(
                f"encoders.clip_model={clip_model!r} is not an hf-hub: id and encoders.clip_pretrained "
                "is not set: name a local open_clip checkpoint file in encoders.clip_pretrained"
            )
        if sync_path is not None:
            sync = load_synchformer(sync_path)
        return cls(clip, sync, device=device, cache_dir=cache_dir, clip_identity=identity)

    # ------------------------------------------------------------------------- encoding
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        # bf16 autocast on CUDA (as the reference extraction), plain fp32 on CPU.
        with torch.no_grad():  # plain tensors out (inference tensors refuse later in-place edits)
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    yield
            else:
                yield

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """list of B captions -> (B, 77, text_dim), each token vector L2-normalised."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not a single string")
        with self._inference():
            out = self.clip.encode_text(list(texts))
        return out.float().cpu()

    def encode_clip_frames(self, frames: Tensor) -> Tensor:
        """(B, T, 3, 384, 384) in [0, 1] -> (B, T, clip_dim) unit vectors."""
        with self._inference():
            out = self.clip.encode_frames(frames.to(self.device, torch.float32))
        return out.float().cpu()

    def encode_sync(self, segments: Tensor) -> Tensor:
        """(B, S, 16, 3, 224, 224) in [-1, 1] -> (B, 8*S, 768), segment-major."""
        if self.synchformer is None:
            raise RuntimeError("FeatureEncoders was built with need_video=False: no Synchformer loaded")
        with self._inference():
            out = self.synchformer(segments.to(self.device, torch.float32))
        b, s = out.shape[:2]
        return out.float().cpu().reshape(b, s * SYNC_TOKENS_PER_SEGMENT, -1)

    def empty_string_cache_path(self) -> Path:
        digest = hashlib.sha1(self.clip_identity.encode()).hexdigest()[:16]
        label = sanitize_filename(self.clip_identity.split("|")[0])
        return self.cache_dir / "empty_string" / f"{label}-{digest}.pth"

    def empty_string_feature(self) -> Tensor:
        """(77, text_dim): the caption pipeline on "" (per-token normalised, docs/design.md §4),
        cached on disk per CLIP model and in memory."""
        if self._empty is None:
            path = self.empty_string_cache_path()
            feat = None
            if path.is_file():
                with contextlib.suppress(CheckpointError):
                    feat = safe_torch_load(path, what="empty-string feature")
                if not isinstance(feat, Tensor) or tuple(feat.shape) != (self.clip.context_length, self.text_dim):
                    feat = None  # stale or foreign file: recompute and overwrite
            if feat is None:
                feat = self.encode_text([""])[0].contiguous()
                atomic_torch_save(feat, path)
            self._empty = feat.float()
        return self._empty.clone()
