"""Evaluation networks: real architectures with random weights, saved in the published file
format, loaded through the user's code path (no download), outputs equal to the package's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wavflow.errors import WeightsError
from wavflow.evaluate import models as MD

# A small ImageBindModel (same class as ImageBind-Huge): the Huge one has 1.2 B parameters.
SMALL_IMAGEBIND = dict(
    out_embed_dim=16, vision_embed_dim=32, vision_num_blocks=1, vision_num_heads=2, audio_embed_dim=32,
    audio_num_blocks=1, audio_num_heads=2, text_embed_dim=32, text_num_blocks=1, text_num_heads=2,
    depth_embed_dim=32, depth_num_blocks=1, depth_num_heads=2, thermal_embed_dim=32, thermal_num_blocks=1,
    thermal_num_heads=2, imu_embed_dim=32, imu_num_blocks=1, imu_num_heads=2,
)


def test_weight_path_never_downloads_and_names_source_and_place(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        MD.weight_path("passt", None, str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "passt-s-f128-p16-s10-ap.476-swa.pt") in msg
    assert "github.com/kkoutini/PaSST" in msg and "weights.passt" in msg
    with pytest.raises(WeightsError, match="configured file .* does not exist"):
        MD.weight_path("panns", str(tmp_path / "nope.pth"), None)
    (tmp_path / "Cnn14_16k_mAP=0.438.pth").write_bytes(b"x")
    assert MD.weight_path("panns", None, str(tmp_path)) == tmp_path / "Cnn14_16k_mAP=0.438.pth"


@pytest.mark.slow
def test_passt_loads_the_release_format_and_splits_logits_and_embedding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = MD.PasstNet().eval()
    path = tmp_path / "passt.pt"
    torch.save(source.wrapper.net.state_dict(), path)  # the release file is the bare PaSST state dict
    loaded = MD.PasstNet.from_file(path)
    wave = torch.randn(1, 32000) * 0.1
    with torch.no_grad():
        logits, emb = loaded(wave)
        padded = torch.nn.functional.pad(wave, (0, MD.PasstNet.NUM_SAMPLES - wave.shape[1]))
        full = source.wrapper(padded)  # the package's mode="all" output: [527 logits | 768 embedding]
    assert logits.shape == (1, 527) and emb.shape == (1, 768)
    assert torch.allclose(torch.cat([logits, emb], dim=1), full, atol=1e-5)


@pytest.mark.slow
def test_panns_loads_training_checkpoint_and_returns_presigmoid_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = MD.PannsNet().eval()
    path = tmp_path / "Cnn14_16k.pth"
    torch.save({"model": source.net.state_dict(), "iteration": 3}, path)  # the zenodo file's layout
    loaded = MD.PannsNet.from_file(path)
    wave = torch.randn(1, 16000) * 0.1
    with torch.no_grad():
        logits, emb = loaded(wave)
        ref = source.net(wave)
    assert logits.shape == (1, 527) and emb.shape == (1, 2048)
    assert torch.allclose(torch.sigmoid(logits), ref["clipwise_output"], atol=1e-6)
    assert torch.allclose(emb, ref["embedding"], atol=1e-6)


def test_vggish_frames_are_the_package_embedding_before_its_last_relu(tmp_path: Path) -> None:
    from torchvggish.vggish_input import waveform_to_examples

    torch.manual_seed(0)
    source = MD.VggishNet().eval()
    path = tmp_path / "vggish.pth"
    torch.save(source.net.state_dict(), path)
    loaded = MD.VggishNet.from_file(path)
    wave = torch.randn(16000 * 2) * 0.1
    with torch.no_grad():
        frames = loaded(wave)
        ref = source.net(waveform_to_examples(wave.double().numpy(), 16000, return_tensor=True).float())
    assert frames.shape == (2, 128)  # one row per 0.96 s example
    assert torch.allclose(torch.relu(frames), ref, atol=1e-5)
    assert (frames < 0).any()  # the pre-ReLU values are kept


def test_imagebind_loads_and_embeds_audio_and_video(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = MD.ImageBindNet(SMALL_IMAGEBIND).eval()
    path = tmp_path / "imagebind.pth"
    torch.save(source.net.state_dict(), path)
    loaded = MD.ImageBindNet.from_file(path, SMALL_IMAGEBIND)
    wave, frames = torch.randn(16000 * 8) * 0.1, torch.rand(4, 3, 224, 300)
    with torch.no_grad():
        a, v = loaded.audio(wave), loaded.video(frames)
        assert torch.allclose(a, source.audio(wave), atol=1e-6)
        assert torch.allclose(v, source.video(frames), atol=1e-6)
    assert a.shape == (1, 16) and v.shape == (1, 16)
    assert torch.isfinite(a).all() and torch.isfinite(v).all()
    with pytest.raises(WeightsError, match="do not match the network"):
        MD.ImageBindNet.from_file(path, {**SMALL_IMAGEBIND, "out_embed_dim": 8})


def test_wrong_file_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="garbage.pth"):
        MD.PannsNet.from_file(bad)
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="PANNs weights .*other.pth do not match"):
        MD.PannsNet.from_file(tmp_path / "other.pth")
