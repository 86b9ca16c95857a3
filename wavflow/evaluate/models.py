"""The evaluation networks, built by their published packages and loaded from local files only.

| key         | package (network)                         | file (default name in the cache dir)          |
|-------------|-------------------------------------------|-----------------------------------------------|
| passt       | hear21passt (PaSST-S SWA, AudioSet)       | passt-s-f128-p16-s10-ap.476-swa.pt            |
| panns       | panns_inference (Cnn14, 16 kHz)           | Cnn14_16k_mAP=0.438.pth                       |
| vggish      | torchvggish (VGGish)                      | vggish-10086976.pth                           |
| imagebind   | imagebind-unofficial (ImageBind-Huge)     | imagebind_huge.pth                            |
| clap        | laion_clap (HTSAT-base + RoBERTa)         | music_speech_audioset_epoch_15_esc_89.98.pt   |
| synchformer | this project (visual + audio + offset)    | synchformer_state_dict.pth                    |

No package is allowed to download: each model is constructed without pretrained weights and the
state dict is read with the weights-only loader. A missing file is a WeightsError that names the
file, where to get it and where to put it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from huggingface_hub import constants
from torch import Tensor, nn

from wavflow.errors import CheckpointError, WeightsError
from wavflow.features.weights import CACHE_ENV, SYNCHFORMER_FILENAME, SYNCHFORMER_URL, resolve_cache_dir
from wavflow.io_utils import safe_torch_load


@dataclass(frozen=True)
class WeightSpec:
    key: str
    title: str
    filename: str
    source: str


WEIGHTS: dict[str, WeightSpec] = {
    "passt": WeightSpec("passt", "PaSST", "passt-s-f128-p16-s10-ap.476-swa.pt",
                        "https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/passt-s-f128-p16-s10-ap.476-swa.pt"),
    "panns": WeightSpec("panns", "PANNs Cnn14 (16 kHz)", "Cnn14_16k_mAP=0.438.pth",
                        "https://zenodo.org/record/3987831/files/Cnn14_16k_mAP%3D0.438.pth"),
    "vggish": WeightSpec("vggish", "VGGish", "vggish-10086976.pth",
                         "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"),
    "imagebind": WeightSpec("imagebind", "ImageBind-Huge", "imagebind_huge.pth",
                            "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"),
    "clap": WeightSpec("clap", "LAION-CLAP (HTSAT-base)", "music_speech_audioset_epoch_15_esc_89.98.pt",
                       "https://huggingface.co/lukewys/laion_clap/resolve/main/music_speech_audioset_epoch_15_esc_89.98.pt"),
    "synchformer": WeightSpec("synchformer", "Synchformer", SYNCHFORMER_FILENAME, SYNCHFORMER_URL),
}


def weight_path(key: str, configured: str | None, cache_dir: str | None) -> Path:
    """The configured file (must exist), else `<cache>/<default name>`; never downloads."""
    spec = WEIGHTS[key]
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise WeightsError(f"{spec.title} weights: configured file {path} (weights.{key}) does not exist. "
                               f"Get it from {spec.source}")
        return path
    path = resolve_cache_dir(cache_dir) / spec.filename
    if not path.is_file():
        raise WeightsError(
            f"{spec.title} weights not found: {path}. Download {spec.source} and place it at {path} "
            f"(or set weights.{key}=FILE, or weights.cache_dir / ${CACHE_ENV})"
        )
    return path


def _load_state(path: Path, title: str, unwrap: tuple[str, ...] = ()) -> dict[str, Tensor]:
    try:
        state = safe_torch_load(path, what=f"{title} weights")
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from exc
    for key in unwrap:  # training checkpoints keep the weights under e.g. "model"
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{title} weights {path} hold a {type(state).__name__}, not a state dict")
    return dict(state)


def _load_into(model: nn.Module, state: Mapping[str, Tensor], path: Path, title: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise WeightsError(f"{title} weights {path} do not match the network: {' '.join(first)}") from exc


# ----------------------------------------------------------------------------- PaSST
class PasstNet(nn.Module):
    """hear21passt's PaSST-S with its mel front end: 32 kHz (B, 320000) -> 527 logits, 768 embedding."""

    SAMPLE_RATE = 32000
    NUM_SAMPLES = 320000  # 10 s: clips are zero-padded (or cut) to this
    NUM_CLASSES = 527

    def __init__(self) -> None:
        super().__init__()
        # optional evaluation package (requirements.txt): imported only when this network is loaded
        from hear21passt.models.passt import get_model
        from hear21passt.models.preprocess import AugmentMelSTFT  # optional: as above
        from hear21passt.wrapper import PasstBasicWrapper  # optional: as above

        # The package's "basic model" front end (hear21passt.base.get_basic_model's arguments),
        # built here without its pretrained=True download.
        mel = AugmentMelSTFT(n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192,
                             htk=False, fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000)
        with contextlib.redirect_stdout(io.StringIO()):  # get_model prints the whole network
            net = get_model(arch="passt_s_swa_p16_128_ap476", pretrained=False)
        self.wrapper = PasstBasicWrapper(mel=mel, net=net, mode="all")

    @classmethod
    def from_file(cls, path: Path) -> "PasstNet":
        # optional evaluation package (requirements.txt): imported only when this network is loaded
        from hear21passt.models.passt import checkpoint_filter_fn

        model = cls()
        state = checkpoint_filter_fn(_load_state(path, "PaSST"), model.wrapper.net)
        _load_into(model.wrapper.net, state, path, "PaSST")
        return model.eval().requires_grad_(False)

    def forward(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        n = wave.shape[-1]
        wave = wave[..., : self.NUM_SAMPLES] if n >= self.NUM_SAMPLES else nn.functional.pad(wave, (0, self.NUM_SAMPLES - n))
        with contextlib.redirect_stdout(io.StringIO()):  # PaSST prints tensor shapes on its first call
            out = self.wrapper(wave)
        return out[:, : self.NUM_CLASSES], out[:, self.NUM_CLASSES:]


# ----------------------------------------------------------------------------- PANNs
class PannsNet(nn.Module):
    """panns_inference's Cnn14 at 16 kHz: (B, T) -> 527 logits (pre-sigmoid), 2048 embedding."""

    SAMPLE_RATE = 16000

    def __init__(self) -> None:
        super().__init__()
        # optional evaluation package (requirements.txt): imported only when this network is loaded
        from panns_inference.models import Cnn14

        self.net = Cnn14(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50, fmax=8000,
                         classes_num=527)

    @classmethod
    def from_file(cls, path: Path) -> "PannsNet":
        model = cls()
        _load_into(model.net, _load_state(path, "PANNs", unwrap=("model",)), path, "PANNs")
        return model.eval().requires_grad_(False)

    def forward(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.net(wave)["embedding"]  # relu(fc1(.)); dropout is off in eval
        return self.net.fc_audioset(emb), emb  # the logits under the package's sigmoid


# ----------------------------------------------------------------------------- VGGish
class VggishNet(nn.Module):
    """torchvggish's VGGish: 16 kHz waveform -> (frames, 128), one row per 0.96 s example.

    The embedding is taken before the package's final ReLU and without PCA post-processing,
    as MMAudio's evaluation does for FD_VGG.
    """

    SAMPLE_RATE = 16000

    def __init__(self) -> None:
        super().__init__()
        # optional evaluation package (requirements.txt): imported only when this network is loaded
        from torchvggish.torchvggish import _vgg

        self.net = _vgg(postprocess=False)

    @classmethod
    def from_file(cls, path: Path) -> "VggishNet":
        model = cls()
        _load_into(model.net, _load_state(path, "VGGish"), path, "VGGish")
        return model.eval().requires_grad_(False)

    def forward(self, wave: Tensor) -> Tensor:
        # optional evaluation package (requirements.txt): imported only when this network is loaded
        from torchvggish.vggish_input import waveform_to_examples

        examples = waveform_to_examples(wave.detach().cpu().double().numpy(), self.SAMPLE_RATE, return_tensor=True)
        x = self.net.features(examples.to(wave.device, torch.float32))
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # the package's channel-last flattening
        return self.net.embeddings[:-1](x)  # every layer but the last ReLU


# ----------------------------------------------------------------------------- ImageBind
def import_imagebind() -> types.ModuleType:
    """Import the imagebind package on current setuptools / torchvision.

    It imports `pkg_resources` (gone from setuptools >= 81; used only to find its BPE file) and,
    through pytorchvideo, `torchvision.transforms.functional_tensor` (renamed `_functional_tensor`).
    Both are aliased here when missing; nothing else is patched.
    """
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")

        def resource_filename(package: str, name: str) -> str:
            spec = importlib.util.find_spec(package)
            assert spec is not None and spec.origin is not None
            return os.path.join(os.path.dirname(spec.origin), name)

        shim.resource_filename = resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    if "torchvision.transforms.functional_tensor" not in sys.modules:
        try:  # torchvision costs ~1.5 s to import (torch._dynamo): only here, when ImageBind is loaded
            importlib.import_module("torchvision.transforms.functional_tensor")
        except ImportError:
            # lazy (see above): the renamed private module, aliased for pytorchvideo (via imagebind)
            import torchvision.transforms._functional_tensor as ft

            sys.modules["torchvision.transforms.functional_tensor"] = ft
    # optional evaluation package (requirements.txt): imported only when ImageBind is loaded
    import imagebind

    return imagebind


IMAGEBIND_AUDIO_MEAN, IMAGEBIND_AUDIO_STD = -4.268, 9.138
IMAGEBIND_VIDEO_FPS = 0.5
IMAGEBIND_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageBindNet(nn.Module):
    """imagebind's ImageBindModel (Huge unless `arch` gives other constructor arguments)."""

    SAMPLE_RATE = 16000

    def __init__(self, arch: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        import_imagebind()
        # optional evaluation package (requirements.txt): imported only when this network is loaded
        from imagebind.models import imagebind_model

        self.net = imagebind_model.ImageBindModel(**arch) if arch else imagebind_model.imagebind_huge(pretrained=False)

    @classmethod
    def from_file(cls, path: Path, arch: Mapping[str, Any] | None = None) -> "ImageBindNet":
        model = cls(arch)
        _load_into(model.net, _load_state(path, "ImageBind"), path, "ImageBind")
        return model.eval().requires_grad_(False)

    def audio(self, wave: Tensor) -> Tensor:
        """16 kHz (T,) -> (1, D): three 2 s clips, 128-bin kaldi fbank of 204 frames, averaged."""
        # optional evaluation packages (requirements.txt, via imagebind): only ImageBind uses them
        from imagebind.data import get_clip_timepoints, waveform2melspec
        from pytorchvideo.data.clip_sampling import ConstantClipsPerVideoSampler  # optional: as above

        sampler = ConstantClipsPerVideoSampler(clip_duration=2, clips_per_video=3)
        sr = self.SAMPLE_RATE
        clips = []
        for start, end in get_clip_timepoints(sampler, wave.shape[-1] / sr):
            part = wave[None, int(start * sr): int(end * sr)].clone().cpu()
            mel = waveform2melspec(part, sr, 128, 204)
            clips.append((mel - IMAGEBIND_AUDIO_MEAN) / IMAGEBIND_AUDIO_STD)
        x = torch.stack(clips)[None].to(wave.device)  # (1, 3, 1, 128, 204)
        return self.net({"audio": x})["audio"]

    def video(self, frames: Tensor) -> Tensor:
        """(T, 3, H, W) float [0, 1] frames at 0.5 fps -> (1, D): 3 spatial crops x (T-1) frame pairs."""
        # optional evaluation package (requirements.txt): imported only when ImageBind is used
        from imagebind.data import SpatialCrop
        # lazy: torchvision costs ~1.5 s to import (it pulls torch._dynamo); only ImageBind's video needs it
        from torchvision.transforms.v2 import functional as TF

        x = TF.normalize(frames, CLIP_MEAN, CLIP_STD)
        crops = torch.stack(SpatialCrop(IMAGEBIND_SIZE, 3)([x]))  # (3, T, 3, 224, 224)
        pairs = torch.cat([crops[:, i: i + 2] for i in range(crops.shape[1] - 1)], dim=0)  # (3(T-1), 2, C, H, W)
        return self.net({"vision": pairs.permute(0, 2, 1, 3, 4)[None]})["vision"]


# ----------------------------------------------------------------------------- LAION-CLAP
CLAP_HF_REPOS = ("roberta-base", "bert-base-uncased", "facebook/bart-base")


class ClapNet(nn.Module):
    """laion_clap's CLAP_Module (HTSAT-base audio, RoBERTa text): 48 kHz audio / captions -> 512-d.

    laion_clap builds its text encoder and tokenizers with transformers' from_pretrained on
    the Hugging Face ids in CLAP_HF_REPOS, at import and construction: they must be in the
    Hugging Face cache (`clap_hf_home`, else $HF_HOME); the evaluator runs offline.
    """

    SAMPLE_RATE = 48000

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module = module

    @classmethod
    def from_file(cls, path: Path, amodel: str = "HTSAT-base", hf_home: str | None = None,
                  device: str = "cpu") -> "ClapNet":
        with _hub_offline(hf_home):
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    # optional evaluation package (requirements-nodeps.txt): imported only when CLAP is loaded
                    import laion_clap

                    module = laion_clap.CLAP_Module(enable_fusion=False, amodel=amodel, device=device)
            except OSError as exc:
                raise WeightsError(_clap_hub_message(hf_home, exc)) from exc
        tok = module.tokenize
        # transformers 5 quietly builds a specials-only tokenizer when the files are absent
        if len(tok) <= len(set(tok.all_special_tokens)):
            raise WeightsError(_clap_hub_message(hf_home, RuntimeError("roberta-base tokenizer files not found")))
        state = _load_state(path, "LAION-CLAP", unwrap=("state_dict",))
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        # newer transformers no longer keep RoBERTa's position_ids buffer in the state dict
        expected = set(module.model.state_dict())
        state = {k: v for k, v in state.items() if not (k.endswith("position_ids") and k not in expected)}
        _load_into(module.model, state, path, "LAION-CLAP")
        return cls(module.eval().requires_grad_(False))

    def audio(self, wave: Tensor) -> Tensor:
        """48 kHz (B, T) -> (B, 512)."""
        return self.module.get_audio_embedding_from_data(wave, use_tensor=True)

    def text(self, captions: list[str]) -> Tensor:
        return self.module.get_text_embedding(captions, use_tensor=True)


def _clap_hub_message(hf_home: str | None, exc: BaseException) -> str:
    where = f"{hf_home}/hub" if hf_home else "the default Hugging Face cache ($HF_HOME/hub)"
    return (
        f"LAION-CLAP could not be built offline: its text encoder and tokenizer (hf id roberta-base; "
        f"laion_clap also asks for {', '.join(CLAP_HF_REPOS[1:])}) must be in {where}. On a machine with "
        f"network run `hf download roberta-base` (and the others) and copy the cache there, then set "
        f"weights.clap_hf_home ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    )


@contextlib.contextmanager
def _hub_offline(hf_home: str | None):
    """Hugging Face lookups read the local cache only (and `hf_home`'s, when given)."""
    saved = (constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE)
    constants.HF_HUB_OFFLINE = True
    if hf_home:
        constants.HF_HUB_CACHE = str(Path(hf_home).expanduser() / "hub")
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = saved


# ----------------------------------------------------------------------------- registry
LOADERS: dict[str, Callable[..., nn.Module]] = {
    "passt": PasstNet.from_file,
    "panns": PannsNet.from_file,
    "vggish": VggishNet.from_file,
}
