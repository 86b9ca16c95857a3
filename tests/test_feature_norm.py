"""Feature normalisation: statistics files, the network's frozen cond_norm, training and predict."""

from __future__ import annotations

import pytest
import torch

from tests.test_train_common import SHAPES, make_config, make_dataset
from wavflow.errors import CheckpointError, ConfigError, FeatureError
from wavflow.features.report import STATS_FILENAME, FeatureStats, analyse_csv, identity_tag
from wavflow.io_utils import safe_torch_load
from wavflow.model import build_model
from wavflow.model.checkpoint import load_weights
from wavflow.train.feature_norm import resolve_feature_norm
from wavflow.train.trainer import run_training

SMALL = dict(latent_seq_len=16, **SHAPES)


def _stats(identity: str, seed: int = 0) -> FeatureStats:
    g = torch.Generator().manual_seed(seed)
    stats = FeatureStats(identity)
    for name, dim in (("clip_features", SHAPES["clip_dim"]), ("sync_features", SHAPES["sync_dim"]),
                      ("text_features", SHAPES["text_dim"])):
        stats.streams[name] = {"mean": torch.randn(dim, generator=g), "std": torch.rand(dim, generator=g) + 0.5}
        stats.tokens[name], stats.rows[name] = 10, 2
    return stats


def _conds(bs: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(bs, SHAPES["clip_seq_len"], SHAPES["clip_dim"], generator=g),
            torch.randn(bs, SHAPES["sync_seq_len"], SHAPES["sync_dim"], generator=g),
            torch.randn(bs, SHAPES["text_seq_len"], SHAPES["text_dim"], generator=g))


def test_network_normalises_every_input_and_equals_prenormalised_features():
    torch.manual_seed(0)
    plain = build_model("tiny_16k", **SMALL)
    normed = build_model("tiny_16k", **SMALL)
    normed.load_state_dict(plain.state_dict())
    stats = _stats("tiny-v3")
    normed.attach_condition_norm().set_statistics(stats.streams, identity_tag("tiny-v3"))
    clip, sync, text = _conds()

    def z(x, n):  # z-score per dimension; clip and text rescaled to the stream's RMS std
        std = stats.streams[n]["std"]
        keep = std.pow(2).mean().sqrt() if n != "sync_features" else 1.0
        return (x - stats.streams[n]["mean"]) / std * keep

    a = normed.preprocess_conditions(clip, sync, text)
    b = plain.preprocess_conditions(z(clip, "clip_features"), z(sync, "sync_features"), z(text, "text_features"))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    # the empty tokens go through the same transform (training substitutes them before preprocessing)
    ea, eb = normed.get_empty_conditions(2), plain.get_empty_conditions(2)
    assert not torch.allclose(ea.text_c, eb.text_c)
    e = normed.preprocess_conditions(normed.empty_clip_sequence(2), normed.empty_sync_sequence(2),
                                     normed.empty_string_sequence(2))
    for x, y in zip(ea, e):
        torch.testing.assert_close(x, y)


def test_cond_norm_keys_only_when_enabled_and_flat_state_dicts_restore_it():
    plain = build_model("tiny_16k", **SMALL)
    assert not any(k.startswith("cond_norm.") for k in plain.state_dict())
    normed = build_model("tiny_16k", **SMALL)
    normed.attach_condition_norm().set_statistics(_stats("tiny-v3").streams, identity_tag("tiny-v3"))
    sd = normed.state_dict()
    assert list(sd)[-8:] == [f"cond_norm.{k}" for k in ("clip_mean", "clip_std", "sync_mean", "sync_std",
                                                         "text_mean", "text_std", "source_tag",
                                                         "empty_token_format")]
    fresh = build_model("tiny_16k", **SMALL)
    load_weights(fresh, sd)  # a flat (EMA) state dict brings its normalisation along
    assert fresh.cond_norm is not None
    torch.testing.assert_close(fresh.cond_norm.text_std, normed.cond_norm.text_std)
    # a dimension with (near) zero spread is floored at 1 % of the stream's RMS std, not blown up
    flat = _stats("tiny-v3")
    flat.streams["clip_features"]["std"][0] = 0.0
    normed.cond_norm.set_statistics(flat.streams, 0.0)
    assert float(normed.cond_norm.clip_std[0]) == pytest.approx(0.01, rel=1e-5)
    assert int(fresh.cond_norm.source_tag.item()) == int(identity_tag("tiny-v3"))
    assert not any(p.requires_grad for p in fresh.cond_norm.parameters())


def test_resolve_feature_norm_modes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert resolve_feature_norm("auto", [a])[0] is None  # no statistics: off, says why
    assert "has no feature_stats.pt" in resolve_feature_norm("auto", [a])[1]
    with pytest.raises(ConfigError, match="data.feature_norm=true but .*feature_stats.pt does not exist"):
        resolve_feature_norm(True, [a])
    _stats("tiny-v3", 1).save(a / STATS_FILENAME)
    _stats("tiny-v3", 2).save(b / STATS_FILENAME)
    stats, why = resolve_feature_norm("auto", [a, b, a])
    assert stats is not None and why.startswith("on")
    # pooled statistics = statistics of the pooled tokens (equal token counts here)
    m1, m2 = _stats("tiny-v3", 1).streams["clip_features"], _stats("tiny-v3", 2).streams["clip_features"]
    torch.testing.assert_close(stats.streams["clip_features"]["mean"], (m1["mean"] + m2["mean"]) / 2)
    var = (m1["std"] ** 2 + m1["mean"] ** 2 + m2["std"] ** 2 + m2["mean"] ** 2) / 2 - ((m1["mean"] + m2["mean"]) / 2) ** 2
    torch.testing.assert_close(stats.streams["clip_features"]["std"], var.sqrt())
    assert resolve_feature_norm("false", [a])[0] is None
    _stats("default|clip=x|synchformer=y").save(b / STATS_FILENAME)
    with pytest.raises(Exception, match="different encoders"):
        resolve_feature_norm("auto", [a, b])
    stats, why = resolve_feature_norm("auto", [b])  # real encoders: off unless asked for
    assert stats is None and "not the built-in tiny encoders" in why
    assert resolve_feature_norm("true", [b])[0] is not None
    with pytest.raises(ConfigError, match="data.feature_norm must be"):
        resolve_feature_norm("sometimes", [b])


def test_statistics_of_a_csv_match_numpy(tmp_path):
    csv = make_dataset(tmp_path)
    _, stats = analyse_csv(csv, progress=False, encoder_identity="tiny-v3")
    rows = [safe_torch_load(tmp_path / "features" / f"{m}_{i}.pth") for i, m in enumerate(("vt2a", "t2a", "v2a", "vt2a"))]
    text = torch.cat([rows[i]["text_features"] for i in (0, 1, 3)])  # v2a rows have no text condition
    torch.testing.assert_close(stats.streams["text_features"]["mean"], text.mean(0))
    torch.testing.assert_close(stats.streams["text_features"]["std"], text.std(0, unbiased=False))
    clip = torch.cat([rows[i]["clip_features"] for i in (0, 2, 3)])
    torch.testing.assert_close(stats.streams["clip_features"]["mean"], clip.mean(0))
    assert stats.rows == {"text_features": 3, "clip_features": 3, "sync_features": 3}


def test_training_records_the_normalisation_and_resume_checks_it(tmp_path):
    csv = make_dataset(tmp_path)
    _, stats = analyse_csv(csv, progress=False, encoder_identity="tiny-v3")
    stats.save(tmp_path / "features" / STATS_FILENAME)
    res = run_training(make_config(tmp_path, csv, training__max_steps=2))
    ckpt = safe_torch_load(res.exp_dir / "checkpoint_latest.pth")
    for key in ("model", "model_ema1", "model_ema2"):
        torch.testing.assert_close(ckpt[key]["cond_norm.sync_mean"], stats.streams["sync_features"]["mean"])
    # the learned empty tokens start at zero network input, i.e. at the streams' means
    start = run_training(make_config(tmp_path / "zero", csv, training__max_steps=1, training__lr=1e-12))
    zero = safe_torch_load(start.exp_dir / "checkpoint_latest.pth")["model"]
    assert zero["empty_clip_feat"].abs().max() < 1e-6 and zero["empty_sync_feat"].abs().max() < 1e-6
    model = build_model("tiny_16k", **SMALL)
    load_weights(model, zero)
    torch.testing.assert_close(model.empty_clip_sequence(1)[0, 0], stats.streams["clip_features"]["mean"])
    torch.testing.assert_close(model.empty_sync_sequence(1)[0, 0], stats.streams["sync_features"]["mean"])
    assert "Feature normalisation: on" in (res.exp_dir / "training.log").read_text()
    with pytest.raises(ConfigError, match="trained with feature normalisation.*data.feature_norm=true"):
        run_training(make_config(tmp_path, csv, training__max_steps=3, data__feature_norm=False))
    off = run_training(make_config(tmp_path / "off", csv, training__max_steps=1, data__feature_norm=False))
    assert not any(k.startswith("cond_norm") for k in safe_torch_load(off.exp_dir / "checkpoint_latest.pth")["model"])


def test_generator_refuses_features_of_other_encoders(tmp_path):
    from wavflow.generator import WavFlowGenerator

    csv = make_dataset(tmp_path)
    _, stats = analyse_csv(csv, progress=False, encoder_identity="tiny-v3")
    stats.save(tmp_path / "features" / STATS_FILENAME)
    res = run_training(make_config(tmp_path, csv, training__max_steps=1))
    gen = WavFlowGenerator.from_checkpoint(res.exp_dir / "checkpoint_latest.pth", device="cpu")
    assert gen.model.cond_norm is not None
    feats = tmp_path / "features" / "vt2a_0.pth"
    gen.load_features(feats, video=True, text=True)  # same encoders: fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.pth").write_bytes(feats.read_bytes())
    FeatureStats("default|clip=a|synchformer=b").save(other / STATS_FILENAME)
    with pytest.raises(FeatureError, match=r"features in .*other make features of 'default\|clip=a"):
        gen.load_features(other / "x.pth", video=True, text=True)


def _near_constant_stats() -> FeatureStats:
    """Statistics like the built-in set's Synchformer stream: one dimension barely varies."""
    stats = _stats("tiny-v3")
    stats.streams["sync_features"]["mean"][0] = 0.05
    stats.streams["sync_features"]["std"][:] = 0.05
    stats.streams["sync_features"]["std"][0] = 0.0005  # the 1 % floor of the RMS std
    return stats


def test_learned_empty_tokens_stay_within_a_few_sigma_under_adamw():
    """The learning benchmark's NaN (docs/benchmarks.md): learned in raw units, AdamW moved the
    empty Synchformer token ~lr per element per step, tens of sigma in a near-constant dimension.
    Now every dimension of the network input moves ~lr / RMS(std) per step, as a typical
    dimension does when learned in raw units."""
    torch.manual_seed(0)
    model = build_model("tiny_16k", **SMALL)
    model.attach_condition_norm().set_statistics(_near_constant_stats().streams, identity_tag("tiny-v3"))
    opt = torch.optim.AdamW([model.empty_clip_feat, model.empty_sync_feat], lr=1e-3, weight_decay=0.0)
    steps, text = 300, model.empty_string_sequence(1)
    direction = torch.randn(SHAPES["sync_seq_len"], SHAPES["sync_dim"]).sign()
    for _ in range(steps):
        _, sync_z, _ = model.cond_norm(model.empty_clip_sequence(1), model.empty_sync_sequence(1), text)
        loss = -(sync_z[0] * direction).sum()  # a steady push, as a persistent gradient would give
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, sync_z, _ = model.cond_norm(model.empty_clip_sequence(1), model.empty_sync_sequence(1), text)
    rms_std = float(model.cond_norm.sync_std.pow(2).mean().sqrt())
    typical = steps * 1e-3 / rms_std  # 6 sigma here; raw-unit learning gives 0.3 / 0.0005 = 600 in dim 0
    assert sync_z.abs().max() <= typical * 1.05
    assert sync_z[0, 0, 0].abs() <= sync_z[0, 0, 1:].abs().max() * 1.05  # the near-constant dim: no faster
    assert sync_z.abs().max() >= typical * 0.5  # and it did learn


def test_checkpoints_with_raw_unit_empty_tokens_are_converted_on_load():
    """Feature-normalised checkpoints written before the marker keep producing the same inputs."""
    from wavflow.train.ema import ParamEMA

    torch.manual_seed(0)
    stats = _near_constant_stats()
    new = build_model("tiny_16k", **SMALL)
    new.attach_condition_norm().set_statistics(stats.streams, identity_tag("tiny-v3"))
    with torch.no_grad():
        new.empty_sync_feat.normal_()
        new.empty_clip_feat.normal_()
    want_clip, want_sync = new.empty_clip_sequence(1).clone(), new.empty_sync_sequence(1).clone()
    old = new.state_dict()  # the old layout: tokens in raw units and no marker
    del old["cond_norm.empty_token_format"]
    old["empty_clip_feat"], old["empty_sync_feat"] = want_clip[0, :1].clone(), want_sync[0, :1].clone()
    fresh = build_model("tiny_16k", **SMALL)
    load_weights(fresh, old)
    torch.testing.assert_close(fresh.empty_sync_sequence(1), want_sync, rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh.empty_clip_sequence(1), want_clip, rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh.empty_sync_feat, new.empty_sync_feat, rtol=1e-4, atol=1e-4)
    ema = ParamEMA(new, decay=0.999)
    ema.load_state_dict(old)
    torch.testing.assert_close(ema.state_dict()["empty_sync_feat"], new.empty_sync_feat.detach(), rtol=1e-4, atol=1e-4)
    broken = dict(old)
    del broken["cond_norm.sync_std"]  # a damaged file: the load names the key, no KeyError
    with pytest.raises(CheckpointError, match="missing: cond_norm.sync_std"):
        load_weights(build_model("tiny_16k", **SMALL), broken)
    plain = build_model("tiny_16k", **SMALL)  # networks without normalisation: untouched
    plain_sd = plain.state_dict()
    plain_sd["empty_sync_feat"] = torch.full_like(plain_sd["empty_sync_feat"], 3.0)
    load_weights(plain, plain_sd)
    assert torch.equal(plain.empty_sync_feat, plain_sd["empty_sync_feat"])


def test_each_stream_gets_its_configured_rms_after_normalisation():
    """rms 1.0: plain z-scores; a number: that per-dimension RMS; None: the stream's own RMS std."""
    stats = _stats("tiny-v3")
    m = build_model("small_16k", latent_seq_len=10, **SHAPES)
    norm = m.attach_condition_norm()
    norm.set_statistics(stats.streams, 1.0, rms={"clip_features": None, "sync_features": 1.0, "text_features": 0.3})
    g = torch.Generator().manual_seed(5)
    for short, name, want in (("clip", "clip_features", None), ("sync", "sync_features", 1.0), ("text", "text_features", 0.3)):
        mean, std = stats.streams[name]["mean"], stats.streams[name]["std"]
        x = mean + std * torch.randn(4000, mean.shape[0], generator=g)  # features with these statistics
        z = (x - getattr(norm, f"{short}_mean")) / getattr(norm, f"{short}_std")
        rms = float(z.pow(2).mean().sqrt())
        expected = float(std.pow(2).mean().sqrt()) if want is None else want
        assert rms == pytest.approx(expected, rel=0.03), (name, rms, expected)
    with pytest.raises(ValueError, match="text_features must be > 0"):
        norm.set_statistics(stats.streams, 1.0, rms={"text_features": 0.0})
