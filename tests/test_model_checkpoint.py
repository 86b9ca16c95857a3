"""Checkpoint helpers: full / EMA / flat round trips, tolerated buffers, clear errors."""

from __future__ import annotations

import pytest
import torch

from wavflow.errors import CheckpointError
from wavflow.io_utils import atomic_torch_save
from wavflow.model import ModelPreset, WavFlowNet, build_model
from wavflow.model.checkpoint import load_checkpoint_file, load_weights, state_dict_from_checkpoint


SHAPES = dict(latent_seq_len=16, clip_seq_len=4, sync_seq_len=8, text_seq_len=5, clip_dim=24, sync_dim=16, text_dim=24)
# A ~0.5 M-parameter network of the same structure keeps file round trips cheap on busy CPUs.
MICRO = ModelPreset("micro_test", latent_dim=200, hidden_dim=64, num_heads=1, depth=3, fused_depth=1,
                    mlp_ratio=1.0, default_latent_seq_len=16)


def tiny(name: str = "micro", seed: int = 0, **kw):
    shapes = {**SHAPES, **kw}
    model = WavFlowNet(MICRO, **shapes) if name == "micro" else build_model(name, **shapes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def params_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def full_checkpoint(live, ema1, ema2):
    return {
        "model": live.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "global_step": 120,
        "model_ema1": {n: p.detach().clone() for n, p in ema1.named_parameters()},
        "model_ema2": {n: p.detach().clone() for n, p in ema2.named_parameters()},
    }


def test_full_checkpoint_round_trip_live_and_ema(tmp_path):
    live, ema1, ema2 = tiny(seed=1), tiny(seed=2), tiny(seed=3)
    path = atomic_torch_save(full_checkpoint(live, ema1, ema2), tmp_path / "checkpoint_latest.pth")

    target = tiny(seed=9)
    meta = load_checkpoint_file(target, path, use_ema=False)
    assert params_equal(target, live)
    assert meta["kind"] == "full" and meta["epoch"] == 3 and meta["global_step"] == 120
    assert meta["source"].startswith("model (live")

    meta = load_checkpoint_file(target, path, use_ema=True)
    assert params_equal(target, ema1)
    assert "model_ema1" in meta["source"]
    # Buffers were rebuilt by the model, not taken from the file.
    assert target.latent_rot.shape == (1, 16, 32, 2, 2)


def test_flat_ema_state_dict_and_missing_or_present_buffers(tmp_path):
    src = tiny(seed=4)
    flat = {n: p.detach().clone() for n, p in src.named_parameters()}  # like ema_epoch_N.pth
    path = atomic_torch_save(flat, tmp_path / "ema_epoch_200.pth")
    target = tiny(seed=5)
    meta = load_checkpoint_file(target, path, use_ema=True)
    assert params_equal(target, src)
    assert meta == {"path": str(path), "source": "flat state dict", "kind": "flat", "epoch": None, "global_step": None}
    # A state dict that does carry the buffers (older exports) loads too.
    with_buffers = dict(src.state_dict(), latent_rot=src.latent_rot, clip_rot=src.clip_rot)
    with_buffers["t_embed.freqs"] = src.t_embed.freqs
    load_weights(tiny(seed=6), with_buffers)


def test_state_dict_from_checkpoint_precedence():
    live, ema = tiny(seed=1), tiny(seed=2)
    ckpt = {"model": live.state_dict(), "epoch": 1}
    sd, source = state_dict_from_checkpoint(ckpt, use_ema=True)
    assert sd.keys() == live.state_dict().keys() and "no model_ema1" in source
    ckpt["model_ema1"] = dict(ema.named_parameters())
    sd, source = state_dict_from_checkpoint(ckpt, use_ema=True)
    assert torch.equal(sd["sync_pos_emb"], ema.sync_pos_emb) and source.startswith("model_ema1")
    with pytest.raises(CheckpointError, match="not a dict"):
        state_dict_from_checkpoint([1, 2], use_ema=False, where="checkpoint x.pth")
    with pytest.raises(CheckpointError, match=r"x\.pth .*non-tensor entries: \['note'\]"):
        state_dict_from_checkpoint({"note": "hi", "w": torch.zeros(1)}, use_ema=False, where="checkpoint x.pth")


def test_truncated_file_names_the_file(tmp_path):
    path = atomic_torch_save(tiny().state_dict(), tmp_path / "ckpt.pth")
    data = path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint_file(tiny(), bad, use_ema=False)
    with pytest.raises(CheckpointError, match="not found.*missing.pth"):
        load_checkpoint_file(tiny(), tmp_path / "missing.pth", use_ema=False)


def test_wrong_preset_names_keys_and_presets(tmp_path):
    path = atomic_torch_save(tiny("tiny_16k").state_dict(), tmp_path / "tiny.pth")
    with torch.device("meta"):  # the error comes before any copy, so no real weights needed
        small = build_model("small_16k", **SHAPES)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(small, path, use_ema=False)
    msg = str(err.value)
    assert "tiny.pth" in msg and "model preset 'small_16k'" in msg
    assert "shape mismatch" in msg and "audio_input_proj.0.weight (checkpoint (128, 200, 7), model (256, 200, 7))" in msg
    assert "like preset(s) tiny_16k" in msg


def test_missing_unexpected_keys_and_condition_width_hint():
    model = tiny()
    sd = dict(model.state_dict())
    sd.pop("fused_blocks.0.ffn.w2.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["sync_pos_emb"] = sd["sync_pos_emb"] + 1
    before = model.sync_pos_emb.detach().clone()
    with pytest.raises(CheckpointError, match=r"1 missing: fused_blocks\.0\.ffn\.w2\.weight; 1 unexpected: extra\.weight"):
        load_weights(model, sd, source="unit")
    assert torch.equal(model.sync_pos_emb, before)  # nothing half-loaded
    other = tiny(text_dim=32)
    with pytest.raises(CheckpointError, match=r"no known preset.*built for text_dim=32 \(this model: 24\)"):
        load_weights(model, other.state_dict())
