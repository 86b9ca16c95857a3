"""open_clip wrapper: per-token text features and per-frame image features (docs/method.md §6.3-§6.4)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wavflow.errors import WeightsError
from wavflow.features.weights import hf_offline, resolve_hub_files

# OpenAI CLIP normalisation, applied to frames in [0, 1] (docs/method.md §6.2).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HUB_PREFIX = "hf-hub:"


class ClipEncoder(nn.Module):
    """Holds an open_clip CLIP model and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_hub(
        cls,
        hub_id: str,
        tokenizer_name: str,
        *,
        allow_download: bool = True,
        hf_cache_dir: str | os.PathLike | None = None,
    ) -> "ClipEncoder":
        """`create_model_from_pretrained("hf-hub:<id>")`; files are resolved first so a
        missing weight is one prompt WeightsError and open_clip never half-loads."""
        hub_id = hub_id.removeprefix(HUB_PREFIX)
        resolve_hub_files(hub_id, allow_download=allow_download, hf_cache_dir=hf_cache_dir)
        try:
            with hf_offline():  # everything is cached now: no second round of requests
                model, _ = open_clip.create_model_from_pretrained(
                    HUB_PREFIX + hub_id, cache_dir=str(hf_cache_dir) if hf_cache_dir else None
                )
        except Exception as exc:
            raise WeightsError(f"CLIP weights hf-hub:{hub_id} could not be loaded: {exc}") from exc
        return cls(model, open_clip.get_tokenizer(tokenizer_name))

    @classmethod
    def from_file(cls, arch: str, path: str | os.PathLike, tokenizer_name: str) -> "ClipEncoder":
        """`create_model_and_transforms(arch, pretrained=<file>)` (strict load)."""
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"CLIP weights file {path} does not exist")
        try:
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(path))
        except Exception as exc:
            raise WeightsError(f"CLIP weights {path} could not be loaded into '{arch}': {exc}") from exc
        return cls(model, open_clip.get_tokenizer(tokenizer_name))

    # ---------------------------------------------------------------------------- encoding
    @property
    def text_dim(self) -> int:
        return int(self.model.ln_final.normalized_shape[0])

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def image_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def device(self) -> torch.device:
        return self.model.positional_embedding.device

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts))

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Patched encode_text: per-token hidden states after ln_final, L2-normalised per token,
        no pooling and no text projection (docs/method.md §6.4). (B, 77) -> (B, 77, width)."""
        m = self.model
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens.to(self.device)).to(cast_dtype)
        x = x + m.positional_embedding.to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        return F.normalize(x, dim=-1)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        return self.encode_tokens(self.tokenize(texts))

    def normalize_frames(self, frames: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> OpenAI-CLIP-normalised."""
        return (frames - self.mean.to(frames.dtype)).div_(self.std.to(frames.dtype))  # one new tensor, not two

    def encode_frames(self, frames: Tensor) -> Tensor:
        """(B, T, 3, H, W) in [0, 1] -> (B, T, D) unit vectors (encode_image, normalize=True)."""
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"CLIP frames must be (B, T, 3, H, W), got {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        x = self.normalize_frames(frames.reshape(b * t, *frames.shape[2:]).to(self.device))
        return self.model.encode_image(x, normalize=True).reshape(b, t, -1)
