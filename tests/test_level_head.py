"""The loudness head (wavflow/model/level_head.py, docs/method.md §2.15).

Its formulas, the reference layout untouched without it, checkpoints that carry it, the
training target the data set measures, a learning check (captions alone must set the level),
a training run that trains it and resumes bit-identically, and predict writing each clip at
the predicted loudness.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from tests.test_predict import TINY_OVERRIDES, tiny_cfg
from tests.test_train_common import SR, make_config, make_dataset, run_resumed_twice
from wavflow.audio import integrated_loudness
from wavflow.config import load_config
from wavflow.generator import WavFlowGenerator
from wavflow.errors import CheckpointError, ConfigError
from wavflow.io_utils import safe_torch_load
from wavflow.model import build_model, build_model_from_config
from wavflow.predict import check_infer_config, run as run_predict
from wavflow.model.checkpoint import load_weights
from wavflow.model.level_head import LEVEL_OFFSET_LUFS, LEVEL_UNIT_DB, level_loss, state_has_level_head
from wavflow.train.dataset import read_train_csvs, TrainDataset
from wavflow.train.step import fill_missing_modalities
from wavflow.train.trainer import run_training

N = 20
SHAPES = dict(clip_seq_len=8, sync_seq_len=16, text_seq_len=8, clip_dim=32, sync_dim=24, text_dim=32)


def _tiny(head: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("tiny_16k", latent_seq_len=N, **SHAPES)
    if head:
        model.attach_level_head()
    return model


def _conditions(b: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 8, 32, generator=g), torch.randn(b, 16, 24, generator=g), torch.randn(b, 8, 32, generator=g)


def test_the_head_starts_at_the_offset_and_its_loss_skips_rows_without_a_target():
    model = _tiny(True)
    lufs = model.predict_loudness(*_conditions(3))
    assert torch.equal(lufs, torch.full((3,), LEVEL_OFFSET_LUFS))
    pred = torch.tensor([-20.0, -30.0, -10.0], requires_grad=True)
    target = torch.tensor([-25.0, float("nan"), -10.0])
    loss = level_loss(pred, target)
    want = (((-20.0 + 25.0) / LEVEL_UNIT_DB) ** 2 + 0.0) / 2  # the nan row counts in neither sum
    assert math.isclose(float(loss.detach()), want, rel_tol=1e-6)
    loss.backward()
    assert pred.grad[1] == 0 and pred.grad[0] != 0
    none = level_loss(pred, torch.full((3,), float("nan")))
    assert float(none.detach()) == 0.0 and none.requires_grad  # every rank still reduces the head's gradient


def test_the_head_never_changes_the_conditions_it_reads():
    model = _tiny(True)
    clip, sync, text = (c.requires_grad_() for c in _conditions(2))
    torch.nn.init.normal_(model.level_head.experts[0][2].weight)
    model.predict_loudness(clip, sync, text).sum().backward()
    assert clip.grad is None and sync.grad is None and text.grad is None
    assert model.level_head.experts[0][0].weight.grad is not None


def test_weights_with_the_head_attach_it_and_weights_without_name_the_key():
    plain = _tiny(False)
    assert plain.level_head is None and not state_has_level_head(plain.state_dict())
    with pytest.raises(ValueError, match="no loudness head"):
        plain.predict_loudness(*_conditions(1))
    sd = _tiny(True).state_dict()
    assert state_has_level_head(sd)
    load_weights(plain, sd, source="head weights")  # as prediction builds it: attached on load
    assert plain.level_head is not None
    assert torch.equal(plain.level_head.experts[2][0].weight, sd["level_head.experts.2.0.weight"])
    with pytest.raises(CheckpointError, match="model.level_head=false"):
        load_weights(_tiny(True), _tiny(False).state_dict(), source="old weights")


def _write_tone(path, seconds: float, rms: float) -> None:
    t = np.arange(int(SR * seconds)) / SR
    sf.write(path, (rms * math.sqrt(2) * np.sin(2 * math.pi * 440 * t)).astype(np.float32), SR, subtype="FLOAT")


def test_the_data_set_measures_each_files_loudness_before_the_lifting(tmp_path):
    csv = make_dataset(tmp_path, modes=("vt2a", "t2a"))
    rows, _ = read_train_csvs([str(csv)], None)
    _write_tone(rows[0].audio_path, 0.6, 0.3)
    _write_tone(rows[1].audio_path, 0.3, 0.3)  # shorter than one 0.4 s gating block
    data_cfg = make_config(tmp_path, csv).data
    loud = TrainDataset(rows, data_cfg, measure_loudness=True)
    item = loud[0]
    want = integrated_loudness(sf.read(rows[0].audio_path, dtype="float32")[0], SR)
    assert math.isclose(float(item["loudness_lufs"]), want, abs_tol=1e-3) and -20 < want < -5
    assert math.isnan(float(loud[1]["loudness_lufs"]))
    quiet = tmp_path / "quiet.wav"
    _write_tone(quiet, 0.6, 0.03)  # 20 dB softer: 20 dB lower, the same lifted tokens
    soft = TrainDataset([rows[0].__class__(**{**rows[0].__dict__, "audio_path": quiet})], data_cfg,
                        measure_loudness=True)[0]
    assert math.isclose(float(item["loudness_lufs"]) - float(soft["loudness_lufs"]), 20.0, abs_tol=0.01)
    assert torch.allclose(item["audio_tokens"], soft["audio_tokens"], atol=1e-5)
    assert "loudness_lufs" not in TrainDataset(rows, data_cfg)[0]


def _learn_levels_from_captions(model: torch.nn.Module, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two caption classes at -14 and -34 LUFS; rows of every mode, missing streams filled with
    the empty tokens as the trainer fills them. Returns the classes' caption features."""
    g = torch.Generator().manual_seed(3)
    captions = torch.randn(2, 8, 32, generator=g)
    levels = torch.tensor([-14.0, -34.0])
    opt = torch.optim.AdamW(model.level_head.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        cls = torch.randint(0, 2, (16,), generator=g)
        text = captions[cls] + 0.3 * torch.randn(16, 8, 32, generator=g)
        clip = torch.randn(16, 8, 32, generator=g)  # video that says nothing about the level
        sync = torch.randn(16, 16, 24, generator=g)
        video = torch.rand(16, generator=g) < 0.5
        clip, sync, text = fill_missing_modalities(model, clip, sync, text, video, torch.ones(16, dtype=torch.bool))
        loss = level_loss(model.predict_loudness(clip, sync, text), levels[cls])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return captions, levels


def test_a_caption_alone_sets_the_predicted_level():
    """Measured within 1 dB of each class's level after 150 steps."""
    model = _tiny(True)
    captions, levels = _learn_levels_from_captions(model, steps=150)
    with torch.no_grad():
        clip, sync, text = fill_missing_modalities(model, torch.zeros(2, 8, 32), torch.zeros(2, 16, 24), captions,
                                                   torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
        got = model.predict_loudness(clip, sync, text)
    print(f"T2A predicted {got.tolist()} LUFS against {levels.tolist()}")
    assert (got - levels).abs().max() < 3.0


def _loud_and_soft_dataset(tmp_path):
    """make_dataset's rows with 0.5 s tones: even rows at -14 LUFS-ish, odd rows 20 dB softer."""
    csv = make_dataset(tmp_path)
    for i, row in enumerate(read_train_csvs([str(csv)], None)[0]):
        _write_tone(row.audio_path, 0.5, 0.3 if i % 2 == 0 else 0.03)
    return csv


def test_a_run_with_the_head_trains_it_resumes_bit_identically_and_leaves_the_flow_network_alone(tmp_path):
    csv = _loud_and_soft_dataset(tmp_path)
    clipped = dict(training__epochs=2, training__clip_grad_norm=0.1)  # every step clipped
    run, a, _ = run_resumed_twice(tmp_path, csv, model__level_head=True, **clipped)
    for entry in ("model", "model_ema1"):
        assert {"level_head.experts.0.0.weight", "level_head.experts.2.2.bias"} <= set(a[entry])
    assert a["model"]["level_head.experts.2.2.bias"].abs().max() > 0  # it trained on the measured targets
    text = (run / "training.log").read_text()
    assert "Loudness head: on" in text and "LevelLoss:" in text
    plain = safe_torch_load(run_training(make_config(tmp_path / "c", csv, **clipped)).exp_dir / "checkpoint_latest.pth")
    for entry in ("model", "model_ema1"):  # the head is clipped on its own and reads detached inputs
        assert set(a[entry]) - set(plain[entry]) == {k for k in a[entry] if k.startswith("level_head.")}
        for k in plain[entry]:
            assert torch.equal(a[entry][k], plain[entry][k]), (entry, k)


def _generator_with_head(folder, head: bool) -> WavFlowGenerator:
    """A tiny_16k generator whose weights are perturbed (a fresh network outputs 0); with `head`
    its loudness head predicts within a few dB of -23 LUFS, differently per caption."""
    cfg = tiny_cfg()
    model = build_model_from_config(cfg)
    if head:
        model.attach_level_head()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = folder / "checkpoint_latest.pth"  # trainer format: the page's command reads its config
    sd = model.state_dict()
    torch.save({"model": sd, "model_ema1": sd, "model_ema2": sd, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 1, "global_step": 50, "config": OmegaConf.to_yaml(cfg)}, path)
    return WavFlowGenerator.from_checkpoint(path, config=tiny_cfg(), use_ema=False, device="cpu")


def test_predict_writes_each_clip_at_the_loudness_its_conditions_predict(tmp_path, wavflow_cache_dir):
    gen = _generator_with_head(tmp_path, head=True)
    csv = tmp_path / "rows.csv"
    csv.write_text("id,video_path,caption,video_exist,text_exist,duration\n"
                   "rain,,heavy rain,0,1,\ndog,,a dog barks twice,0,1,\nlong,,heavy rain,0,1,2.5\n")
    cfg = load_config("infer.yaml", [*TINY_OVERRIDES, f"model.ckpt_path={gen.checkpoint.path}", f"data.csv_path={csv}",
                                     f"output.output_dir={tmp_path / 'out'}", "output.loudness_from_model=true"])
    rows = {r.name: r for r in run_predict(cfg, generator=gen).rows}
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("id")
    expected = {caption: gen.predict_loudness([gen.encode_row(text=caption)])[0]
                for caption in ("heavy rain", "a dog barks twice")}
    assert abs(expected["heavy rain"] - expected["a dog barks twice"]) > 0.5  # the captions differ in level
    for name, caption in (("rain", "heavy rain"), ("dog", "a dog barks twice")):
        assert rows[name].status == "ok"
        assert math.isclose(summary.loc[name, "loudness_lufs"], expected[caption], abs_tol=0.01)
        data, _ = sf.read(tmp_path / "out" / f"{name}.wav", dtype="float64")
        assert abs(integrated_loudness(data, SR) - expected[caption]) < 0.5
    assert rows["long"].windows > 1  # windows of one caption: the windows' power mean is that caption's level
    assert math.isclose(summary.loc["long", "loudness_lufs"], expected["heavy rain"], abs_tol=0.01)
    wave, _ = gen.generate(text="heavy rain", steps=2, loudness_lufs="model")  # the Python API takes "model" too
    assert abs(integrated_loudness(wave, SR) - expected["heavy rain"]) < 0.5
    (tmp_path / "plain").mkdir()
    plain = _generator_with_head(tmp_path / "plain", head=False)
    with pytest.raises(ConfigError, match="output.loudness_from_model=true needs weights trained with the loudness head"):
        run_predict(load_config("infer.yaml", [*TINY_OVERRIDES, f"data.csv_path={csv}", "model.ckpt_path=unused.pth",
                                               f"output.output_dir={tmp_path / 'plain_out'}",
                                               "output.loudness_from_model=true"]), generator=plain)


def test_loudness_from_model_needs_loudness_norm():
    cfg = load_config("infer.yaml", ["data.csv_path=x.csv", "model.ckpt_path=x.pth", "output.loudness_norm=false",
                                     "output.loudness_from_model=true"])
    with pytest.raises(ConfigError, match="output.loudness_norm=true"):
        check_infer_config(cfg)


def test_the_page_writes_the_predicted_loudness_and_its_command_repeats_it(tmp_path, wavflow_cache_dir):
    from tests.test_app import GOOD, _predict_same
    from wavflow.app.generation import parse_request, Studio

    gen = _generator_with_head(tmp_path, head=True)
    cfg = load_config("app.yaml", [*TINY_OVERRIDES, f"model.ckpt_path={gen.checkpoint.path}",
                                   f"output.output_dir={tmp_path / 'app'}", "output.loudness_from_model=true"])
    studio = Studio.load(cfg)
    result = studio.run(parse_request(**GOOD, limits=studio.limits))
    expected = gen.predict_loudness([gen.encode_row(text=GOOD["caption"])])[0]
    assert math.isclose(result.settings["loudness_lufs"], expected, abs_tol=1e-4)
    assert "output.loudness_from_model=true" in result.settings["command"]
    page_wave, _ = sf.read(result.wav, dtype="float32")
    assert abs(integrated_loudness(page_wave, SR) - expected) < 0.5
    np.testing.assert_array_equal(page_wave, _predict_same(result, studio, tmp_path, None))


def test_a_new_run_may_add_the_head_to_weights_without_one_but_not_drop_it(tmp_path):
    csv = _loud_and_soft_dataset(tmp_path)
    base = run_training(make_config(tmp_path / "base", csv, training__epochs=1))
    start = base.exp_dir / "checkpoint_latest.pth"
    added = run_training(make_config(tmp_path / "added", csv, model__level_head=True, training__epochs=1,
                                     training__init_from=str(start)))
    weights = safe_torch_load(added.exp_dir / "checkpoint_latest.pth")["model"]
    assert weights["level_head.experts.2.2.bias"].abs().max() > 0  # started as built, then trained
    with_head = added.exp_dir / "checkpoint_latest.pth"
    with pytest.raises(CheckpointError, match="carries level_head.* weights.*set model.level_head=true"):
        run_training(make_config(tmp_path / "dropped", csv, training__epochs=1, training__init_from=str(with_head)))


@pytest.mark.slow
def test_the_head_trains_alike_under_ddp_and_fsdp_on_two_ranks(tmp_path):
    from tests.test_fsdp import _losses, _train

    csv = _loud_and_soft_dataset(tmp_path)
    common = dict(model__level_head=True, training__epochs=2, training__batch_size=1)
    runs = {s: _train(tmp_path, csv, 2, s, training__strategy=s, **common) for s in ("ddp", "fsdp")}
    for strategy, proc in runs.items():
        assert proc.returncode == 0, (strategy, proc.stderr[-4000:])
    logs = {s: (tmp_path / "out" / s / "training.log").read_text() for s in runs}
    assert all("Weights identical on all 2 rank(s)" in text and "LevelLoss:" in text for text in logs.values())
    assert _losses(logs["fsdp"]) == pytest.approx(_losses(logs["ddp"]), rel=1e-4)
    a, b = (safe_torch_load(tmp_path / "out" / s / "checkpoint_latest.pth")["model"] for s in runs)
    head = [k for k in a if k.startswith("level_head.")]
    assert head and a["level_head.experts.2.2.bias"].abs().max() > 0
    for k in head:  # the head's gradient is reduced over the ranks under both strategies
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
