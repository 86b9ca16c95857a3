"""The learned empty-caption feature a training run starts from (configs/train.yaml,
model.empty_string_feat_path): a given file, the extraction's empty_string.pt, or the text
encoder's own."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from wavflow.errors import FeatureError
from wavflow.io_utils import safe_torch_load
from wavflow.train.dataset import FeatureShapes, TrainRow


def load_empty_string_feat(path: Path, shape: tuple[int, int], what: str) -> torch.Tensor:
    feat = safe_torch_load(path, what=what)
    if not isinstance(feat, torch.Tensor):
        raise FeatureError(f"{what} {path} does not hold a tensor")
    if feat.dim() == 3 and feat.shape[0] == 1:
        feat = feat[0]
    if tuple(feat.shape) != shape or not feat.is_floating_point():
        raise FeatureError(f"{what} {path} has shape {tuple(feat.shape)} ({feat.dtype}), expected a float {shape}")
    return feat.float()


def resolve_empty_string_feat(cfg: DictConfig, first_row: TrainRow) -> tuple[torch.Tensor, str]:
    """The learned empty-caption feature and where it came from (see configs/train.yaml)."""
    shape = FeatureShapes.from_data_config(cfg.data).text
    if cfg.model.empty_string_feat_path:
        path = Path(str(cfg.model.empty_string_feat_path)).expanduser()
        return load_empty_string_feat(path, shape, "model.empty_string_feat_path"), str(path)
    beside = first_row.features_path.parent / "empty_string.pt"
    if beside.is_file():
        return load_empty_string_feat(beside, shape, "empty string feature"), str(beside)
    from wavflow.features.encoders import FeatureEncoders  # lazy: open_clip (~4 s), rarely needed

    encoders = FeatureEncoders.from_config(cfg.encoders, need_video=False)
    feat = encoders.empty_string_feature().detach().float().cpu()
    if feat.dim() == 3 and feat.shape[0] == 1:
        feat = feat[0]
    if tuple(feat.shape) != shape:
        raise FeatureError(
            f"the text encoder (encoders.profile={cfg.encoders.profile}) gives an empty-string feature of shape "
            f"{tuple(feat.shape)}, but data.text_seq_len/text_dim ask for {shape}"
        )
    return feat, f"computed by the text encoder (encoders.profile={cfg.encoders.profile}; no {beside})"
