"""Training pieces against formulas written out here: LR schedule, EMA, RNG draw order,
label drop, empty-token substitution, gradient accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_train_common import SHAPES, make_config, make_dataset
from wavflow.errors import ConfigError, WavFlowError
from wavflow.train.ema import ParamEMA, ema_decay
from wavflow.train.lr_schedule import base_lr, lr_at
from wavflow.train.step import StepNoise, apply_label_drop, draw_step_noise
from wavflow.train.optimizer import optimizer_groups
from wavflow.train.trainer import Trainer


def test_lr_schedule_matches_reference_values():
    kw = dict(lr_base=1e-4, warmup_steps=20, schedule="cosine", epochs=1000)
    assert lr_at(global_step=0, lr_epoch=0.0, **kw) == pytest.approx(5e-6, rel=1e-12)
    assert lr_at(global_step=19, lr_epoch=0.0, **kw) == pytest.approx(1e-4, rel=1e-12)
    assert lr_at(global_step=20, lr_epoch=0.5, **kw) == pytest.approx(9.99999383e-05, rel=1e-8)
    assert lr_at(global_step=10**6, lr_epoch=500.0, **kw) == pytest.approx(5e-5, rel=1e-12)
    step = dict(lr_base=1e-3, warmup_steps=0, schedule="step", epochs=10, milestones=[2, 5], gamma=0.1)
    assert [lr_at(global_step=100, lr_epoch=e, **step) for e in (1.99, 2.0, 4.5, 5.0)] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5])
    assert lr_at(global_step=50, lr_epoch=3.0, lr_base=2e-4, warmup_steps=20, schedule="constant", epochs=5) == 2e-4
    assert base_lr(None, 5e-5, 2 * 4 * 3) == pytest.approx(5e-5 * 24 / 256)
    assert base_lr(3e-4, 5e-5, 24) == 3e-4


def test_ema_follows_formula_with_and_without_warmup():
    model = torch.nn.Linear(3, 2)
    ema = ParamEMA(model, 0.9, warmup=False)
    ema_w = ParamEMA(model, 0.9999, warmup=True)
    expected = [p.detach().clone() for p in model.parameters()]
    expected_w = [p.detach().clone() for p in model.parameters()]
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
        ema_w.update(model, step)
        d_w = min(0.9999, (1 + step) / (10 + step))
        assert ema_decay(0.9999, step, True) == d_w
        for e, ew, p in zip(expected, expected_w, model.parameters()):
            e += (1 - 0.9) * (p.detach() - e)
            ew += (1 - d_w) * (p.detach() - ew)
    for e, ew, got, got_w in zip(expected, expected_w, ema.shadow, ema_w.shadow):
        torch.testing.assert_close(got, e, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_w, ew, rtol=1e-6, atol=1e-7)
    state = ema.state_dict()
    assert list(state) == ["weight", "bias"] and all(v.device.type == "cpu" for v in state.values())


def test_step_noise_draw_order_and_label_drop_frequency():
    x1 = torch.zeros(20000, 1, 1)
    noise = draw_step_noise(torch.Generator().manual_seed(5), x1, mean=0.3, scale=1.5, noise_scale=2.0)
    g = torch.Generator().manual_seed(5)  # the spec order: t, x0, video drop, text drop
    n = torch.randn(20000, generator=g)
    x0 = torch.empty(20000, 1, 1).normal_(generator=g) * 2.0
    u_v, u_t = torch.rand(20000, generator=g), torch.rand(20000, generator=g)
    assert torch.equal(noise.t, torch.sigmoid(n * 1.5 + 0.3))
    assert torch.equal(noise.x0, x0) and torch.equal(noise.u_video, u_v) and torch.equal(noise.u_text, u_t)
    p = 0.1
    v, t = noise.u_video < p, noise.u_text < p
    assert abs(v.float().mean().item() - p) < 0.012 and abs(t.float().mean().item() - p) < 0.012
    assert abs((v & t).float().mean().item() - p * p) < 0.004  # independent draws


class _EmptyTokens(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.empty_clip_feat = torch.nn.Parameter(torch.full((1, 3), 7.0))
        self.empty_sync_feat = torch.nn.Parameter(torch.full((1, 2), 8.0))
        self.empty_string_feat = torch.nn.Parameter(torch.full((4, 3), 9.0), requires_grad=False)

    def empty_clip_sequence(self, bs):
        return self.empty_clip_feat.unsqueeze(0).expand(bs, 5, -1)

    def empty_sync_sequence(self, bs):
        return self.empty_sync_feat.unsqueeze(0).expand(bs, 6, -1)

    def empty_string_sequence(self, bs):
        return self.empty_string_feat.unsqueeze(0).expand(bs, -1, -1)


def test_label_drop_replaces_video_pair_and_text_independently():
    m = _EmptyTokens()
    clip, sync, text = torch.zeros(4, 5, 3), torch.zeros(4, 6, 2), torch.zeros(4, 4, 3)
    noise = StepNoise(t=torch.zeros(4), x0=torch.zeros(4), u_video=torch.tensor([0.05, 0.5, 0.05, 0.9]),
                      u_text=torch.tensor([0.5, 0.05, 0.05, 0.9]))
    c, s, t, nv, nt = apply_label_drop(m, clip, sync, text, noise, 0.1)
    assert nv.tolist() == [True, False, True, False] and nt.tolist() == [False, True, True, False]
    for row in range(4):
        assert bool((c[row] == 7).all()) == nv[row].item() and bool((s[row] == 8).all()) == nv[row].item()
        assert bool((t[row] == 9).all()) == nt[row].item()
        if not nv[row]:
            assert bool((c[row] == 0).all())


def test_video_and_text_drop_rates_can_be_set_apart():
    m = _EmptyTokens()
    clip, sync, text = torch.zeros(4, 5, 3), torch.zeros(4, 6, 2), torch.zeros(4, 4, 3)
    u = torch.tensor([0.05, 0.2, 0.4, 0.9])
    noise = StepNoise(t=torch.zeros(4), x0=torch.zeros(4), u_video=u, u_text=u)
    _, _, _, nv, nt = apply_label_drop(m, clip, sync, text, noise, 0.5, text_drop_prob=0.1)
    assert nv.tolist() == [True, True, True, False] and nt.tolist() == [True, False, False, False]


def test_drop_rates_default_to_label_drop_prob_and_are_validated(tmp_path):
    from wavflow.train.config_checks import drop_probs

    tr = _trainer(tmp_path, training__label_drop_prob=0.2, training__video_drop_prob=0.6)
    assert drop_probs(tr.tr) == (0.6, 0.2)
    with pytest.raises(ConfigError, match="training.text_drop_prob must lie in"):
        _trainer(tmp_path / "bad", training__text_drop_prob=1.5)


def _trainer(tmp_path: Path, **extra) -> Trainer:
    csv = make_dataset(tmp_path)
    return Trainer(make_config(tmp_path, csv, **extra))


def test_missing_modalities_reach_the_model_as_learned_empty_tokens(tmp_path):
    tr = _trainer(tmp_path, training__label_drop_prob=0.0)
    m = tr.model
    with torch.no_grad():  # distinct learned values, so a zero placeholder cannot pass
        m.empty_clip_feat.copy_(torch.linspace(1, 2, SHAPES["clip_dim"]))
        m.empty_sync_feat.copy_(torch.linspace(-2, -1, SHAPES["sync_dim"]))
    seen = {}
    m.register_forward_pre_hook(lambda mod, args: seen.update(clip=args[1], sync=args[2], text=args[3]))
    items = [tr.dataset[i] for i in range(len(tr.dataset))]  # vt2a, t2a, v2a, vt2a
    from wavflow.train.dataset import collate_train

    batch = collate_train(items)
    assert batch["video_exist"].tolist() == [True, False, True, True]
    assert batch["text_exist"].tolist() == [True, True, False, True]
    assert torch.equal(batch["clip_features"][1], torch.zeros(SHAPES["clip_seq_len"], SHAPES["clip_dim"]))  # placeholder
    tr.step.micro_step(batch)
    empty_string = torch.load(tmp_path / "features" / "empty_string.pt", weights_only=True)[0]
    assert torch.equal(m.empty_string_feat, empty_string)  # the learned file beside the features
    assert torch.equal(seen["clip"][1], m.empty_clip_feat.expand(SHAPES["clip_seq_len"], -1))
    assert torch.equal(seen["sync"][1], m.empty_sync_feat.expand(SHAPES["sync_seq_len"], -1))
    assert torch.equal(seen["text"][2], empty_string)
    assert torch.equal(seen["clip"][0], batch["clip_features"][0])  # present modalities untouched
    assert torch.equal(seen["text"][1], batch["text_features"][1])


def test_gradient_accumulation_equals_one_larger_batch(tmp_path):
    from wavflow.train.dataset import collate_train

    a = _trainer(tmp_path / "a", training__grad_accum_steps=2, training__batch_size=2, training__warmup_steps=0,
                 training__clip_grad_norm=0.5)
    b = _trainer(tmp_path / "b", training__grad_accum_steps=1, training__batch_size=4, training__warmup_steps=0,
                 training__clip_grad_norm=0.5)
    assert a.eff_batch == b.eff_batch == 4
    b.model.load_state_dict(a.model.state_dict())
    items = [a.dataset[i] for i in range(4)]
    big = collate_train(items)
    g = torch.Generator().manual_seed(3)
    noise = draw_step_noise(g, big["audio_tokens"], mean=0.0, scale=1.0, noise_scale=1.0)
    noise.u_video = torch.tensor([0.05, 0.5, 0.5, 0.5])  # exercise one drop
    parts = [StepNoise(*(getattr(noise, f)[sl] for f in ("t", "x0", "u_video", "u_text"))) for sl in (slice(0, 2), slice(2, 4))]
    a.step.draw_noise = lambda x1, it=iter(parts): next(it)
    b.step.draw_noise = lambda x1: noise
    stats_a = a.step.update([collate_train(items[:2]), collate_train(items[2:])], lr_epoch=0.0)
    stats_b = b.step.update([big], lr_epoch=0.0)
    assert stats_a["grad_norm"] == pytest.approx(stats_b["grad_norm"], rel=1e-5)
    assert stats_a["grad_norm"] > 0.5  # clipping was active in both
    # AdamW's first step is ~lr*sign(g): where |g| is near eps (1e-8) the micro-batch sum order
    # moves the step by up to a few % of lr (seen on an AVX2 host: 2 of 179,200 elements, 4e-7
    # at lr 1e-4). A wrong accumulation shows in the gradient norm above or as ~lr-sized errors.
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    changed = sum(not torch.equal(pa, pb) for pa, pb in zip(a.model.parameters(), a.ema1.shadow))
    assert changed > 0


def test_optimizer_groups_split_like_reference(tmp_path):
    tr = _trainer(tmp_path)
    groups = optimizer_groups(tr.model, 0.05)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[0]["params"]}
    decay = {names[id(p)] for p in groups[1]["params"]}
    assert "empty_string_feat" not in no_decay | decay
    assert {"empty_clip_feat", "empty_sync_feat", "sync_pos_emb"} <= decay
    assert all(n.endswith(".bias") or tr.model.get_parameter(n).ndim == 1 for n in no_decay)
    assert groups[1]["weight_decay"] == 0.05 and groups[0]["weight_decay"] == 0.0
    assert tr.optimizer.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("training.max_steps", "abc", "training.max_steps"),  # the loader or the trainer rejects it
        ("training.max_steps", "-1", "training.max_steps must be null or an integer >= 1"),
        ("training.max_steps", "0", "training.max_steps must be null or an integer >= 1"),
        ("training.batch_size", "0", "training.batch_size must be an integer >= 1"),
        ("training.spectral_skip_lr_scale", "0", "training.spectral_skip_lr_scale must be > 0"),
        ("training.grad_accum_steps", "0", "training.grad_accum_steps must be an integer >= 1"),
        ("training.repeat_factor", "0", "training.repeat_factor must be an integer >= 1"),
        ("training.label_drop_prob", "1.5", "training.label_drop_prob must lie in [0, 1]"),
        ("training.ema_decay1", "1.0", "training.ema_decay1 must lie in [0, 1)"),
        ("training.ema_decay2", "-0.1", "training.ema_decay2 must lie in [0, 1)"),
        ("training.experiment_id", "", "training.experiment_id='' must be a non-empty folder name"),  # exact: '' as typed
        ("training.experiment_id", "../../x", "training.experiment_id='../../x' must be a non-empty folder name"),
        ("training.experiment_id", "a/b", "training.experiment_id='a/b'"),
    ],
)
def test_training_keys_are_validated_at_start_up(tmp_path, key, value, fragment):
    from wavflow.errors import ConfigError
    from wavflow.train.config_checks import check_training_config

    from wavflow.config import load_config
    from tests.test_train_common import overrides

    with pytest.raises(ConfigError) as err:
        cfg = load_config("train.yaml", [*overrides(tmp_path, "unused.csv"), f"{key}={value}"])  # as typed on a CLI
        check_training_config(cfg)
    assert fragment in str(err.value)
    good = make_config(tmp_path, "unused.csv", training__max_steps=3, training__experiment_id="run_1")
    check_training_config(good)  # the valid neighbours pass


def test_cpu_warning_only_for_reference_presets_on_cpu():
    from wavflow.train.config_checks import cpu_reference_preset_warning

    msg = cpu_reference_preset_warning("medium_16k", torch.device("cpu"))
    assert msg is not None and "624 M parameters on CPU" in msg and "model.name=small_16k/tiny_16k" in msg
    assert "1032 M" in (cpu_reference_preset_warning("large_44k", torch.device("cpu")) or "")
    assert cpu_reference_preset_warning("tiny_16k", torch.device("cpu")) is None
    assert cpu_reference_preset_warning("medium_16k", torch.device("cuda", 0)) is None


def test_read_failure_is_warned_once_per_id_but_counted_every_time(tmp_path, caplog):
    from wavflow.train.dataset import TrainDataset, read_train_csvs

    csv = make_dataset(tmp_path, modes=("t2a", "t2a"))
    cfg = make_config(tmp_path, csv)
    rows, _ = read_train_csvs([str(csv)], None)
    rows[0].audio_path.write_bytes(b"garbage")
    ds = TrainDataset(rows, cfg.data, repeat_factor=3)
    with caplog.at_level("WARNING", logger="wavflow.train"):
        items = [ds[i] for i in range(len(ds))]
    # still skipped (and counted, with the reason) each time
    assert [list(it) == ["failed_row"] for it in items] == [True, False] * 3
    assert items[0]["failed_row"][0] == "t2a_0" and items[0]["failed_row"][1].startswith("AudioError: ")
    warned = [r.getMessage() for r in caplog.records if "at read time" in r.getMessage()]
    assert len(warned) == 1 and "'t2a_0'" in warned[0]


def test_main_reports_a_config_error_in_one_line_with_code_2(tmp_path, capsys):
    from tests.test_train_common import overrides
    from wavflow.train.__main__ import main

    csv = make_dataset(tmp_path, modes=("t2a",))
    code = main(overrides(tmp_path, csv, training__max_steps=-1))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["[wavflow.train] error: training.max_steps must be null or an integer >= 1, got -1"]
    assert not (tmp_path / "out" / "exp").exists()  # stopped before any output folder was made


class _Hostile:
    """Not on the weights-only allow-list: loading it would run arbitrary code."""


def test_hostile_feature_file_is_refused_with_one_clean_line(tmp_path: Path):
    from wavflow.errors import FeatureError
    from wavflow.train.dataset import FeatureShapes, TrainRow, load_features

    path = tmp_path / "evil.pth"
    torch.save({"text_features": torch.zeros(8, 32), "payload": _Hostile()}, path)
    row = TrainRow("evil", tmp_path / "evil.wav", path, False, True, 0, 0)
    shapes = FeatureShapes(clip=(8, 32), sync=(16, 24), text=(8, 32))
    with pytest.raises(FeatureError) as info:
        load_features(row, shapes)
    text = str(info.value)
    assert "\n" not in text and "\x1b" not in text, text
    assert "weights_only=False" not in text and "Weights only load failed" not in text, text
    assert str(path) in text and "'evil'" in text and "_Hostile" in text, text


def test_a_step_with_a_non_finite_gradient_is_skipped_and_a_run_of_them_stops(tmp_path):
    from wavflow.train.dataset import collate_train

    tr = _trainer(tmp_path, training__max_nonfinite_steps=2, training__warmup_steps=0)
    good = collate_train([tr.dataset[i] for i in range(2)])
    bad = collate_train([tr.dataset[i] for i in range(2)])
    bad["audio_tokens"][0, 0, 0] = float("inf")  # one inf sample: inf loss, NaN gradients
    weights = [p.detach().clone() for p in tr.model.parameters()]
    ema = [s.clone() for s in tr.ema1.shadow]

    stats = tr.step.update([bad], lr_epoch=0.0)
    assert stats["skipped"] and stats["reason"] == "nonfinite" and stats["rows"] == 0
    assert tr.global_step == 0 and tr.step.nonfinite_in_a_row == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, tr.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, tr.ema1.shadow))
    assert not tr.optimizer.state  # AdamW never stepped: no moments from the bad gradient

    stats = tr.step.update([good], lr_epoch=0.0)  # a finite step goes through and resets the count
    assert not stats["skipped"] and tr.global_step == 1 and tr.step.nonfinite_in_a_row == 0
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())

    tr.step.update([bad], lr_epoch=0.0)
    with pytest.raises(WavFlowError, match="2 optimiser steps in a row had a non-finite gradient norm"):
        tr.step.update([bad], lr_epoch=0.0)
    assert tr.global_step == 1 and all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_max_nonfinite_steps_0_applies_every_step_as_the_reference_does(tmp_path):
    from wavflow.train.dataset import collate_train

    tr = _trainer(tmp_path, training__max_nonfinite_steps=0, training__warmup_steps=0)
    bad = collate_train([tr.dataset[i] for i in range(2)])
    bad["audio_tokens"][0, 0, 0] = float("inf")
    stats = tr.step.update([bad], lr_epoch=0.0)
    assert not stats["skipped"] and tr.global_step == 1
    assert any(torch.isnan(p).any() for p in tr.model.parameters())
