"""Weights of the `tiny` encoder profile: small CLIP / Synchformer networks whose features carry
the content of the pixels and caption tokens by construction (docs/encoders.md).

Random-init transformers this small give features that are nearly the same for every input
(one shared direction, the content at ~1e-3 of the norm), which a generator can only use after
thousands of steps. Instead the real open_clip / Synchformer architectures get fixed, seeded
weights that compute well-scaled, interpretable features:

- CLIP text: per-token features of a causal bag of words. Query/key weights are zero, so the
  causal attention averages the layer-normed token embeddings of the prefix; the padding token
  embeds to zero, so every position after the caption holds the whole caption's bag of words
  (as a trained CLIP's causal transformer does), not a shared padding vector.
- CLIP frames: per patch, random colour-direction units that stay silent on near-black pixels
  (a rectified, thresholded projection of the patch's mean colour), averaged over the patches
  and projected to 1024: frames differ as their colour content differs, wherever it lies on
  screen, and a frame of near-black pixels embeds to zero.
- Synchformer: per 2-frame tubelet, the mean colour from black, LINEAR in the pixels (a large
  constant carrier keeps the per-token layer norms linear, and the aggregation's value
  projection drops the carrier), so a shape appearing on screen changes the features of exactly
  the tubelets it appears in.

All three read only pixels and token ids: nothing of the data set's labels or metadata.
The transformer blocks are identities (zero output projections), so the code path is exactly
the one real weights take.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wavflow.features.clip import CLIP_MEAN, CLIP_STD

TEXT_CONTEXT_GAIN = 4.0  # weight of the prefix average against the token's own embedding
SYNC_CARRIER_CHANNELS = 256  # Synchformer channels holding the constant carrier
SYNC_CARRIER = 64.0  # carrier amplitude: >> the colour part, so LayerNorm is ~linear
VISION_CARRIER_CHANNELS = 32
VISION_CARRIER = 100.0
VISION_DETECTORS = 16  # colour-direction units of the CLIP vision tower
VISION_GATE = 0.15  # |RGB| below this (near black, 0..1 scale) never fires a unit
VISION_GAIN = 500.0  # QuickGELU(gain * z) / gain ~= relu(z); gain * carrier stays within fp16


def _zero_(*tensors: Tensor) -> None:
    for t in tensors:
        t.zero_()


def _zero_mean_columns(m: Tensor) -> Tensor:
    # Zero mean over output channels: LayerNorm's centring then leaves the colour part alone.
    return m - m.mean(dim=0, keepdim=True)


@torch.no_grad()
def craft_tiny_clip(model: nn.Module, generator: torch.Generator) -> None:
    """Set the weights of an open_clip CLIP built from the tiny config (in place)."""
    # ---- text tower: causal bag of words
    width = model.token_embedding.weight.shape[1]
    model.token_embedding.weight.normal_(generator=generator)
    model.token_embedding.weight[0].zero_()  # the padding id: contributes nothing to averages
    model.positional_embedding.zero_()
    for block in model.transformer.resblocks:
        attn = block.attn
        attn.in_proj_weight.zero_()
        attn.in_proj_weight[2 * width:].copy_(torch.eye(width))  # q = k = 0: uniform causal attention
        attn.in_proj_bias.zero_()
        attn.out_proj.weight.copy_(TEXT_CONTEXT_GAIN * torch.eye(width))
        attn.out_proj.bias.zero_()
        _zero_(block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    # ---- vision tower: colour detectors gated off near black, averaged over patches
    _craft_tiny_clip_vision(model.visual, generator)


def _craft_tiny_clip_vision(visual: nn.Module, generator: torch.Generator) -> None:
    """Per patch: the mean colour p (RGB in [0, 1]); VISION_DETECTORS units
    relu(v_k . p - VISION_GATE) with random unit directions v_k (opponent colours included), so
    dark pixels (|p| < VISION_GATE) give exactly nothing; the units' average over patches is
    projected to the embedding. A frame with nothing but near-black pixels embeds to zero.
    Channel layout of the width-w tokens: a zero-mean carrier (keeps every LayerNorm ~linear),
    +p / -p (zero mean), the detector outputs."""
    width = visual.conv1.weight.shape[0]
    p = visual.conv1.weight.shape[-1]
    carrier_ch, k = VISION_CARRIER_CHANNELS, VISION_DETECTORS
    col = slice(carrier_ch, carrier_ch + 6)
    det = slice(carrier_ch + 6, carrier_ch + 6 + k)
    assert det.stop <= width
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    # conv1 sees normalised pixels (x - mean) / std: x = std * input + mean
    conv = torch.zeros(width, 3)
    conv[col] = torch.cat([torch.diag(std), -torch.diag(std)])
    visual.conv1.weight.copy_((conv / (p * p))[:, :, None, None].expand_as(visual.conv1.weight))
    # conv1 has no bias: the position embedding adds the offset (+mean / -mean) and the carrier
    pos = torch.zeros(width)
    pos[:carrier_ch] = VISION_CARRIER * torch.tensor([1.0, -1.0]).repeat(carrier_ch // 2)
    pos[col] = torch.cat([mean, -mean])
    visual.positional_embedding.copy_(pos.expand_as(visual.positional_embedding))
    visual.class_embedding.zero_()
    sigma = VISION_CARRIER * (carrier_ch / width) ** 0.5  # LayerNorm's std: the carrier's
    directions = torch.nn.functional.normalize(torch.randn(k, 3, generator=generator), dim=1)
    for block in visual.transformer.resblocks:
        _zero_(block.attn.out_proj.weight, block.attn.out_proj.bias)
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        _zero_(fc.weight, fc.bias, proj.weight, proj.bias)
        # ln_2(x) ~= x / sigma: the unit's input is gain * (v . p - gate)
        fc.weight[:k, col.start:col.start + 3] = VISION_GAIN * sigma * directions
        fc.bias[:k] = -VISION_GAIN * VISION_GATE
        proj.weight[det, :k] = torch.eye(k) / VISION_GAIN
    # after pooling, ln_post ~= x / sigma again; the projection reads the detector channels only
    visual.proj.zero_()
    visual.proj[det] = torch.randn(k, visual.proj.shape[1], generator=generator) * sigma * k**-0.5


@torch.no_grad()
def craft_tiny_synchformer(model: nn.Module, generator: torch.Generator) -> None:
    """Set the weights of a tiny `Synchformer` (in place)."""
    mf = model.vfeat_extractor
    dim = mf.cfg.embed_dim
    carrier_ch = SYNC_CARRIER_CHANNELS
    # ---- tubelet embedding: mean colour of the tubelet measured from black (input -1)
    w = mf.patch_embed_3d.proj.weight  # (dim, 3, t, p, p)
    per_pixel = w.shape[2] * w.shape[3] * w.shape[4]
    colour = torch.zeros(dim, 3)
    colour[carrier_ch:] = _zero_mean_columns(torch.randn(dim - carrier_ch, 3, generator=generator))
    w.copy_((colour / per_pixel)[:, :, None, None, None].expand_as(w))
    mf.patch_embed_3d.proj.bias.copy_(colour.sum(dim=1))  # +1 per channel: black (-1) -> 0
    # ---- constant carrier on the first channels (zero mean): LayerNorm stays ~linear
    carrier = torch.zeros(dim)
    carrier[:carrier_ch] = SYNC_CARRIER * torch.tensor([1.0, -1.0]).repeat(carrier_ch // 2)
    mf.pos_embed.copy_(carrier.expand_as(mf.pos_embed))
    _zero_(mf.temp_embed, mf.cls_token)
    for blk in mf.blocks:  # identity blocks
        _zero_(blk.attn.proj.weight, blk.attn.proj.bias, blk.timeattn.proj.weight, blk.timeattn.proj.bias,
               blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    # ---- aggregation over the patches of each tubelet: uniform attention whose values drop
    # the carrier and undo the layer norms' 1/carrier scale
    agg = mf.spatial_attn_agg
    agg.cls_token.zero_()
    sa = agg.self_attn
    sa.in_proj_weight.zero_()
    sa.in_proj_bias.zero_()
    # LayerNorm divides by its std ~= carrier * sqrt(carrier_ch / dim); a second LayerNorm of
    # the same tokens (norm1) changes nothing, as LayerNorm is scale-invariant
    gain = SYNC_CARRIER * (carrier_ch / dim) ** 0.5
    value = torch.zeros(dim, dim)
    value[carrier_ch:, carrier_ch:] = torch.eye(dim - carrier_ch) * gain
    sa.in_proj_weight[2 * dim:].copy_(value)
    sa.out_proj.weight.copy_(torch.eye(dim))
    sa.out_proj.bias.zero_()
    _zero_(agg.linear2.weight, agg.linear2.bias)
