"""The reference presets reproduce tests/data/wavflow_*.json key for key (built on `meta`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wavflow.errors import ConfigError
from wavflow.model import NON_PERSISTENT_BUFFERS, PRESETS, build_model

FORMATS = Path(__file__).resolve().parent / "data"  # checked-in reference layouts (tests/data/README.md)


def _meta_model(name: str, **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


def _manifest(model) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]


def _reference(file: str) -> dict:
    return json.loads((FORMATS / file).read_text())  # a missing file is a failure, never a skip


@pytest.mark.parametrize(
    "name, file, n_params, n_trainable, n_keys",
    [
        ("medium_16k", "wavflow_medium_16k.json", 623_813_064, 623_734_216, 249),
        ("large_44k", "wavflow_large_44k.json", 1_032_009_288, 1_031_930_440, 414),
    ],
)
def test_reference_manifest(name, file, n_params, n_trainable, n_keys):
    ref = _reference(file)
    model = _meta_model(name)
    expected = [(e["key"], e["shape"], e["dtype"]) for e in ref["state_dict"]]
    assert _manifest(model) == expected  # ordered keys, shapes, dtypes
    assert len(expected) == n_keys == ref["num_state_dict_keys"]
    assert sum(p.numel() for p in model.parameters()) == n_params == ref["param_count"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n_trainable == ref["trainable_param_count"]
    assert not model.empty_string_feat.requires_grad
    buffers = {k: (list(b.shape), str(b.dtype).removeprefix("torch.")) for k, b in model.named_buffers()}
    assert buffers == {b["key"]: (b["shape"], b["dtype"]) for b in ref["non_persistent_buffers"]}
    assert not set(NON_PERSISTENT_BUFFERS) & set(model.state_dict())
    assert model.latent_seq_len == ref["latent_seq_len"]
    assert (model.clip_seq_len, model.sync_seq_len, model.text_seq_len) == (
        ref["clip_seq_len"], ref["sync_seq_len"], ref["text_seq_len"])


@pytest.mark.parametrize("a, b", [("medium_16k", "medium_44k"), ("large_44k", "large_16k")])
def test_16k_and_44k_share_architecture(a, b):
    ma, mb = _meta_model(a), _meta_model(b)
    assert _manifest(ma) == _manifest(mb)
    assert (ma.latent_seq_len, mb.latent_seq_len) in {(640, 1764), (1764, 640)}
    assert mb.clip_rot.shape == (1, 64, 32, 2, 2)


def test_latent_seq_len_override_sets_rot_buffer():
    model = _meta_model("medium_16k", latent_seq_len=1000)
    assert model.latent_rot.shape == (1, 1000, 32, 2, 2)
    assert "latent_rot" not in model.state_dict()


def test_pinned_shapes_conflict_raises_config_error():
    with pytest.raises(ConfigError, match="clip_seq_len"):
        _meta_model("medium_16k", clip_seq_len=16)
    with pytest.raises(ConfigError, match="text_dim=512"):
        _meta_model("large_44k", text_dim=512)
    # Equal values are not a conflict.
    assert _meta_model("medium_16k", clip_seq_len=64, sync_dim=768).clip_seq_len == 64
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        build_model("huge")


def test_cpu_presets_structure():
    for name in ("tiny_16k", "small_16k"):
        preset = PRESETS[name]
        assert preset.hidden_dim // preset.num_heads == 64
        assert preset.joint_depth >= 2 and preset.fused_depth >= 1
        assert preset.pinned() == {}
        model = _meta_model(name, clip_seq_len=16, sync_seq_len=40, text_seq_len=77, clip_dim=32)
        assert model.clip_rot.shape[1] == 16 and model.empty_clip_feat.shape == (1, 32)
        keys = model.state_dict().keys()
        last = preset.joint_depth - 1
        assert f"joint_blocks.{last}.clip_block.linear1.weight" not in keys
        assert f"joint_blocks.{last - 1}.clip_block.linear1.weight" in keys
    tiny = sum(p.numel() for p in _meta_model("tiny_16k").parameters())
    small = sum(p.numel() for p in _meta_model("small_16k").parameters())
    assert 1e6 < tiny < small < 3e7


def test_build_model_from_config_derives_n():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({
        "model": {"name": "tiny_16k"},
        "data": {"target_sample_rate": 16000, "audio_duration": 2.0, "audio_dim": 200,
                 "clip_seq_len": 16, "sync_seq_len": 40, "text_seq_len": 77,
                 "clip_dim": 1024, "sync_dim": 768, "text_dim": 1024},
    })
    from wavflow.model import build_model_from_config

    with torch.device("meta"):
        model = build_model_from_config(cfg)
    assert (model.latent_seq_len, model.clip_seq_len, model.sync_seq_len) == (160, 16, 40)
    assert model.preset_name == "tiny_16k"
    cfg.model.name = "medium_44k"
    cfg.data.target_sample_rate = 44100
    with pytest.raises(ConfigError, match="clip_seq_len"):
        with torch.device("meta"):
            build_model_from_config(cfg)
