"""Whole training runs in-process (world size 1): exact resume, bad CSVs, corrupt checkpoints,
mixed VT2A/T2A/V2A data, initial weights, SIGTERM."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train_common import make_config, make_dataset, overrides, write_sample
from wavflow.errors import CheckpointError, ManifestError, RowsFailedError
from wavflow.io_utils import safe_torch_load
from wavflow.train.trainer import Trainer, run_training

ROOT = Path(__file__).resolve().parent.parent


def _assert_same_tree(a, b, where="ckpt"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_stop_mid_epoch_and_resume_is_bit_identical(tmp_path):
    csv = make_dataset(tmp_path)
    common = dict(training__label_drop_prob=0.5, training__ema_warmup=True,
                  training__lr_schedule="cosine", training__epochs=2)
    full = run_training(make_config(tmp_path / "a", csv, **common))
    assert (full.epoch, full.global_step, full.stopped_early) == (2, 4, False)
    part = run_training(make_config(tmp_path / "b", csv, training__max_steps=3, **common))
    assert (part.epoch, part.global_step, part.stopped_early) == (1, 3, True)  # stopped inside epoch 2
    mid = safe_torch_load(part.exp_dir / "checkpoint_latest.pth")
    assert (mid["epoch"], mid["global_step"], mid["batch_in_epoch"]) == (1, 3, 1)
    rest = run_training(make_config(tmp_path / "b", csv, **common))
    assert (rest.epoch, rest.global_step) == (2, 4)
    a = safe_torch_load(full.exp_dir / "checkpoint_latest.pth")
    b = safe_torch_load(rest.exp_dir / "checkpoint_latest.pth")
    for key in ("model", "model_ema1", "model_ema2", "optimizer", "epoch", "global_step", "rng"):
        _assert_same_tree(a[key], b[key], key)
    assert set(a["model_ema1"]) == {n for n in a["model"] if not n.endswith("rot")}  # EMA over all params
    assert "empty_string_feat" in a["model_ema1"]
    log = (rest.exp_dir / "training.log").read_text()
    assert "Resumed from" in log and "Stopped by training.max_steps" in log


def test_stop_on_the_last_batch_of_an_epoch_resumes_bit_identical(tmp_path):
    """A stop (signal or max_steps) on an epoch's last batch saves "epoch 0, every batch done";
    the resume must train no batch twice, run that epoch's end-of-epoch saves, and end where an
    uninterrupted run ends. (A SIGTERM landing there made CI's SIGTERM test see epoch 0, step 8.)"""
    csv = make_dataset(tmp_path)
    common = dict(training__epochs=2, training__ema_checkpoint_save_epoch=1)  # 2 batches per epoch
    full = run_training(make_config(tmp_path / "a", csv, **common))
    part = run_training(make_config(tmp_path / "b", csv, training__max_steps=2, **common))
    mid = safe_torch_load(part.exp_dir / "checkpoint_latest.pth")
    assert (mid["epoch"], mid["global_step"], mid["batch_in_epoch"]) == (0, 2, 2)
    assert not (part.exp_dir / "ema_epoch_1.pth").exists()  # the end-of-epoch work is still to do
    rest = run_training(make_config(tmp_path / "b", csv, **common))
    assert (rest.epoch, rest.global_step) == (2, 4)
    for name in ("ema_epoch_1.pth", "ema_epoch_2.pth"):
        _assert_same_tree(safe_torch_load(full.exp_dir / name), safe_torch_load(rest.exp_dir / name), name)
    a = safe_torch_load(full.exp_dir / "checkpoint_latest.pth")
    b = safe_torch_load(rest.exp_dir / "checkpoint_latest.pth")
    for key in ("model", "model_ema1", "model_ema2", "optimizer", "epoch", "global_step", "rng"):
        _assert_same_tree(a[key], b[key], key)


@pytest.mark.parametrize("first,then", [("default", "fused"), ("fused", "foreach")])
def test_resume_uses_the_optimizer_kernel_of_the_new_command(tmp_path, first, then):
    """optimizer.load_state_dict restores the saved groups' foreach/fused flags; a run resumed
    with another training.optimizer_impl must run the kernel its command asks for."""
    csv = make_dataset(tmp_path)
    run_training(make_config(tmp_path, csv, training__max_steps=1, training__optimizer_impl=first))
    resumed = Trainer(make_config(tmp_path, csv, training__optimizer_impl=then))
    assert resumed.global_step == 1  # it did resume
    fresh = Trainer(make_config(tmp_path / "fresh", csv, training__optimizer_impl=then))
    for got, want in zip(resumed.optimizer.param_groups, fresh.optimizer.param_groups):
        assert (got["foreach"], got["fused"]) == (want["foreach"], want["fused"])
    assert resumed.optimizer.state  # the moments came back with it


def test_bad_csv_rows_are_reported_together(tmp_path):
    csv = make_dataset(tmp_path)
    lines = csv.read_text().splitlines()
    good = lines[1].split(",")
    wrong_shape = tmp_path / "features" / "wrong.pth"
    torch.save({"text_features": torch.zeros(3, 3), "clip_features": torch.zeros(2, 2), "sync_features": torch.zeros(1, 1)}, wrong_shape)
    t2a_audio, t2a_feat = write_sample(tmp_path, "t2a_as_video", "t2a", seed=7)
    bad = [
        f"dup_{0}," + ",".join(good[1:]),
        "vt2a_0," + ",".join(good[1:]),  # duplicate of line 2
        f"flag,{good[1]},{good[2]},2,1",
        f"noaudio,{tmp_path}/missing.wav,{good[2]},1,1",
        f"nofeat,{good[1]},{tmp_path}/missing.pth,1,1",
        f"shape,{good[1]},{wrong_shape},1,1",
        f"t2a_as_video,{t2a_audio},{t2a_feat},1,1",  # claims video but the file has none
    ]
    csv.write_text("\n".join(lines + bad) + "\n")
    other = tmp_path / "other.csv"
    other.write_text("id,audio_path,features_path,video_exist,text_exist\n" + "t2a_1," + ",".join(good[1:]) + "\n")
    with pytest.raises(ManifestError) as err:
        Trainer(make_config(tmp_path, [str(csv), str(other)], data__on_bad_row="error"))
    msg = str(err.value)
    expected = {
        "line 7 (id 'vt2a_0')": "duplicate id (first on line 2)",
        "line 8 (id 'flag')": "video_exist='2' is not 0 or 1",
        "line 9 (id 'noaudio')": "audio_path not found",
        "line 10 (id 'nofeat')": "features_path not found",
        "line 11 (id 'shape')": "clip_features has shape (2, 2), expected (8, 32)",
        "line 12 (id 't2a_as_video')": "clip_features missing",
        "line 2 (id 't2a_1')": "duplicate id",
    }
    for where, reason in expected.items():
        line = next((l for l in msg.splitlines() if where in l), None)
        assert line is not None and reason in line, (where, msg)
    assert str(other) in msg and "data.on_bad_row=error" in msg
    assert not (tmp_path / "out" / "exp" / "checkpoint_latest.pth").exists()

    with pytest.raises(ManifestError) as err:  # other.csv lost its only row: never silently dropped
        Trainer(make_config(tmp_path, [str(csv), str(other)], data__on_bad_row="skip"))
    assert f"training CSV {other}: all 1 row(s) failed the check" in str(err.value)
    # skipped rows count against data.max_failed_fraction (default 1 %): 6 of 11 stop the run
    with pytest.raises(RowsFailedError) as err:
        Trainer(make_config(tmp_path, str(csv), data__on_bad_row="skip"))
    assert str(err.value).startswith("6 of 11 training CSV rows (data.on_bad_row=skip) failed (54.5% failed, above "
                                     "data.max_failed_fraction=0.01); first: 'vt2a_0': ")
    assert not (tmp_path / "out" / "exp" / "checkpoint_latest.pth").exists()
    tr = Trainer(make_config(tmp_path, str(csv), data__on_bad_row="skip", data__max_failed_fraction=0.6))
    assert sorted(r.sample_id for r in tr.dataset.rows) == ["dup_0", "t2a_1", "v2a_2", "vt2a_0", "vt2a_3"]
    log = (tmp_path / "out" / "exp" / "training.log").read_text()
    assert log.count("skipping ") == 12 and "(id 'shape')" in log  # 6 by each of the two runs

    missing_col = tmp_path / "nocol.csv"
    missing_col.write_text("id,audio_path\nx,y\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) features_path"):
        Trainer(make_config(tmp_path, str(missing_col)))


def test_corrupt_latest_checkpoint_is_an_error_with_fallback(tmp_path):
    csv = make_dataset(tmp_path)
    latest = tmp_path / "out" / "exp" / "checkpoint_latest.pth"
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError) as err:
        Trainer(make_config(tmp_path, csv))
    msg = str(err.value)
    assert str(latest) in msg and "move it aside" in msg and "training.resume=false" in msg
    torch.save({"not": torch.zeros(1)}, latest)
    with pytest.raises(CheckpointError, match="not a full training checkpoint"):
        Trainer(make_config(tmp_path, csv))
    fresh = Trainer(make_config(tmp_path, csv, training__resume=False))
    assert fresh.global_step == 0 and fresh.epoch == 0


def test_mixed_csvs_train_in_one_run_and_read_failures_are_skipped(tmp_path):
    t2a_root, vt_root = tmp_path / "t2a", tmp_path / "vt"
    t2a_csv = make_dataset(t2a_root, modes=("t2a", "t2a"), relative=True)  # paths relative to data_root
    text = t2a_csv.read_text().replace("t2a_0,", "tt_0,").replace("t2a_1,", "tt_1,")
    t2a_csv.write_text(text)
    vt_csv = make_dataset(vt_root, modes=("vt2a", "v2a", "vt2a"))
    cfg = make_config(tmp_path, [str(t2a_csv), str(vt_csv)], data__data_root=str(t2a_root),
                      training__epochs=1, training__gen_train_freq=1, data__max_failed_fraction=0.2)
    trainer = Trainer(cfg)
    assert sorted(r.sample_id for r in trainer.dataset.rows) == ["tt_0", "tt_1", "v2a_1", "vt2a_0", "vt2a_2"]
    assert {(r.video_exist, r.text_exist) for r in trainer.dataset.rows} == {(False, True), (True, False), (True, True)}
    (vt_root / "audio" / "v2a_1.wav").write_bytes(b"garbage")  # breaks after the up-front check
    result = trainer.train()
    assert result.global_step == 3 and result.skipped_rows == 1
    log = (result.exp_dir / "training.log").read_text()  # per epoch and at the end: the count and the row
    assert "1 row(s) failed at read time this epoch and were skipped: 'v2a_1': AudioError" in log
    assert "1 row read(s) failed in this run, within data.max_failed_fraction=0.2 per epoch: 'v2a_1'" in log
    ckpt = safe_torch_load(result.exp_dir / "checkpoint_latest.pth")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 3
    assert list((result.exp_dir / "samples" / "epoch_1").glob("gen_rank0_id_*.wav"))


def test_initial_load_accepts_reference_and_flat_checkpoints(tmp_path):
    csv = make_dataset(tmp_path)
    first = run_training(make_config(tmp_path / "a", csv, training__epochs=1, training__ema_checkpoint_save_epoch=1))
    full = safe_torch_load(first.exp_dir / "checkpoint_latest.pth")
    reference = {k: full[k] for k in ("model", "optimizer", "epoch", "global_step", "model_ema1", "model_ema2")}
    ref_path = tmp_path / "reference.pth"
    torch.save(reference, ref_path)
    tr = Trainer(make_config(tmp_path / "b", csv, checkpoint__initial_load_path=str(ref_path),
                             checkpoint__initial_load_model_only=False))
    assert (tr.epoch, tr.global_step) == (1, 2)
    assert torch.equal(tr.model.sync_pos_emb.detach(), full["model"]["sync_pos_emb"])
    assert torch.equal(tr.ema2.state_dict()["empty_clip_feat"], full["model_ema2"]["empty_clip_feat"])
    flat = Trainer(make_config(tmp_path / "c", csv, checkpoint__initial_load_path=str(first.exp_dir / "ema_epoch_1.pth")))
    ema = safe_torch_load(first.exp_dir / "ema_epoch_1.pth")
    assert flat.global_step == 0
    for name, p in flat.model.named_parameters():
        assert torch.equal(p.detach(), ema[name]) and torch.equal(flat.ema1.state_dict()[name], ema[name])


def test_sigterm_writes_a_loadable_checkpoint(tmp_path):
    csv = make_dataset(tmp_path)
    args = overrides(tmp_path, csv, training__epochs=1000, training__checkpoint_freq=0, training__repeat_factor=4)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "wavflow.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "out" / "exp" / "training.log"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and "GlobalStep 1 " in log.read_text():
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    ckpt = safe_torch_load(tmp_path / "out" / "exp" / "checkpoint_latest.pth")
    # 8 batches per epoch. A signal during an epoch's last batch stops before the end-of-epoch
    # bookkeeping, so the checkpoint says "epoch e, all 8 batches done" (the resume then runs the
    # end-of-epoch work: test_stop_on_the_last_batch_of_an_epoch_resumes_bit_identical).
    assert ckpt["global_step"] >= 1 and 0 <= ckpt["batch_in_epoch"] <= 8
    assert ckpt["epoch"] * 8 + ckpt["batch_in_epoch"] == ckpt["global_step"]
    assert "Stopped by SIGTERM" in log.read_text()


def test_features_extracted_for_other_clip_lengths_stop_with_a_data_hint(tmp_path):
    # VT2A features of 2 s clips (clip 16, sync 40) against data.* expecting 8/16: every video
    # row fails the same way. Before the fix they were skipped and a T2A-only model trained.
    vt_csv = make_dataset(tmp_path / "vt", modes=("vt2a", "v2a"))
    t2a_csv = make_dataset(tmp_path / "t2a", modes=("t2a", "t2a"))
    t2a_csv.write_text(t2a_csv.read_text().replace("t2a_0,", "tt_0,").replace("t2a_1,", "tt_1,"))
    for pth in (tmp_path / "vt" / "features").glob("v*.pth"):
        feats = torch.load(pth)
        feats["clip_features"] = torch.zeros(16, 32)
        feats["sync_features"] = torch.zeros(40, 24)
        torch.save(feats, pth)
    with pytest.raises(ManifestError) as err:
        Trainer(make_config(tmp_path, [str(t2a_csv), str(vt_csv)]))
    msg = str(err.value)
    assert f"training CSV {vt_csv}" in msg and "Set data.clip_seq_len=16 data.sync_seq_len=40" in msg
    assert "every clip_features tensor has shape (16, 32), expected (8, 32)" in msg
    assert not (tmp_path / "out" / "exp" / "checkpoint_latest.pth").exists()

    # One stream mis-shaped on every row that carries it, while other rows survive: also a stop.
    mixed = make_dataset(tmp_path / "mixed", modes=("vt2a", "t2a"))
    pth = tmp_path / "mixed" / "features" / "vt2a_0.pth"
    feats = torch.load(pth)
    feats["sync_features"] = torch.zeros(40, 24)
    torch.save(feats, pth)
    with pytest.raises(ManifestError, match=r"Set data\.sync_seq_len=40 "):
        Trainer(make_config(tmp_path, str(mixed)))


def test_a_run_whose_rows_all_fail_stops_and_writes_no_checkpoint(tmp_path):
    """Every row unreadable: no optimiser/EMA step (not even AdamW's decay on zero gradients), no
    checkpoint claiming a finished epoch, and a RowsFailedError (exit 1) naming the rows."""
    csv = make_dataset(tmp_path, modes=("t2a", "vt2a"))
    trainer = Trainer(make_config(tmp_path, csv, training__epochs=1, training__weight_decay=0.1,
                                  data__max_failed_fraction=0.5))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ema_before = trainer.ema1.state_dict()
    for row in trainer.dataset.rows:
        row.audio_path.write_text("not audio\n")  # both rows of the only batch fail at read time
    with pytest.raises(RowsFailedError) as err:
        trainer.train()
    msg = str(err.value)
    assert msg.startswith("2 of 2 row reads of epoch 1 (rows x training.repeat_factor) failed (every row failed); ")
    assert "'t2a_0': AudioError: audio file" in msg and "'vt2a_1': AudioError: " in msg
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n  # no AdamW decay/momentum step on zero grads
    for n, v in trainer.ema1.state_dict().items():
        assert torch.equal(v, ema_before[n]), n
    assert not trainer.optimizer.state  # AdamW never stepped
    exp = tmp_path / "out" / "exp"
    assert not list(exp.glob("*.pth")), "no checkpoint may claim the epoch was trained"
    log = (exp / "training.log").read_text()
    assert "nan" not in log.lower() and "Training completed" not in log


def test_main_exits_1_naming_the_rows_when_reads_fail_beyond_the_policy(tmp_path, capsys):
    """The command line's view of the case above with one bad row in four (25 % > 1 %)."""
    from wavflow.train.__main__ import main

    csv = make_dataset(tmp_path, modes=("t2a", "vt2a", "v2a", "t2a"))
    next((tmp_path / "audio").glob("v2a_2.wav")).write_text("not audio\n")
    rc = main(overrides(tmp_path, csv, training__epochs=1))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1, last
    assert last.startswith("[wavflow.train] error: 1 of 4 row reads of epoch 1") and "'v2a_2'" in last
    assert not list((tmp_path / "out" / "exp").glob("*.pth"))


def test_rerun_at_max_steps_trains_nothing_and_exits_0(tmp_path):
    """A finished run's command, run again, must not train past training.max_steps."""
    from wavflow.train.__main__ import main

    csv = make_dataset(tmp_path)
    args = overrides(tmp_path, csv, training__max_steps=2)
    assert main(args) == 0
    latest = tmp_path / "out" / "exp" / "checkpoint_latest.pth"
    before = latest.read_bytes()
    for _ in range(2):
        assert main(args) == 0
        assert safe_torch_load(latest)["global_step"] == 2
    assert latest.read_bytes() == before  # not even rewritten
    log = (tmp_path / "out" / "exp" / "training.log").read_text()
    assert log.count("training.max_steps=2 already reached (global step 2") == 2


def test_resume_of_a_cuda_run_on_cpu_restores_what_applies_and_says_what_not(tmp_path):
    """A checkpoint written on CUDA (its generator state is a 16-byte Philox state, plus a CUDA
    global state) resumes on CPU with one warning line instead of a raw RuntimeError."""
    csv = make_dataset(tmp_path)
    part = run_training(make_config(tmp_path, csv, training__max_steps=1))
    path = part.exp_dir / "checkpoint_latest.pth"
    ckpt = safe_torch_load(path)
    cpu_state = ckpt["rng"][0]
    ckpt["rng"][0] = {**cpu_state, "generator": torch.arange(16, dtype=torch.uint8), "generator_device": "cuda:0",
                      "cuda": torch.arange(16, dtype=torch.uint8)}
    torch.save(ckpt, path)
    rest = run_training(make_config(tmp_path, csv))
    assert (rest.epoch, rest.global_step, rest.stopped_early) == (2, 4, False)
    log = (rest.exp_dir / "training.log").read_text()
    assert (f"{path} comes from another kind of machine: not restored: the training generator (saved on cuda, "
            "this run uses cpu); the CUDA global RNG (no CUDA here); reseeded where needed. Training continues, "
            "but not bit-identically to an uninterrupted run") in log
    # what applies is restored: the CPU global RNG continues from the saved state
    from wavflow.train.checkpointing import restore_rng

    g = torch.Generator()
    assert restore_rng(cpu_state, g) == [] and torch.equal(torch.get_rng_state(), cpu_state["torch"])


def _epoch_ids(loader) -> list[list[str]]:
    return [list(batch["id"]) for batch in loader]


def test_persistent_workers_serve_every_epoch_and_read_the_same_batches(tmp_path):
    csv = make_dataset(tmp_path, modes=("vt2a", "t2a", "v2a") * 3)
    common = dict(training__num_workers=2, training__batch_size=2)
    fresh = Trainer(make_config(tmp_path / "a", csv, training__persistent_workers=False, **common))
    kept = Trainer(make_config(tmp_path / "b", csv, training__persistent_workers=True, **common))
    workers = None
    for epoch, consumed in ((0, 0), (1, 0), (2, 4), (3, 0)):  # (2, 4): a run resumed 4 rows into epoch 3
        for trainer in (fresh, kept):
            trainer.progress.samples_in_epoch = consumed
        loader = kept.epoch_loader_of(epoch)
        ids = _epoch_ids(loader)
        assert ids == _epoch_ids(fresh.epoch_loader_of(epoch)), epoch
        assert len(ids) == (math.ceil((9 - consumed) / 2)), epoch
        assert loader._iterator is not None, "the workers were shut down at the end of the epoch"
        pids = [w.pid for w in loader._iterator._workers]
        assert workers is None or pids == workers, "persistent workers were restarted"
        workers = pids
    assert loader is kept.epoch_loader_of(4)
    assert fresh.epoch_loader_of(4) is not fresh.epoch_loader_of(4)  # without: one loader per epoch
    fresh_order = [sum(_epoch_ids(fresh.epoch_loader_of(e)), []) for e in (4, 5)]
    assert fresh_order[0] != fresh_order[1]  # the epochs are shuffled apart, not one order repeated
    assert [sum(_epoch_ids(kept.epoch_loader_of(e)), []) for e in (4, 5)] == fresh_order


def test_persistent_workers_train_bit_identical_to_fresh_ones(tmp_path):
    csv = make_dataset(tmp_path, modes=("vt2a", "t2a", "v2a") * 2)
    runs = [run_training(make_config(tmp_path / name, csv, training__num_workers=2, training__epochs=3,
                                     training__persistent_workers=flag, training__label_drop_prob=0.5))
            for name, flag in (("a", False), ("b", True))]
    a, b = (safe_torch_load(r.exp_dir / "checkpoint_latest.pth") for r in runs)
    for key in ("model", "model_ema1", "optimizer", "global_step"):
        _assert_same_tree(a[key], b[key], key)
