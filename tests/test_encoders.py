"""FeatureEncoders with the tiny profile: shapes, normalisation, caching, determinism, T2A."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wavflow.errors import ConfigError, WeightsError
from wavflow.features import encoders as enc_mod
from wavflow.features.encoders import (
    TINY_CLIP_ARCH,
    TINY_CLIP_FILENAME,
    TINY_SYNC_FILENAME,
    FeatureEncoders,
    ensure_tiny_clip,
    ensure_tiny_synchformer,
)
from wavflow.features.synchformer import Synchformer

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def tiny_cfg(cache_dir: Path | None = None, **extra) -> dict:
    return {"profile": "tiny", "clip_tokenizer": "ViT-H-14-378-quickgelu", "cache_dir": cache_dir,
            "allow_download": False, **extra}


@pytest.fixture(scope="module")
def encoders(wavflow_cache_dir: Path) -> FeatureEncoders:
    return FeatureEncoders.from_config(tiny_cfg(), need_video=True)  # cache from $WAVFLOW_CACHE_DIR


def test_dims_are_the_real_ones(encoders: FeatureEncoders, wavflow_cache_dir: Path) -> None:
    assert (encoders.text_dim, encoders.clip_dim, encoders.sync_dim) == (1024, 1024, 768)
    assert (wavflow_cache_dir / TINY_CLIP_FILENAME).is_file()
    assert (wavflow_cache_dir / TINY_SYNC_FILENAME).is_file()


def test_text_features(encoders: FeatureEncoders) -> None:
    caps = ["A dog barks twice.", "rain on a tin roof", "A dog barks twice."]
    feats = encoders.encode_text(caps)
    assert feats.shape == (3, 77, 1024) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3, 77), atol=1e-5, rtol=0)
    assert torch.equal(feats[0], feats[2])
    assert not torch.allclose(feats[0], feats[1])
    # The per-token features are ln_final outputs: open_clip's own pooled text embedding is the
    # text projection of the EOT token (argmax id), so both must agree in direction.
    model = encoders.clip.model
    tokens = encoders.clip.tokenize(caps)
    eot = tokens.argmax(dim=-1)
    with torch.no_grad():
        pooled = model.encode_text(tokens, normalize=True)
        ours = F.normalize(feats[torch.arange(3), eot] @ model.text_projection, dim=-1)
    torch.testing.assert_close(ours, pooled, atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError):
        encoders.encode_text("not a list")


def test_empty_string_feature_is_normalised_and_cached(encoders: FeatureEncoders) -> None:
    path = encoders.empty_string_cache_path()
    path.unlink(missing_ok=True)
    encoders._empty = None
    feat = encoders.empty_string_feature()
    assert feat.shape == (77, 1024)
    assert torch.equal(feat, encoders.encode_text([""])[0])
    torch.testing.assert_close(feat.norm(dim=-1), torch.ones(77), atol=1e-5, rtol=0)
    assert path.is_file() and torch.equal(torch.load(path, weights_only=True), feat)
    # a fresh instance reads the file instead of encoding
    encoders._empty = None
    torch.save(feat * 0 + 0.5, path)  # marker content proves the file is used
    assert torch.equal(encoders.empty_string_feature(), torch.full((77, 1024), 0.5))
    path.unlink()
    encoders._empty = None
    assert torch.equal(encoders.empty_string_feature(), feat)


def test_clip_frames_normalised_with_openai_stats(encoders: FeatureEncoders) -> None:
    torch.manual_seed(0)
    frames = torch.rand(2, 3, 3, 384, 384)
    feats = encoders.encode_clip_frames(frames)
    assert feats.shape == (2, 3, 1024) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2, 3), atol=1e-5, rtol=0)
    manual_in = ((frames - OPENAI_MEAN) / OPENAI_STD).reshape(6, 3, 384, 384)
    with torch.no_grad():
        manual = encoders.clip.model.encode_image(manual_in)
    torch.testing.assert_close(feats, F.normalize(manual, dim=-1).reshape(2, 3, 1024), atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # without the normalisation the result differs
        raw = F.normalize(encoders.clip.model.encode_image(frames.reshape(6, 3, 384, 384)), dim=-1)
    assert not torch.allclose(raw.reshape(2, 3, 1024), feats, atol=1e-3)


def test_sync_features_segment_major(encoders: FeatureEncoders) -> None:
    torch.manual_seed(1)
    segments = torch.rand(1, 2, 16, 3, 224, 224) * 2 - 1
    start = time.monotonic()
    feats = encoders.encode_sync(segments)
    elapsed = time.monotonic() - start
    assert feats.shape == (1, 16, 768) and feats.dtype == torch.float32
    with torch.no_grad():
        direct = encoders.synchformer(segments)  # (1, 2, 8, 768)
    torch.testing.assert_close(feats[0, 8:16], direct[0, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats[0, 0:8], direct[0, 0], atol=1e-5, rtol=1e-5)
    assert elapsed < 30  # generous: the box is shared; ~0.2 s when idle


def test_tiny_weights_are_deterministic(encoders: FeatureEncoders, wavflow_cache_dir: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    pairs = ((wavflow_cache_dir / TINY_CLIP_FILENAME, ensure_tiny_clip(fresh)),
             (wavflow_cache_dir / TINY_SYNC_FILENAME, ensure_tiny_synchformer(fresh)))
    assert torch.equal(torch.rand(3), want)  # the fixed-seed init leaves the global RNG alone
    for path_a, path_b in pairs:
        assert path_b.parent == fresh
        sd_a = torch.load(path_a, weights_only=True)
        sd_b = torch.load(path_b, weights_only=True)
        assert list(sd_a) == list(sd_b) and len(sd_a) > 10
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not list(fresh.glob("*.tmp"))  # atomic writes leave no temp files


def test_second_build_loads_from_cache(encoders: FeatureEncoders, wavflow_cache_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    files = [wavflow_cache_dir / TINY_CLIP_FILENAME, wavflow_cache_dir / TINY_SYNC_FILENAME]
    before = [f.stat().st_mtime_ns for f in files]
    monkeypatch.setattr(enc_mod, "atomic_torch_save", lambda *a, **k: pytest.fail("cache rewritten"))
    again = FeatureEncoders.from_config(tiny_cfg(), need_video=True)
    assert [f.stat().st_mtime_ns for f in files] == before
    for k, v in encoders.synchformer.state_dict().items():
        assert torch.equal(again.synchformer.state_dict()[k], v)
    text = ["same weights"]
    assert torch.equal(again.encode_text(text), encoders.encode_text(text))


def test_t2a_never_touches_synchformer(wavflow_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a, **_k):
        raise AssertionError("Synchformer touched for need_video=False")

    monkeypatch.setattr(enc_mod, "ensure_tiny_synchformer", boom)
    monkeypatch.setattr(enc_mod, "load_synchformer", boom)
    monkeypatch.setattr(Synchformer, "__init__", boom)
    enc = FeatureEncoders.from_config(tiny_cfg(), need_video=False)
    assert enc.synchformer is None and enc.sync_dim == 768
    assert enc.encode_text(["x"]).shape == (1, 77, 1024)
    with pytest.raises(RuntimeError, match="need_video=False"):
        enc.encode_sync(torch.zeros(1, 1, 16, 3, 224, 224))


def test_default_profile_local_files(wavflow_cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Profile default with a local open_clip file + arch name: the real-weights path, no network."""
    clip_file = wavflow_cache_dir / TINY_CLIP_FILENAME
    empty_cache = tmp_path / "cache"
    cfg = {"profile": "default", "clip_model": TINY_CLIP_ARCH, "clip_tokenizer": "ViT-H-14-378-quickgelu",
           "clip_pretrained": str(clip_file), "synchformer_ckpt": None, "cache_dir": str(empty_cache),
           "allow_download": False}

    def boom(*_a, **_k):
        raise AssertionError("Synchformer resolved for need_video=False")

    with monkeypatch.context() as m:
        m.setattr(enc_mod, "load_synchformer", boom)
        t2a = FeatureEncoders.from_config(cfg, need_video=False)
    assert t2a.encode_text(["a"]).shape == (1, 77, 1024)
    # video wanted, no Synchformer weights anywhere, downloads off: one clear error, no tiny fallback
    with pytest.raises(WeightsError) as err:
        FeatureEncoders.from_config(cfg, need_video=True)
    msg = str(err.value)
    assert "synchformer_state_dict.pth" in msg and str(empty_cache / "synchformer_state_dict.pth") in msg
    assert "github.com/hkchengrex/MMAudio" in msg


def test_load_synchformer_errors_name_the_file(wavflow_cache_dir: Path, tmp_path: Path) -> None:
    from wavflow.features.synchformer import SynchformerConfig

    sd = torch.load(wavflow_cache_dir / TINY_SYNC_FILENAME, weights_only=True)
    del sd["vfeat_extractor.norm.bias"]
    partial = tmp_path / "partial.pth"
    torch.save(sd, partial)
    with pytest.raises(WeightsError, match="(?s)partial.pth.*vfeat_extractor.norm.bias"):
        enc_mod.load_synchformer(partial, SynchformerConfig.tiny())
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="garbage.pth"):
        enc_mod.load_synchformer(garbage, SynchformerConfig.tiny())


def test_bad_profile_and_missing_clip_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profile"):
        FeatureEncoders.from_config({"profile": "huge"}, need_video=False)
    with pytest.raises(WeightsError, match="nope.pt"):
        FeatureEncoders.from_config({"profile": "default", "clip_pretrained": str(tmp_path / "nope.pt"),
                                     "cache_dir": str(tmp_path)}, need_video=False)


def test_clip_from_hub_cache_offline(encoders: FeatureEncoders, wavflow_cache_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path loads a pre-populated Hugging Face cache with downloads off (no request)."""
    import json
    import socket

    from wavflow.features.clip import ClipEncoder
    from wavflow.features.encoders import TINY_CLIP_CONFIG

    def refuse(*_a, **_k):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--someorg--tiny-clip"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    (snap / "open_clip_pytorch_model.bin").symlink_to(wavflow_cache_dir / TINY_CLIP_FILENAME)
    clip = ClipEncoder.from_hub("hf-hub:someorg/tiny-clip", "ViT-H-14-378-quickgelu", allow_download=False,
                                hf_cache_dir=tmp_path / "hf")
    with torch.no_grad():
        got = clip.encode_text(["hub path"])
    assert torch.equal(got, encoders.encode_text(["hub path"]))
