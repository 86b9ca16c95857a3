"""WavFlowGenerator (the Python inference API): checkpoint loading and checks, determinism,
CFG equivalences, lengths, loudness, cached features. Tiny model, 1 s clips, 4 steps, CPU."""

from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path

import numpy as np
import pyloudnorm as pyln
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from wavflow.config import apply_overrides, copy_config, explicit_keys, load_config
from wavflow.errors import CheckpointError, ConfigError, FeatureError
from wavflow.generator import ConditionFeatures, WavFlowGenerator, row_seed
from wavflow.model import build_model_from_config
from wavflow.infer_rows import InferRow, unique_names
from wavflow.predict import write_outputs

SR, DUR, STEPS = 16000, 1.0, 4
# 1 s of video: 8 CLIP frames, (25-16)//8+1 = 2 Synchformer segments x 8 = 16 tokens.
TINY_OVERRIDES = [
    "model.name=tiny_16k",
    f"data.audio_duration={DUR}",
    "data.clip_seq_len=8",
    "data.sync_seq_len=16",
    "encoders.profile=tiny",
    f"sampling.num_steps={STEPS}",
]
N = math.ceil(SR * DUR / 200)  # 80 patches


def tiny_cfg(*extra: str):
    return load_config("infer.yaml", [*TINY_OVERRIDES, *extra])


def perturbed_state_dict(cfg, seed: int) -> dict[str, torch.Tensor]:
    """A fresh model outputs exactly 0 (zeroed adaLN / final layer); add noise to every weight."""
    model = build_model_from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return {k: v.clone() for k, v in model.state_dict().items()}


def save_checkpoints(folder: Path, cfg, *, global_step: int = 50, train_cfg=None) -> dict[str, Path]:
    """A trainer-format checkpoint (live != EMA weights, with its config) and a flat EMA file."""
    folder.mkdir(parents=True, exist_ok=True)
    live, ema = perturbed_state_dict(cfg, 1), perturbed_state_dict(cfg, 2)
    # The trainer records its resolved config as YAML text.
    train_cfg = OmegaConf.to_yaml(cfg if train_cfg is None else train_cfg)
    full = {
        "model": live,
        "model_ema1": ema,
        "model_ema2": live,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 1,
        "global_step": global_step,
        "config": train_cfg,
    }
    paths = {"full": folder / "checkpoint_latest.pth", "flat": folder / "ema_epoch_1.pth"}
    torch.save(full, paths["full"])
    torch.save(ema, paths["flat"])
    return paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_cfg()
    paths = save_checkpoints(folder, cfg)
    return paths, cfg


@pytest.fixture(scope="module")
def gen(ckpts):
    paths, cfg = ckpts
    return WavFlowGenerator.from_checkpoint(paths["full"], config=cfg, use_ema=False, device="cpu")


def random_features(gen: WavFlowGenerator, seed: int, video: bool, text: bool) -> ConditionFeatures:
    g = torch.Generator().manual_seed(seed)
    m = gen.model
    return ConditionFeatures(
        clip=torch.randn(m.clip_seq_len, m.clip_dim, generator=g) if video else None,
        sync=torch.randn(m.sync_seq_len, m.sync_dim, generator=g) if video else None,
        text=torch.randn(m.text_seq_len, m.text_dim, generator=g) if text else None,
    )


# ------------------------------------------------------------------------ names / seeds


def test_output_names_unique_safe_and_seeds_stable():
    assert unique_names(["a", "a", "a_1", "../evil", "", "x y"]) == ["a", "a_2", "a_1", "evil", "row", "x_y"]
    # The documented formula (crc32 of "<seed>/<id>"), pinned to values: a re-run and a reordered
    # CSV give each id the same seed, and a change of the formula shows up here.
    assert row_seed(7, "a") == zlib.crc32(b"7/a") == 4140581796
    assert row_seed(14159265, "clip") == zlib.crc32(b"14159265/clip")
    assert len({row_seed(7, "a"), row_seed(8, "a"), row_seed(7, "b")}) == 3


# ------------------------------------------------------------------------ checkpoints


def test_checkpoint_kinds_load_the_right_weights(ckpts, caplog):
    paths, cfg = ckpts
    live = torch.load(paths["full"], weights_only=True)["model"]
    ema = torch.load(paths["flat"], weights_only=True)
    cases = [(paths["full"], True, ema), (paths["full"], False, live), (paths["flat"], True, ema)]
    for path, use_ema, expected in cases:
        with caplog.at_level(logging.WARNING, logger="wavflow.generator"):
            caplog.clear()
            g = WavFlowGenerator.from_checkpoint(path, config=cfg, use_ema=use_ema, device="cpu")
        got = g.model.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), (path, use_ema)
        warned = [r.getMessage() for r in caplog.records if "EMA horizon" in r.getMessage()]
        if path == paths["full"] and use_ema:
            # The EMA caveat: a 50-step run's EMA is ~its initialisation (horizon 1/(1-0.9999)).
            assert len(warned) == 1 and "global_step=50" in warned[0] and "10000" in warned[0]
            assert g.checkpoint.source.startswith("model_ema1") and g.checkpoint.global_step == 50
        else:
            assert warned == []
    assert WavFlowGenerator.from_checkpoint(paths["flat"], config=cfg, device="cpu").checkpoint.global_step is None


def test_ckpt_path_may_be_a_run_directory(ckpts, tmp_path, caplog):
    """A run directory stands for its checkpoint_latest.pth (said in the log); a directory without
    one is an error naming the files to give instead, not "checkpoint not found"."""
    paths, cfg = ckpts
    run_dir = paths["full"].parent
    with caplog.at_level(logging.INFO):
        g = WavFlowGenerator.from_checkpoint(run_dir, config=cfg, use_ema=False, device="cpu")
    assert g.checkpoint.path == str(run_dir / "checkpoint_latest.pth")
    assert any("is a run directory: using its checkpoint_latest.pth" in r.getMessage() for r in caplog.records)
    live = torch.load(paths["full"], weights_only=True)["model"]
    assert all(torch.equal(g.model.state_dict()[k], v) for k, v in live.items())
    (tmp_path / "ema_epoch_3.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a directory without checkpoint_latest.pth; give checkpoint_latest.pth, "
                       r"checkpoint_epoch_N.pth or ema_epoch_N.pth inside it \(found: ema_epoch_3.pth\)"):
        WavFlowGenerator.from_checkpoint(tmp_path, config=cfg, device="cpu")


def test_checkpoint_config_mismatch_is_an_error_naming_key_and_values(tmp_path, ckpts):
    _, cfg = ckpts
    trained = tiny_cfg("data.audio_duration=2.0", "data.clip_seq_len=16", "data.sync_seq_len=40")
    paths = save_checkpoints(tmp_path, cfg, train_cfg=trained)
    with pytest.raises(ConfigError) as err:
        WavFlowGenerator.from_checkpoint(paths["full"], config=cfg, device="cpu")
    msg = str(err.value)
    assert "data.audio_duration=1.0 is set but the checkpoint was trained with data.audio_duration=2.0" in msg
    assert "\n" not in msg and str(paths["full"]) in msg and "inference.allow_config_mismatch=true" in msg
    assert "data.clip_seq_len" in msg and "data.sync_seq_len" in msg and "data.target_sample_rate" not in msg
    # Deliberate override: loads, with the shapes of the inference config.
    ok = WavFlowGenerator.from_checkpoint(paths["full"], config=tiny_cfg("inference.allow_config_mismatch=true"), device="cpu")
    assert ok.model.latent_seq_len == N
    # Keys the caller leaves unset come from the checkpoint.
    adopted = WavFlowGenerator.from_checkpoint(paths["full"], device="cpu", overrides=["encoders.profile=tiny"])
    assert adopted.duration == 2.0 and adopted.model.latent_seq_len == 160 and adopted.model.preset_name == "tiny_16k"


def test_api_adopts_the_checkpoint_values_the_caller_left_unset(tmp_path, ckpts, caplog):
    """A config from load_config takes the checkpoint's model, shapes and encoders wherever it
    does not set them; what it sets must agree. A config built by hand is checked as given."""
    _, cfg = ckpts
    trained = tiny_cfg("data.audio_duration=2.0", "data.clip_seq_len=16", "data.sync_seq_len=40")
    paths = save_checkpoints(tmp_path, cfg, train_cfg=trained)
    loaded = load_config("infer.yaml", ["sampling.num_steps=2"])  # medium_16k, 8 s, default encoders
    with caplog.at_level(logging.INFO, logger="wavflow.generator"):
        g = WavFlowGenerator.from_checkpoint(paths["full"], config=loaded, device="cpu")
    assert g.duration == 2.0 and g.model.latent_seq_len == 160 and g.model.preset_name == "tiny_16k"
    assert g.cfg.encoders.profile == "tiny" and g.cfg.sampling.num_steps == 2
    assert loaded.model.name == "medium_16k"  # the caller's config is left alone
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("adopted from the config recorded in")]
    assert len(said) == 1 and "model.name='tiny_16k'" in said[0] and "data.audio_duration=2.0" in said[0]
    assert "data.audio_dim" not in said[0]  # equal values are not listed
    # Overrides equal to the checkpoint's values load; others are errors naming both values.
    same = WavFlowGenerator.from_checkpoint(paths["full"], device="cpu", overrides=["model=tiny_16k", "data.audio_duration=2"])
    assert same.duration == 2.0 and same.model.clip_seq_len == 16
    with pytest.raises(ConfigError, match=r"data\.audio_duration=4\.0 is set but the checkpoint was trained with "
                       r"data\.audio_duration=2\.0"):
        WavFlowGenerator.from_checkpoint(paths["full"], device="cpu", overrides=["data.audio_duration=4.0"])
    with pytest.raises(ConfigError, match=r"model\.name='small_16k' is set"):
        WavFlowGenerator.from_checkpoint(paths["full"], config=loaded, overrides=["model.name=small_16k"], device="cpu")
    by_hand = OmegaConf.create(OmegaConf.to_container(loaded))
    with pytest.raises(ConfigError, match=r"model\.name='medium_16k' is set but the checkpoint was trained with "
                       r"model\.name='tiny_16k'"):
        WavFlowGenerator.from_checkpoint(paths["full"], config=by_hand, device="cpu")


def test_explicit_keys_are_the_ones_the_user_set(tmp_path):
    assert explicit_keys(load_config("infer.yaml")) == frozenset()
    # A group choice sets its values; tiny_16k's condition lengths follow data.audio_duration.
    assert explicit_keys(load_config("infer.yaml", ["model=tiny_16k"])) == {
        "model.name", "model.spectral_skip", "model.level_head", "data.target_sample_rate"}
    both = explicit_keys(load_config("infer.yaml", ["model=tiny_16k", "inference.duration_sec=2"]))  # a reference key
    assert {"data.audio_duration", "data.clip_seq_len", "data.sync_seq_len"} <= both
    assert {"data.audio_duration", "data.clip_seq_len"} <= explicit_keys(load_config("infer.yaml", ["model=medium_16k"]))
    assert "encoders.profile" in explicit_keys(load_config("infer.yaml", ["encoders=tiny"]))
    user = tmp_path / "user.yaml"  # the user's own file counts, not the infer.yaml it extends
    user.write_text("_base_: infer.yaml\ndata:\n  audio_duration: 3.0\nsampling:\n  num_steps: 2\n")
    loaded = load_config(user, ["inference.cfg=2.0"])
    assert explicit_keys(loaded) == {"data.audio_duration", "sampling.num_steps", "inference.cfg"}
    copied = copy_config(loaded)
    apply_overrides(copied, ["inference.seed=3"])
    assert explicit_keys(copied) == explicit_keys(loaded) | {"inference.seed"}
    copied.model.name = "tiny_16k"  # edited in place: set too
    assert explicit_keys(copied) == explicit_keys(loaded) | {"inference.seed", "model.name"}
    assert explicit_keys(OmegaConf.create({"model": {"name": "tiny_16k"}})) is None  # unknown: all count


def test_model_name_that_does_not_fit_the_weights_says_which(ckpts):
    paths, _ = ckpts
    with pytest.raises(CheckpointError) as err:  # flat file: only the weight shapes can tell
        WavFlowGenerator.from_checkpoint(paths["flat"], config=tiny_cfg("model.name=small_16k"), device="cpu")
    assert "small_16k" in str(err.value) and "tiny_16k" in str(err.value)
    with pytest.raises(ConfigError, match="model.name='small_16k' is set but the checkpoint was trained with "
                       "model.name='tiny_16k'"):
        WavFlowGenerator.from_checkpoint(paths["full"], model_name="small_16k", config=tiny_cfg(), device="cpu")


# ------------------------------------------------------------------------ sampling


def test_same_seed_same_audio_across_batch_sizes_and_orders(gen):
    kinds = [(True, True), (False, True), (True, False), (False, False)]
    items = [random_features(gen, i, v, t) for i, (v, t) in enumerate(kinds)]
    seeds = [row_seed(5, f"row{i}") for i in range(4)]
    together = gen.generate_batch(items, seeds, cfg=3.0, steps=STEPS)
    assert together.shape == (4, SR) and together.dtype == torch.float32
    alone = torch.cat([gen.generate_batch([it], [s], cfg=3.0, steps=STEPS) for it, s in zip(items, seeds)])
    reversed_ = gen.generate_batch(items[::-1], seeds[::-1], cfg=3.0, steps=STEPS).flip(0)
    # Same batch size, other order: bit-identical (each row's noise has its own generator).
    assert torch.equal(reversed_, together)
    # Batch 1 vs 4: the noise is bit-identical, but BLAS/oneDNN pick other kernels for another
    # batch size, so the audio agrees to float rounding (measured max ~8e-5 on ~0.4 amplitude).
    torch.testing.assert_close(alone, together, rtol=0, atol=5e-4)
    other_seed = gen.generate_batch(items[:1], [seeds[0] + 1], cfg=3.0, steps=STEPS)
    assert (other_seed[0] - together[0]).abs().mean() > 0.05
    assert together.abs().mean() > 0.01  # not the silent output of an untrained net


def _reference_euler(model, x0, conds, cfg, steps, scale=3.0):
    """Euler on x-predictions written from docs/method.md §3 / §2.11: the reference ode_wrapper, i.e. two
    separate forward passes, the empty conditions computed on batch 1 and broadcast."""
    b = x0.shape[0]
    cond = model.preprocess_conditions(*conds)
    empty = model.get_empty_conditions(b)
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float32)
    x = x0
    for i in range(steps):
        t = grid[i]
        tv = t * torch.ones(b)
        pred = model.predict_flow(x, tv, cond)
        if cfg > 1:
            pred = cfg * pred + (1 - cfg) * model.predict_flow(x, tv, empty)
        x = x + (grid[i + 1] - t) * ((pred - x) / torch.clamp(1 - t, min=1e-6))
    return (x / scale).reshape(b, -1)[:, :SR]


def test_cfg_one_is_conditional_and_batched_cfg_equals_two_pass(gen):
    items = [random_features(gen, 10, True, True), random_features(gen, 11, False, True)]
    seeds = [3, 4]
    x0 = gen.initial_noise(seeds)
    assert torch.equal(x0[1], torch.randn(N, 200, generator=torch.Generator().manual_seed(4)))
    conds = gen.stack_conditions(items)
    with torch.inference_mode():
        cond_only = _reference_euler(gen.model, x0, conds, 1.0, STEPS)
        two_pass = _reference_euler(gen.model, x0, conds, 4.5, STEPS)
        cond_no_empty = gen.model.predict_flow  # cfg=1 must never touch the empty branch:
    calls = []
    gen.model.predict_flow = lambda x, t, c: calls.append(x.shape[0]) or cond_no_empty(x, t, c)
    try:
        out1 = gen.generate_batch(items, seeds, cfg=1.0, steps=STEPS)
    finally:
        del gen.model.predict_flow
    assert calls == [2] * STEPS
    assert torch.equal(out1, cond_only)
    batched = gen.generate_batch(items, seeds, cfg=4.5, steps=STEPS, batched_cfg=True)
    separate = gen.generate_batch(items, seeds, cfg=4.5, steps=STEPS, batched_cfg=False)
    assert torch.equal(separate, two_pass)  # batched_cfg=false is the reference computation
    # One forward on the doubled batch: the same formula up to float rounding (other kernels).
    torch.testing.assert_close(batched, separate, rtol=0, atol=5e-4)
    assert (batched - out1).abs().mean() > 1e-3  # guidance does something


def test_generate_text_only_exact_length_and_untrimmed(gen, wavflow_cache_dir):
    wave, sr = gen.generate(text='a dog, "barking"', cfg=4.5, steps=STEPS, seed=1)
    assert sr == SR and wave.shape == (SR,) and torch.isfinite(wave).all()
    gen.set_duration(0.513)  # round(16000*0.513) = 8208 samples, N = 42 patches
    try:
        short, _ = gen.generate(text="a dog", steps=2, seed=1)
        full, _ = gen.generate(text="a dog", steps=2, seed=1, trim=False)
        assert short.shape == (8208,) and full.shape == (8400,)
        assert torch.equal(full[:8208], short)
    finally:
        gen.set_duration(DUR)
    assert gen.model.latent_seq_len == N and gen.num_samples == SR


# ------------------------------------------------------------------------ features


def test_cached_features_win_and_are_shape_checked(gen, tmp_path):
    feats = random_features(gen, 20, True, True)
    path = tmp_path / "row.pth"
    torch.save({"clip_features": feats.clip, "sync_features": feats.sync, "text_features": feats.text}, path)
    # The video file does not exist: the cached features are used instead of decoding it.
    got = gen.encode_row(video=tmp_path / "missing.mp4", text="ignored", features_path=path)
    assert torch.equal(got.clip, feats.clip) and torch.equal(got.sync, feats.sync) and torch.equal(got.text, feats.text)
    t2a = gen.encode_row(video=None, text="x", features_path=path)
    assert t2a.clip is None and t2a.sync is None and t2a.kind == "T2A"
    torch.save({"clip_features": torch.zeros(64, 1024), "sync_features": feats.sync}, path)
    with pytest.raises(FeatureError, match=r"row\.pth: clip_features has shape \(64, 1024\), the model expects \(8, 1024\)"):
        gen.encode_row(video=tmp_path / "missing.mp4", features_path=path)


# ------------------------------------------------------------------------ loudness


def test_loudness_normalised_to_target_and_silence_is_safe(gen, tmp_path):
    cfg = tiny_cfg(f"output.output_dir={tmp_path}")
    wave = gen.generate_batch([random_features(gen, 30, False, True)], [9], steps=STEPS)[0]
    row = InferRow(index=0, name="loud", video=None, caption="x", features_path=None)
    write_outputs(gen, row, wave, tmp_path, cfg)
    data, sr = sf.read(tmp_path / "loud.wav", dtype="float64")
    assert sr == SR and data.shape == (SR,) and row.mp4_path == ""
    assert abs(pyln.Meter(SR).integrated_loudness(data) - (-23.0)) < 0.5
    assert np.abs(data).max() <= 1.0
    silent = InferRow(index=1, name="silent", video=None, caption=None, features_path=None)
    write_outputs(gen, silent, torch.zeros(SR), tmp_path, cfg)
    data, _ = sf.read(tmp_path / "silent.wav", dtype="float64")
    assert data.shape == (SR,) and np.isfinite(data).all() and not data.any()


# ------------------------------------------------------------------------ job config


def test_heun_sampler_and_job_config_errors(gen, tmp_path, capsys):
    out = gen.generate_batch([random_features(gen, 40, False, True)], [1], steps=2, method="heun")
    assert out.shape == (1, SR) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="sampling.method must be one of"):
        gen.generate_batch([ConditionFeatures()], [1], steps=2, method="rk4")
    from wavflow.predict import check_infer_config, main

    with pytest.raises(ConfigError, match=r"model.ckpt_path must be set"):
        check_infer_config(tiny_cfg("data.csv_path=x.csv"))
    with pytest.raises(ConfigError, match=r"inference.batch_size must be an integer >= 1, got 0"):
        check_infer_config(tiny_cfg("data.csv_path=x.csv", "model.ckpt_path=c.pth", "inference.batch_size=0"))
    # A config error stops the job before any row: exit code 2.
    assert main(["--config", "infer.yaml", "--bogus"]) == 2
    csv = tmp_path / "rows.csv"
    csv.write_text("id,video_path,caption,video_exist,text_exist\nr0,,a dog barks,false,true\n")
    # A checkpoint that cannot be used, on a CSV that is fine (missing, then corrupt): bad input, exit 3.
    for ckpt, said in ((tmp_path / "none.pth", "not found"), (tmp_path / "bad.pth", "could not be loaded")):
        if ckpt.name == "bad.pth":
            ckpt.write_bytes(b"not a torch file")
        capsys.readouterr()
        args = [*TINY_OVERRIDES, f"data.csv_path={csv}", f"model.ckpt_path={ckpt}",
                f"output.output_dir={tmp_path / 'out'}"]
        assert main(["--config", "infer.yaml", *args]) == 3
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("[wavflow.predict] error: ") and str(ckpt) in last and said in last, last


def test_checkpoints_of_a_real_short_training_run_load(tmp_path, caplog):
    """The trainer's own files: checkpoint_latest.pth (EMA and live) and ema_epoch_N.pth."""
    from tests.test_train_common import DURATION as TRAIN_DUR, SHAPES, make_config, make_dataset
    from wavflow.train.trainer import run_training

    csv = make_dataset(tmp_path)
    run_training(make_config(tmp_path, csv, training__ema_checkpoint_save_epoch=1))
    run_dir = tmp_path / "out" / "exp"
    infer = load_config("infer.yaml", ["model.name=tiny_16k", f"data.audio_duration={TRAIN_DUR}",
                                       *[f"data.{k}={v}" for k, v in SHAPES.items()], "sampling.num_steps=2"])
    n_samples = round(SR * TRAIN_DUR)
    live = torch.load(run_dir / "checkpoint_latest.pth", weights_only=True)
    for path, use_ema, key in [("checkpoint_latest.pth", True, "model_ema1"), ("checkpoint_latest.pth", False, "model"),
                               ("ema_epoch_2.pth", True, None)]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wavflow.generator"):
            g = WavFlowGenerator.from_checkpoint(run_dir / path, config=infer, use_ema=use_ema, device="cpu")
        expected = live[key] if key else torch.load(run_dir / path, weights_only=True)
        assert all(torch.equal(g.model.state_dict()[k], v) for k, v in expected.items())
        out = g.generate_batch([random_features(g, 1, True, True)], [0])
        assert out.shape == (1, n_samples) and torch.isfinite(out).all()
        young = [r.getMessage() for r in caplog.records if "EMA horizon" in r.getMessage()]
        assert bool(young) == (key == "model_ema1")
        if young:
            assert f"global_step={live['global_step']}" in young[0]
    # No config given: the run's recorded config (YAML text) supplies model and data settings.
    adopted = WavFlowGenerator.from_checkpoint(run_dir / "checkpoint_latest.pth", use_ema=False, device="cpu")
    assert adopted.duration == TRAIN_DUR and adopted.model.text_dim == SHAPES["text_dim"]


# ------------------------------------------------------------------------ review fixes


def test_encoder_profile_and_clip_model_are_checked_against_the_checkpoint(tmp_path, ckpts):
    _, cfg = ckpts
    # Trained on features of the tiny encoders; inference with the default profile.
    paths = save_checkpoints(tmp_path / "tiny", cfg, train_cfg=tiny_cfg())
    with pytest.raises(ConfigError) as err:
        WavFlowGenerator.from_checkpoint(paths["full"], config=tiny_cfg("encoders.profile=default"), device="cpu")
    assert "encoders.profile='default' is set but the checkpoint was trained with encoders.profile='tiny'" in str(err.value)
    assert "encoders.clip_model" not in str(err.value)  # unused by the tiny profile
    allowed = tiny_cfg("encoders.profile=default", "inference.allow_config_mismatch=true")
    assert WavFlowGenerator.from_checkpoint(paths["full"], config=allowed, device="cpu").cfg.encoders.profile == "default"
    # Same (default) profile, another CLIP.
    trained = tiny_cfg("encoders.profile=default", "encoders.clip_model=hf-hub:org/other-clip")
    paths = save_checkpoints(tmp_path / "clip", cfg, train_cfg=trained)
    default_clip = "encoders.clip_model=hf-hub:apple/DFN5B-CLIP-ViT-H-14-384"
    with pytest.raises(ConfigError) as err:
        WavFlowGenerator.from_checkpoint(paths["full"], config=tiny_cfg("encoders.profile=default", default_clip),
                                         device="cpu")
    msg = str(err.value)
    assert "encoders.clip_model='hf-hub:apple/DFN5B-CLIP-ViT-H-14-384' is set but the checkpoint was trained with " \
           "encoders.clip_model='hf-hub:org/other-clip'" in msg and "encoders.profile" not in msg
    # Left unset, the CLIP is the checkpoint's.
    adopted = WavFlowGenerator.from_checkpoint(paths["full"], config=tiny_cfg("encoders.profile=default"), device="cpu")
    assert adopted.cfg.encoders.clip_model == "hf-hub:org/other-clip"
    # A recorded config without an encoders section: nothing to compare, it loads.
    no_enc = OmegaConf.to_container(tiny_cfg())
    del no_enc["encoders"]
    paths = save_checkpoints(tmp_path / "noenc", cfg, train_cfg=OmegaConf.create(no_enc))
    assert WavFlowGenerator.from_checkpoint(paths["full"], config=tiny_cfg("encoders.profile=default"), device="cpu")


def test_video_conditions_from_features_only_and_missing_ones_named(gen, tmp_path):
    feats = random_features(gen, 21, True, False)
    path = tmp_path / "v.pth"
    torch.save({"clip_features": feats.clip, "sync_features": feats.sync}, path)
    got = gen.encode_row(video=None, features_path=path, want_video=True)
    assert got.kind == "V2A" and torch.equal(got.clip, feats.clip) and torch.equal(got.sync, feats.sync)
    torch.save({"text_features": random_features(gen, 22, False, True).text}, path)
    with pytest.raises(FeatureError, match=r"v\.pth has no clip_features/sync_features and no video was given"):
        gen.encode_row(video=None, text="x", features_path=path, want_video=True)


def test_gpu_flag_must_be_device_indices_and_needs_cuda(tmp_path, monkeypatch, capsys):
    from wavflow.predict import _pop_gpu, main

    monkeypatch.delenv("GPU", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test
    assert _pop_gpu(["--gpu", "0,1", "a=b"]) == (["a=b"], "0,1")
    assert _pop_gpu(["a=b", "--gpu=3"]) == (["a=b"], "3")
    assert _pop_gpu(["a=b"]) == (["a=b"], None)
    # The override after --gpu is not swallowed: it is not a device list.
    with pytest.raises(ConfigError, match=r"--gpu must be a device index .* got 'model.ckpt_path=c.pth'"):
        _pop_gpu(["--gpu", "model.ckpt_path=c.pth"])
    with pytest.raises(ConfigError, match="--gpu needs a device index"):
        _pop_gpu(["--gpu", "--config", "x.yaml"])
    monkeypatch.setenv("GPU", "cuda:0")
    with pytest.raises(ConfigError, match=r"GPU \(environment variable\) must be a device index .* got 'cuda:0'"):
        _pop_gpu([])
    monkeypatch.setenv("GPU", "1")
    assert _pop_gpu([]) == ([], "1")
    monkeypatch.delenv("GPU")

    # --gpu on a machine without CUDA: exit 2 with a clear message, no silent CPU run.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    args = ["--config", "infer.yaml", "--gpu", "0", *TINY_OVERRIDES, f"data.csv_path={tmp_path / 'x.csv'}",
            "model.ckpt_path=c.pth", f"output.output_dir={out}"]
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--gpu 0" in last and "CUDA is not available" in last, last
    assert not out.exists()  # stopped before anything was written
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # restricted before torch touched CUDA


def test_header_only_csv_is_an_error_and_device_is_logged(tmp_path, caplog, capsys):
    from wavflow.predict import main

    csv = tmp_path / "rows.csv"
    csv.write_text("id,video_path,caption,video_exist,text_exist\n")
    args = ["--config", "infer.yaml", *TINY_OVERRIDES, f"data.csv_path={csv}", "model.ckpt_path=c.pth",
            f"output.output_dir={tmp_path / 'out'}", "inference.device=cpu"]
    with caplog.at_level(logging.INFO, logger="wavflow.predict"):
        assert main(args) == 3  # bad input
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"[wavflow.predict] error: CSV {csv} has a header but no rows: nothing to predict", last
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("device: cpu, precision: fp32") for m in messages)


def test_rows_without_id_or_video_are_named_and_seeded_by_position(tmp_path):
    """The documented exception (README, "Each row's starting noise"): such a row's name, and so
    its seed, is its position; moving it in the CSV changes its audio."""
    from wavflow.infer_rows import read_rows

    header = "video_path,caption,video_exist,text_exist\n"
    a, b = ",rain on a roof,0,1\n", ",a dog barks,0,1\n"
    (tmp_path / "ab.csv").write_text(header + a + b)
    (tmp_path / "ba.csv").write_text(header + b + a)
    ab, ba = read_rows(tmp_path / "ab.csv", None), read_rows(tmp_path / "ba.csv", None)
    assert [r.name for r in ab] == [r.name for r in ba] == ["row_00000", "row_00001"]
    assert ab[0].caption == ba[1].caption == "rain on a roof"  # same row, other name, other seed
