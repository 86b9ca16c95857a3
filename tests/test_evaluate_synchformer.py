"""Synchformer audio branch + offset head: public key layout, loading, visual part unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from wavflow.errors import WeightsError
from wavflow.features.encoders import load_synchformer
from wavflow.features.synchformer import Synchformer, SynchformerConfig
from wavflow.features.synchformer_av import (
    AUDIO_SEGMENT_SAMPLES,
    SynchformerAV,
    SynchformerAVConfig,
    audio_segments_mel,
    load_synchformer_av,
    make_sync_mel,
    offset_grid,
)

# transformers 5 names -> the names transformers 4 wrote (the public checkpoint's)
_TO_PUBLIC = (
    (r"\.layers\.(\d+)\.attention\.q_proj\.", r".encoder.layer.\1.attention.attention.query."),
    (r"\.layers\.(\d+)\.attention\.k_proj\.", r".encoder.layer.\1.attention.attention.key."),
    (r"\.layers\.(\d+)\.attention\.v_proj\.", r".encoder.layer.\1.attention.attention.value."),
    (r"\.layers\.(\d+)\.attention\.o_proj\.", r".encoder.layer.\1.attention.output.dense."),
    (r"\.layers\.(\d+)\.mlp\.fc1\.", r".encoder.layer.\1.intermediate.dense."),
    (r"\.layers\.(\d+)\.mlp\.fc2\.", r".encoder.layer.\1.output.dense."),
    (r"\.layers\.(\d+)\.layernorm_", r".encoder.layer.\1.layernorm_"),
)


def public_state_dict(model: SynchformerAV) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        for pattern, repl in _TO_PUBLIC:
            key = re.sub(pattern, repl, key)
        out[key] = value.clone()
    return out


def small_cfg() -> SynchformerAVConfig:
    return SynchformerAVConfig(visual=SynchformerConfig.tiny(), ast_layers=1, ast_intermediate=64, agg_ff_dim=64,
                               head_layers=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynchformerAV, Path]:
    torch.manual_seed(0)
    model = SynchformerAV(small_cfg()).eval()
    path = tmp_path_factory.mktemp("sync") / "synchformer_state_dict.pth"
    torch.save(public_state_dict(model), path)
    return model, path


def test_public_layout_of_the_full_model() -> None:
    with torch.device("meta"):
        full = SynchformerAV()
        visual = Synchformer()
    sd = full.state_dict()
    vis = {k: v.shape for k, v in sd.items() if k.startswith("vfeat_extractor.")}
    assert vis == {k: v.shape for k, v in visual.state_dict().items()}  # the 238 visual keys, same shapes
    assert sd["afeat_extractor.ast.embeddings.position_embeddings"].shape == (1, 74, 768)  # 12 x 6 patches + 2
    assert sd["transformer.pos_emb_cfg.pos_emb"].shape == (1, 198, 768)
    assert sd["transformer.off_head.weight"].shape == (21, 768)
    assert sd["vproj.weight"].shape == sd["aproj.weight"].shape == (768, 768)
    public = public_state_dict(full)
    assert "afeat_extractor.ast.encoder.layer.11.attention.attention.query.weight" in public
    assert "afeat_extractor.freq_attn_agg.cls_token" in public
    assert offset_grid().tolist() == pytest.approx([-2 + 0.2 * i for i in range(21)])


def test_audio_front_end_segments() -> None:
    wave = torch.randn(2, 16000 * 8)
    mel = audio_segments_mel(wave, make_sync_mel())
    assert mel.shape == (2, 24, 128, 66)  # (128000 - 10240) // 5120 + 1 segments
    # segment 1 starts 0.32 s in: its spectrogram is that of the shifted window alone
    one = audio_segments_mel(wave[:, 5120:5120 + AUDIO_SEGMENT_SAMPLES], make_sync_mel())
    assert torch.allclose(mel[:, 1:2], one, atol=1e-5)


def test_load_reads_audio_branch_and_head_and_keeps_outputs(saved: tuple[SynchformerAV, Path]) -> None:
    model, path = saved
    loaded = load_synchformer_av(path, small_cfg())
    torch.manual_seed(1)
    mel = torch.randn(1, 14, 128, 66)
    vis = torch.rand(1, 14, 16, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        a_ref, a_got = model.audio_features(mel), loaded.audio_features(mel)
        v_ref, v_got = model.visual_features(vis), loaded.visual_features(vis)
        assert a_got.shape == (1, 14, 6, 768) and v_got.shape == (1, 14, 8, 768)
        assert torch.allclose(a_got, a_ref, atol=1e-5)
        logits = loaded.offset_logits(v_got, a_got)
        assert logits.shape == (1, 21)
        assert torch.allclose(logits, model.offset_logits(v_ref, a_ref), atol=1e-4)


def test_visual_output_is_bit_identical_to_the_visual_loader(saved: tuple[SynchformerAV, Path]) -> None:
    _, path = saved
    av_model = load_synchformer_av(path, small_cfg())
    visual_only = load_synchformer(path, SynchformerConfig.tiny())  # the extraction's loader, same file
    torch.manual_seed(2)
    vis = torch.rand(1, 2, 16, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        assert torch.equal(av_model.visual_features(vis), visual_only(vis))


def test_visual_only_file_is_a_clear_error(tmp_path: Path, saved: tuple[SynchformerAV, Path]) -> None:
    _, path = saved
    state = torch.load(path, weights_only=True)
    visual = {k: v for k, v in state.items() if k.startswith("vfeat_extractor.")}
    torch.save(visual, tmp_path / "visual.pth")
    with pytest.raises(WeightsError, match="lack .* keys of the audio branch / offset head"):
        load_synchformer_av(tmp_path / "visual.pth", small_cfg())
    with pytest.raises(WeightsError, match="not found"):
        load_synchformer_av(tmp_path / "absent.pth", small_cfg())


def test_audio_tokens_are_regrouped_per_time_step() -> None:
    """AST's patch tokens are frequency-major (12 x 6): the aggregation must see, for each of
    the 6 time steps, that step's 12 frequency patches. Mel frames 56..65 fall in the last
    time patch only (patches span 16 frames at stride 10)."""
    torch.manual_seed(0)
    branch = SynchformerAV(small_cfg()).afeat_extractor.eval()
    mel = torch.zeros(1, 66, 128)
    mel[:, 56:, :] = torch.randn(1, 10, 128)
    with torch.no_grad():
        tokens = branch.ast.embeddings.patch_embeddings(mel)  # (1, 72, D)
        bias_only = branch.ast.embeddings.patch_embeddings(torch.zeros_like(mel))
    changed = (tokens - bias_only).abs().sum(-1)[0] > 0
    grid = changed.reshape(branch.f, branch.t)  # the regrouping `AudioFeatureExtractor` applies
    assert grid[:, -1].all() and not grid[:, :-1].any()
