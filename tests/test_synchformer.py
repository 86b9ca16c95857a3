"""Synchformer: layout vs tests/data/synchformer.json, attention numerics, block order, loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from wavflow.features.synchformer import DividedAttention, Synchformer, SynchformerConfig

FORMAT = Path(__file__).resolve().parent / "data" / "synchformer.json"  # checked in (tests/data/README.md)


@pytest.fixture(scope="module")
def reference_layout() -> dict:
    return json.loads(FORMAT.read_text())  # a missing file is a failure, never a skip


@pytest.fixture(scope="module")
def tiny() -> Synchformer:
    torch.manual_seed(0)
    return Synchformer.tiny().eval()


def test_state_dict_matches_reference_layout(reference_layout: dict) -> None:
    with torch.device("meta"):
        model = Synchformer()
    sd = model.state_dict()
    ref = reference_layout["state_dict"]
    assert list(sd) == [e["key"] for e in ref]
    assert len(sd) == reference_layout["num_state_dict_keys"] == 238
    for entry in ref:
        t = sd[entry["key"]]
        assert list(t.shape) == entry["shape"], entry["key"]
        assert str(t.dtype).removeprefix("torch.") == entry["dtype"], entry["key"]
    assert reference_layout["buffers"] == [] and not list(model.buffers())


def test_parameter_counts(reference_layout: dict) -> None:
    with torch.device("meta"):
        model = Synchformer()
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == reference_layout["param_count"] == 122_440_704
    assert sum(p.numel() for p in params if p.requires_grad) == reference_layout["trainable_param_count"]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert ["vfeat_extractor." + n.split("vfeat_extractor.")[1] for n in frozen] == reference_layout["unused_in_forward"]


def _micro() -> Synchformer:
    cfg = SynchformerConfig(depth=1, num_heads=2, embed_dim=16, mlp_hidden_dim=8, patch_size=56,
                            agg_num_heads=2, agg_ff_dim=8)
    return Synchformer(cfg).eval()


def test_tiny_forward_shape(tiny: Synchformer) -> None:
    torch.manual_seed(1)
    vis = torch.rand(1, 1, 16, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        out = tiny(vis)
    assert out.shape == (1, 1, 8, 768) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0, 0, 0], out[0, 0, 1])  # frames get their own vectors
    with pytest.raises(ValueError, match="Synchformer expects"):
        tiny(vis[:, :, :8])


def test_segments_are_chunked_independently() -> None:
    torch.manual_seed(1)
    model = _micro()
    vis = torch.rand(1, 3, 16, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        out = model(vis)
        model.segment_chunk = 1
        out_chunked = model(vis)
        single = model(vis[:, 2:3])
    assert out.shape == (1, 3, 8, 16)
    torch.testing.assert_close(out_chunked, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single[0, 0], out[0, 2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0, 0], out[0, 1])


def test_load_state_dict_keeps_only_vfeat_keys(tiny: Synchformer) -> None:
    torch.manual_seed(2)
    other = Synchformer.tiny()
    sd = {k: v.clone() for k, v in other.state_dict().items()}
    sd["afeat_extractor.conv.weight"] = torch.zeros(3)  # audio branch of the public checkpoint
    sd["transformer.layer.bias"] = torch.zeros(2)
    target = Synchformer.tiny()
    target.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k

    missing = dict(sd)
    del missing["vfeat_extractor.norm.weight"]
    with pytest.raises(RuntimeError, match="vfeat_extractor.norm.weight"):
        target.load_state_dict(missing)
    extra = dict(sd)
    extra["vfeat_extractor.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="vfeat_extractor.bogus"):
        target.load_state_dict(extra)


def _reference_divided_attention(attn: DividedAttention, x: torch.Tensor, mode: str, f: int, p: int) -> torch.Tensor:
    """Loop-based re-statement of docs/method.md §7.5 (independent of the module's reshapes)."""
    b, n, dim = x.shape
    h = attn.num_heads
    d = dim // h
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    out = torch.zeros(b, n, dim, dtype=x.dtype)

    def attend(qi: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        w = torch.softmax((qi * d**-0.5) @ keys.T, dim=-1)
        return w @ vals

    for bi in range(b):
        for hi in range(h):
            sl = slice(hi * d, (hi + 1) * d)
            qh, kh, vh = q[bi, :, sl], k[bi, :, sl], v[bi, :, sl]
            out[bi, 0, sl] = attend(qh[0:1], kh, vh)[0]
            groups = range(p) if mode == "time" else range(f)
            for g in groups:
                if mode == "time":  # same spatial index across frames; token = 1 + frame*p + s
                    idx = [1 + fr * p + g for fr in range(f)]
                else:  # same frame across spatial positions
                    idx = [1 + g * p + s for s in range(p)]
                keys = torch.cat([kh[0:1], kh[idx]])
                vals = torch.cat([vh[0:1], vh[idx]])
                out[bi, idx, sl] = attend(qh[idx], keys, vals)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("mode", ["time", "space"])
def test_divided_attention_numerics(mode: str) -> None:
    torch.manual_seed(3)
    dim, heads, f, p = 8, 2, 3, 4
    attn = DividedAttention(dim, heads)
    x = torch.randn(2, 1 + f * p, dim, dtype=torch.float64)
    attn = attn.double()
    assert math.isclose(attn.scale, (dim // heads) ** -0.5)
    got = attn(x, mode, f, p)
    want = _reference_divided_attention(attn, x, mode, f, p)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # the two modes group differently, so they must not agree
    other = attn(x, "space" if mode == "time" else "time", f, p)
    assert not torch.allclose(got, other)


def test_time_attention_runs_before_space_attention() -> None:
    cfg = SynchformerConfig(depth=1, num_heads=2, embed_dim=16, mlp_hidden_dim=8, patch_size=112,
                            agg_num_heads=2, agg_ff_dim=8)
    model = Synchformer(cfg).eval()
    block = model.vfeat_extractor.blocks[0]
    order: list[str] = []
    for name in ("norm3", "timeattn", "norm1", "attn", "norm2", "mlp"):
        getattr(block, name).register_forward_hook(lambda *_, n=name: order.append(n))
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 16, 3, 224, 224))
    assert order == ["norm3", "timeattn", "norm1", "attn", "norm2", "mlp"]
    assert out.shape == (1, 1, 8, 16)


def test_separate_position_embedding() -> None:
    """Patch token (f, s) gets pos_embed[1+s] + temp_embed[f]; CLS gets pos_embed[0] (§7.3)."""
    cfg = SynchformerConfig(depth=0, num_heads=1, embed_dim=4, mlp_hidden_dim=4, patch_size=112,
                            agg_num_heads=1, agg_ff_dim=4)
    mf = Synchformer(cfg).vfeat_extractor
    seen: list[torch.Tensor] = []
    mf.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        mf.patch_embed_3d.proj.weight.zero_()
        mf.patch_embed_3d.proj.bias.zero_()
        mf(torch.zeros(1, 3, 16, 224, 224))
    tokens = seen[0][0]  # CLS already dropped: (8 * 4, 4), frame-major
    for fr in range(8):
        for s in range(4):
            torch.testing.assert_close(tokens[fr * 4 + s], mf.pos_embed[0, 1 + s] + mf.temp_embed[0, fr])
