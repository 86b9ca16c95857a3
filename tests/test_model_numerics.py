"""Numerics of the WavFlow network against formulas written out here (docs/method.md §2, §9)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wavflow.model import Conditions, build_model
from wavflow.model.layers import (
    MLP,
    SelfAttention,
    TimestepEmbedder,
    apply_rope,
    compute_rope_rotations,
    swiglu_hidden_dim,
)


# Small condition shapes keep the tiny model fast; the reference shapes are tested on meta.
SHAPES = dict(latent_seq_len=24, clip_seq_len=4, sync_seq_len=16, text_seq_len=6, clip_dim=32, sync_dim=24, text_dim=40)


def tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model("tiny_16k", **{**SHAPES, **kw})


def randomize(model: nn.Module, seed: int = 1, std: float = 0.05) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for name, p in model.named_parameters():
            if name.endswith("_norm.weight"):
                p.add_(1.0)
    return model


def inputs(model, bs: int = 2, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(bs, model.latent_seq_len, 200, generator=gen)
    clip = torch.randn(bs, model.clip_seq_len, model.clip_dim, generator=gen)
    sync = torch.randn(bs, model.sync_seq_len, model.sync_dim, generator=gen)
    text = torch.randn(bs, model.text_seq_len, model.text_dim, generator=gen)
    t = torch.rand(bs, generator=gen)
    return x, clip, sync, text, t


# ----------------------------------------------------------------------------- timestep
def test_timestep_frequency_table_is_reciprocal_of_power():
    emb = TimestepEmbedder(16)
    e = torch.arange(0, 256, 2, dtype=torch.float32) / 256
    want = torch.tensor(1.0) / torch.pow(torch.tensor(10000.0), e)
    assert emb.freqs.dtype == torch.float32 and emb.freqs.shape == (128,)
    assert torch.equal(emb.freqs, want)
    exact = torch.tensor([10000.0 ** (-i / 128) for i in range(128)], dtype=torch.float64)
    assert torch.allclose(emb.freqs.double(), exact, rtol=2e-7, atol=0)
    assert "freqs" not in emb.state_dict() and "t_embed.freqs" not in tiny().state_dict()


def test_timestep_features_cos_first_and_t_unscaled():
    emb = TimestepEmbedder(16)
    t = torch.tensor([0.0, 0.25, 1.0])
    feats = emb.timestep_features(t)
    assert feats.shape == (3, 256)
    args = t.double()[:, None] * emb.freqs.double()[None]
    assert torch.allclose(feats[:, :128].double(), torch.cos(args), atol=1e-6)
    assert torch.allclose(feats[:, 128:].double(), torch.sin(args), atol=1e-6)
    assert torch.equal(feats[0], torch.cat([torch.ones(128), torch.zeros(128)]))  # t=0: cos first
    # t=1 is not multiplied by 1000: channel 0 is cos(1 * 1.0).
    assert feats[2, 0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    # MLP keys and forward: Linear -> SiLU -> Linear.
    assert list(emb.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    want = emb.mlp[2](F.silu(emb.mlp[0](feats)))
    assert torch.equal(emb(t), want)


# --------------------------------------------------------------------------------- RoPE
def test_rope_table_and_adjacent_pair_rotation():
    length, scale = 5, 2.5
    rot = compute_rope_rotations(length, freq_scaling=scale)
    assert rot.shape == (1, length, 32, 2, 2) and rot.dtype == torch.float32
    for n in (0, 1, 4):
        for i in (0, 7, 31):
            a = n * (10000.0 ** (-(2 * i) / 64)) * scale
            want = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
            assert torch.allclose(rot[0, n, i].double(), want, atol=1e-5)
    # A hand-checked vector: only channels 2 and 3 (pair i=1) are set at position 3.
    x = torch.zeros(1, 1, length, 64)
    x[0, 0, 3, 2], x[0, 0, 3, 3] = 1.0, 2.0
    out = apply_rope(x, rot)
    a = 3 * (10000.0 ** (-2 / 64)) * scale
    assert out[0, 0, 3, 2].item() == pytest.approx(math.cos(a) - 2 * math.sin(a), abs=1e-5)
    assert out[0, 0, 3, 3].item() == pytest.approx(math.sin(a) + 2 * math.cos(a), abs=1e-5)
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[0, 0, 3, 2:4] = False
    assert torch.all(out[mask] == 0)  # rotate-half would have touched channel 34/35


def test_rope_multiply_then_add_order_and_dtype():
    rot = compute_rope_rotations(7, freq_scaling=1.0)
    x = torch.randn(2, 3, 7, 64, dtype=torch.bfloat16)
    out = apply_rope(x, rot)
    assert out.dtype == torch.bfloat16
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    cos, msin, sin = rot[0, :, :, 0, 0], rot[0, :, :, 0, 1], rot[0, :, :, 1, 0]
    want = torch.stack([cos * x0 + msin * x1, sin * x0 + cos * x1], dim=-1).reshape(xf.shape)
    assert torch.equal(out, want.to(torch.bfloat16))


def test_clip_rotation_scaled_to_latent_axis_and_update_seq_lengths():
    model = tiny()
    n, c = model.latent_seq_len, model.clip_seq_len
    assert torch.equal(model.latent_rot, compute_rope_rotations(n, freq_scaling=1.0))
    assert torch.equal(model.clip_rot, compute_rope_rotations(c, freq_scaling=n / c))
    # clip position 1 has the angle of latent position N/clip_len (= 6 here) for every freq.
    assert torch.allclose(model.clip_rot[0, 1], model.latent_rot[0, n // c], atol=1e-6)
    model.update_seq_lengths(40)
    assert model.latent_seq_len == 40 and model.latent_rot.shape == (1, 40, 32, 2, 2)
    assert torch.equal(model.clip_rot, compute_rope_rotations(c, freq_scaling=40 / c))
    model.update_seq_lengths(32, clip_seq_len=8, sync_seq_len=24)
    assert (model.clip_seq_len, model.sync_seq_len) == (8, 24)
    assert torch.equal(model.clip_rot, compute_rope_rotations(8, freq_scaling=4.0))
    x, clip, sync, text, t = inputs(model)
    assert model(x, clip, sync, text, t).shape == (2, 32, 200)
    assert "latent_rot" not in model.state_dict()
    with pytest.raises(ValueError, match="multiple of 8"):
        model.update_seq_lengths(32, sync_seq_len=20)


# ------------------------------------------------------------------------ layer details
def test_swiglu_inner_width():
    assert swiglu_hidden_dim(3584) == 2560
    assert swiglu_hidden_dim(512) == 512  # int(341.3) -> 341 -> 512
    assert swiglu_hidden_dim(256) == 256
    mlp = MLP(896, 3584)
    assert mlp.w1.weight.shape == (2560, 896) and mlp.w2.weight.shape == (896, 2560)
    x = torch.randn(3, 896)
    assert torch.equal(mlp(x), mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x)))


def test_qkv_channel_layout_is_head_dim_selector():
    attn = SelfAttention(128, 2)
    attn.q_norm, attn.k_norm = nn.Identity(), nn.Identity()  # isolate the split
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.copy_(torch.arange(384, dtype=torch.float32))
    q, k, v = attn.pre_attention(torch.zeros(1, 3, 128), None)
    assert q.shape == (1, 2, 3, 64)
    h = torch.arange(2)[:, None]
    j = torch.arange(64)[None, :]
    for s, got in enumerate((q, k, v)):
        want = (h * 192 + j * 3 + s).float()
        assert torch.equal(got[0, :, 1], want), f"selector {s}"


def test_rmsnorm_eps_resolves_from_dtype():
    attn = SelfAttention(64, 1)
    assert isinstance(attn.q_norm, nn.RMSNorm) and attn.q_norm.eps is None and attn.k_norm.eps is None
    x = torch.full((2, 64), 1e-3)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    assert torch.allclose(attn.q_norm(x), want, rtol=1e-6)
    # A hard-coded eps (1e-6, or bf16's 7.8e-3) gives clearly different values at this scale.
    for eps in (1e-6, torch.finfo(torch.bfloat16).eps):
        hard = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        assert not torch.allclose(attn.q_norm(x), hard, rtol=1e-3)
    # Other dtypes go through torch's own eps=None resolution (the reference's behaviour too).
    xb = x.bfloat16()
    attn_b = SelfAttention(64, 1).bfloat16()
    assert torch.equal(attn_b.q_norm(xb), F.rms_norm(xb, (64,), attn_b.q_norm.weight, None))


def test_pre_only_last_joint_block():
    model = tiny()
    last = model.joint_blocks[-1]
    assert last.pre_only and not model.joint_blocks[0].pre_only
    for block in (last.clip_block, last.text_block):
        assert not hasattr(block, "linear1") and not hasattr(block, "ffn") and not hasattr(block, "norm2")
        assert block.adaLN_modulation[1].out_features == 2 * 128
    assert last.latent_block.adaLN_modulation[1].out_features == 6 * 128
    randomize(model)
    x = torch.randn(1, 24, 128)
    clip, text = torch.randn(1, 4, 128), torch.randn(1, 6, 128)
    gc, ec = torch.randn(1, 1, 128), torch.randn(1, 24, 128)
    out_x, out_c, out_t = last(x, clip, text, gc, ec, model.latent_rot, model.clip_rot)
    assert out_c is clip and out_t is text and not torch.equal(out_x, x)


# ----------------------------------------------------------------------- conditions path
def test_sync_upsampling_nearest_exact_indices():
    for n in (640, 1764, 50):
        model = tiny(latent_seq_len=n, sync_seq_len=192, sync_dim=8)
        model.sync_input_proj = nn.Identity()  # expose the upsampling itself
        ramp = torch.arange(192, dtype=torch.float32)[None, :, None].expand(1, 192, 8)
        cond = model.preprocess_conditions(model.empty_clip_sequence(1), ramp, model.empty_string_sequence(1))
        idx = torch.tensor([min(math.floor((i + 0.5) * 192 / n), 191) for i in range(n)], dtype=torch.float32)
        assert torch.equal(cond.sync_f[0, :, 0], idx), n


def test_sync_pos_emb_added_per_frame_before_projection():
    model = randomize(tiny())
    model.sync_input_proj = nn.Identity()
    model.update_seq_lengths(model.sync_seq_len)  # upsampling becomes the identity
    sync = torch.randn(1, 16, 24)
    got = model.preprocess_conditions(*inputs(model, bs=1)[1:2], sync, inputs(model, bs=1)[3]).sync_f
    emb = model.sync_pos_emb[0, 0]  # (8, 24)
    want = sync + emb.repeat(2, 1)[None]
    assert torch.equal(got, want)


def test_pooled_conditions_and_named_tuple():
    model = randomize(tiny())
    _, clip, sync, text, _ = inputs(model)
    cond = model.preprocess_conditions(clip, sync, text)
    assert isinstance(cond, Conditions) and cond._fields == ("clip_f", "sync_f", "text_f", "clip_c", "text_c")
    assert cond.clip_f.shape == (2, 4, 128) and cond.sync_f.shape == (2, 24, 128) and cond.text_f.shape == (2, 6, 128)
    assert torch.equal(cond.clip_c, model.clip_cond_proj(model.clip_input_proj(clip).mean(1)))
    assert torch.equal(cond.text_c, model.text_cond_proj(model.text_input_proj(text).mean(1)))


def test_empty_sequences_are_expand_views_and_accepted():
    model = randomize(tiny())
    es, ec, ey = model.empty_string_sequence(3), model.empty_clip_sequence(3), model.empty_sync_sequence(3)
    assert es.shape == (3, 6, 40) and ec.shape == (3, 4, 32) and ey.shape == (3, 16, 24)
    assert es.stride(0) == 0 and ec.stride()[:2] == (0, 0) and ey.stride()[:2] == (0, 0)
    assert ec.data_ptr() == model.empty_clip_feat.data_ptr()
    cond = model.preprocess_conditions(ec, ey, es)
    ref = model.preprocess_conditions(ec.contiguous(), ey.contiguous(), es.contiguous())
    for a, b in zip(cond, ref):
        assert torch.allclose(a, b, atol=1e-6)
    empty = model.get_empty_conditions(3)
    assert [tuple(p.shape) for p in empty] == [tuple(p.shape) for p in cond]
    for a, b in zip(empty, cond):
        assert torch.allclose(a, b, atol=1e-6)
    neg = torch.randn(3, 6, 40)
    with_neg = model.get_empty_conditions(3, negative_text_features=neg)
    assert torch.allclose(with_neg.text_c, model.preprocess_conditions(ec, ey, neg).text_c, atol=1e-6)
    assert torch.allclose(with_neg.clip_c, cond.clip_c, atol=1e-6)
    with pytest.raises(ValueError, match="negative_text_features"):
        model.get_empty_conditions(2, negative_text_features=neg)


def test_shape_errors_name_the_tensor():
    model = tiny()
    x, clip, sync, text, t = inputs(model)
    with pytest.raises(ValueError, match=r"sync_f has shape \(2, 15, 24\), expected \(B, 16, 24\)"):
        model(x, clip, sync[:, :15], text, t)
    with pytest.raises(ValueError, match=r"clip_f has shape"):
        model(x, clip[..., :5], sync, text, t)
    with pytest.raises(ValueError, match=r"^x has shape \(2, 23, 200\)"):
        model(x[:, :23], clip, sync, text, t)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(x, clip[:1], sync, text, t)


# ------------------------------------------------------------------------- whole network
def test_fresh_model_outputs_exactly_zero():
    model = tiny()
    assert torch.count_nonzero(model.sync_pos_emb) == 0 and torch.count_nonzero(model.final_layer.conv.weight) == 0
    y = model(*inputs(model))
    assert y.shape == (2, 24, 200) and torch.count_nonzero(y) == 0


def test_final_layer_is_conditioned_on_global_c():
    model = randomize(tiny())
    x, clip, sync, text, t = inputs(model)
    sync2 = sync + torch.randn_like(sync)
    # Control: through the latent blocks, sync changes the output.
    assert not torch.allclose(model(x, clip, sync, text, t), model(x, clip, sync2, text, t))
    # Gate every latent-path block shut: latent = audio_input_proj(x) reaches the final layer.
    with torch.no_grad():
        for block in [jb.latent_block for jb in model.joint_blocks] + list(model.fused_blocks):
            block.adaLN_modulation[-1].weight.zero_()
            block.adaLN_modulation[-1].bias.zero_()
    y = model(x, clip, sync, text, t)
    assert torch.equal(y, model(x, clip, sync2, text, t))  # extended_c (sync) never reaches it
    cond = model.preprocess_conditions(clip, sync, text)
    global_c = model.t_embed(t)[:, None] + model.global_cond_mlp(cond.clip_c + cond.text_c)[:, None]
    h = model.audio_input_proj(x)
    shift, scale = model.final_layer.adaLN_modulation(global_c).chunk(2, dim=-1)
    want = model.final_layer.conv(F.layer_norm(h, (128,), eps=1e-5) * (1 + scale) + shift)
    assert torch.allclose(y, want, atol=1e-6)
    assert not torch.allclose(y, model(x, clip, sync, text * 2 + 1, t))  # text still acts via global_c


def test_gradient_checkpointing_same_output_and_grads():
    plain, ckpt = randomize(tiny()), randomize(tiny(gradient_checkpointing=True))
    x, clip, sync, text, t = inputs(plain)
    results, calls = [], []
    for model in (plain, ckpt):
        model.train()
        count = [0]
        model.fused_blocks[0].register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        y = model(x, clip, sync, text, t)
        (y.square().mean()).backward()
        calls.append(count[0])
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (y0, g0), (y1, g1) = results
    assert calls == [1, 2]  # the checkpointed block really is recomputed in backward
    assert torch.equal(y0, y1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-5, atol=1e-8), name
    assert g0["joint_blocks.0.latent_block.attn.qkv.weight"].abs().sum() > 0


def test_selective_gradient_checkpointing_recomputes_only_the_chosen_blocks():
    """training.gradient_checkpointing as k (every k-th block) or a list: only those blocks run
    twice in a training step, and the gradients equal the plain network's."""
    from wavflow.errors import ConfigError
    from wavflow.train.network_setup import checkpointed_blocks

    assert checkpointed_blocks(False, 4) == [] and checkpointed_blocks(True, 4) == [0, 1, 2, 3]
    assert checkpointed_blocks(2, 4) == [0, 2] and checkpointed_blocks([3, 1, 3], 4) == [1, 3]
    for bad in (0, [4], ["a"], "every"):
        with pytest.raises(ConfigError, match="training.gradient_checkpointing"):
            checkpointed_blocks(bad, 4)
    plain, ckpt = randomize(tiny()), randomize(tiny(gradient_checkpointing=[1, 2]))
    blocks = lambda m: [*m.joint_blocks, *m.fused_blocks]  # noqa: E731
    x, clip, sync, text, t = inputs(plain)
    grads = []
    for model in (plain, ckpt):
        model.train()
        counts = [0] * len(blocks(model))
        for i, block in enumerate(blocks(model)):
            block.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        model(x, clip, sync, text, t).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if model is ckpt:
            assert counts == [1, 2, 2, 1]  # joint block 1 and fused block 0 (index 2) recomputed
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-8), name


def test_batch_rows_are_independent():
    model = randomize(tiny()).eval()
    x, clip, sync, text, t = inputs(model, bs=3)
    with torch.no_grad():
        batch = model(x, clip, sync, text, t)
        single = model(x[1:2], clip[1:2], sync[1:2], text[1:2], t[1:2])
    assert torch.allclose(batch[1:2], single, atol=1e-5)
    assert batch.abs().mean() > 1e-3
