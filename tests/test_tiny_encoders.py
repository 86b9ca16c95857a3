"""The built-in `tiny` encoders: features that carry the pixels and the caption, by construction,
and never anything else (labels, onsets or any other metadata of a CSV row)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.media import sine, write_video, write_wav
from tests.test_extract import SR, SHORT, write_csv
from wavflow.config import load_config
from wavflow.features import extract
from wavflow.features.encoders import FeatureEncoders, encoder_identity
from wavflow.io_utils import safe_torch_load

BACKGROUND = (14, 14, 22)


@pytest.fixture(scope="module")
def tiny(wavflow_cache_dir) -> FeatureEncoders:
    return FeatureEncoders.from_config({"profile": "tiny", "cache_dir": str(wavflow_cache_dir)}, need_video=True)


def _frame(colour=None, at=(40, 40), size=384, square=80) -> torch.Tensor:
    img = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone() / 255
    if colour is not None:
        y, x = at
        img[:, y:y + square, x:x + square] = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255
    return img


def test_text_features_hold_the_caption_at_every_position(tiny):
    feats = tiny.encode_text(["a low hum", "two sharp clicks", "a low hum", ""])
    assert feats.shape == (4, 77, 1024)
    torch.testing.assert_close(feats[0], feats[2])  # a pure function of the tokens
    last = F.normalize(feats[:, -1], dim=-1)  # a padding position, far behind every caption
    assert float(last[0] @ last[1]) < 0.7  # different captions stay apart there
    assert float(last[0] @ last[3]) < 0.9  # and apart from the empty string
    per_clip = F.normalize(feats.reshape(4, -1), dim=-1)
    assert float(per_clip[0] @ per_clip[1]) < 0.8


def test_clip_frames_follow_colour_content(tiny):
    frames = torch.stack([_frame(), _frame((255, 40, 40)), _frame((255, 40, 40), at=(200, 250)),
                          _frame((0, 220, 70))])[None]
    f = tiny.encode_clip_frames(frames)[0]
    assert f.shape == (4, 1024)
    cos = f @ f.T
    assert float(cos[1, 2]) > 0.999  # same shape colour elsewhere on screen: same features
    assert float(cos[0, 1]) < 0.95 and float(cos[1, 3]) < 0.9 and float(cos[0, 3]) < 0.95


def test_sync_tokens_change_exactly_where_a_shape_appears(tiny):
    blank = torch.stack([_frame(size=224, square=48)] * 16)
    shown = blank.clone()
    shown[6:] = _frame((0, 220, 70), size=224, square=48)  # from frame 6 = tubelet 3 on
    segs = torch.stack([blank, shown])[:, None] * 2 - 1  # (B=2, S=1, 16, 3, 224, 224) in [-1, 1]
    tokens = tiny.encode_sync(segs)
    assert tokens.shape == (2, 8, 768)
    diff = (tokens[1] - tokens[0]).norm(dim=-1) / tokens[0].norm(dim=-1).mean()
    assert diff[:3].max() < 1e-3  # tubelets before the shape: unchanged
    assert diff[3:].min() > 0.2  # every tubelet showing it (5 % of the area) clearly changed
    # half a tubelet of the shape gives half the change: the features are linear in the pixels
    half = blank.clone()
    half[7:] = shown[7:]
    t_half = tiny.encode_sync(torch.stack([half])[:, None] * 2 - 1)[0]
    ratio = (t_half[3] - tokens[0, 3]).norm() / (tokens[1, 3] - tokens[0, 3]).norm()
    assert 0.45 < float(ratio) < 0.55


def test_identity_names_the_profile():
    assert encoder_identity({"profile": "tiny"}).startswith("tiny-v")
    ident = encoder_identity({"profile": "default", "clip_pretrained": "/w/clip.bin", "synchformer_ckpt": None})
    assert ident == "default|clip=clip.bin|synchformer=synchformer_state_dict.pth"


def test_builtin_encoders_never_read_labels_or_onsets(tmp_path: Path, wavflow_cache_dir) -> None:
    """Two rows with identical pixels and captions but different metadata: identical features."""
    data = tmp_path / "data"
    write_wav(data / "a.wav", sine(440.0, 2.0, SR), SR)
    write_video(data / "v1.mp4", seconds=2.0, fps=25, size=(96, 96),
                frame_fn=lambda t: np.full((96, 96, 3), 30 if t < 0.7 else 200, np.uint8))
    shutil.copy(data / "v1.mp4", data / "v2.mp4")
    csv = write_csv(data / "in.csv", ["id", "audio_path", "video_path", "caption", "label", "onsets"], [
        ["x1", "a.wav", "v1.mp4", "three sharp clicks", "clicks", "0.28 0.7"],
        ["x2", "a.wav", "v2.mp4", "three sharp clicks", "chirp", "1.1"],
    ])
    cfg = load_config("extract_vt2a.yaml", [
        "encoders.profile=tiny", f"encoders.cache_dir={wavflow_cache_dir}", f"data.csv_path={csv}",
        f"data.data_root={data}", f"output.pth_dir={tmp_path / 'pth'}", f"output.csv_path={tmp_path / 'train.csv'}",
        "extraction.num_workers=0", *SHORT], validate=False)
    result = extract.run_extraction(cfg)
    assert result.exit_code == 0
    a, b = (safe_torch_load(tmp_path / "pth" / f"{i}.pth") for i in ("x1", "x2"))
    for key in ("clip_features", "sync_features", "text_features"):
        assert torch.equal(a[key], b[key]), key
    # the end-of-run report used the metadata columns (and only it)
    import json

    summary = json.loads(result.summary_path.read_text())
    assert "nn_class_accuracy" not in summary["feature_report"]["streams"]["clip_features"]  # 2 clips: too few
    assert (tmp_path / "pth" / "feature_stats.pt").is_file()
