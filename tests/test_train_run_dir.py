"""One trainer per experiment folder (lock file), stale temporaries cleaned at start-up, and
every rank resuming from the same checkpoint as rank 0 (or a clear stop)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_common import make_config, make_dataset
from wavflow.errors import ConfigError
from wavflow.train.run_dir import release_run_locks
from wavflow.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent

_HOLD_LOCK = """
import sys, time
from pathlib import Path
from wavflow.train.run_dir import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_trainer_on_a_live_folder_is_refused_and_a_dead_ones_lock_is_not(tmp_path):
    csv = make_dataset(tmp_path)
    exp_dir = tmp_path / "out" / "exp"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(exp_dir)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"another trainer \(pid {holder.pid} on host .+\) is running on {exp_dir}"):
            Trainer(make_config(tmp_path, csv))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (exp_dir / "train.lock").is_file()  # left behind by the killed holder ...
    try:
        Trainer(make_config(tmp_path, csv))  # ... and it does not block the next run
        assert (exp_dir / "train.lock").read_text().startswith(f"pid {os.getpid()} on host ")
    finally:
        release_run_locks()


def test_stale_checkpoint_temporaries_of_this_run_are_removed_and_logged(tmp_path, caplog):
    csv = make_dataset(tmp_path)
    exp_dir = tmp_path / "out" / "exp"
    exp_dir.mkdir(parents=True)
    stale = [exp_dir / n for n in (".checkpoint_latest.pth.k2j4_9ab.tmp", ".checkpoint_epoch_3.pth.x1.tmp",
                                   ".ema_epoch_12.pth.abc.tmp")]
    kept = [exp_dir / n for n in (".other.pth.abc.tmp", "checkpoint_latest.pth.abc.tmp", ".checkpoint_latest.pth.tmp",
                                  ".checkpoint_latest.pth.abc.tmp.keep", "notes.txt")]
    for path in stale + kept:
        path.write_bytes(b"x" * 10)
    try:
        with caplog.at_level(logging.WARNING, logger="wavflow.train"):
            Trainer(make_config(tmp_path, csv))
    finally:
        release_run_locks()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    said = caplog.text
    assert all(f"Removed {p}, left by an interrupted checkpoint write" in said for p in stale), said


# Rank 1 of a 2-process run sees a different checkpoint_latest.pth than rank 0 (what a lagging
# or non-shared file system does): a later step, or no readable file at all.
_DISAGREEING_RANK = """
import os, sys
import wavflow.train.train_state as trainer
from wavflow.errors import CheckpointError
original = trainer.load_latest_checkpoint
def other_view(path):
    if sys.argv[1] == "missing":
        raise CheckpointError(f"resume checkpoint not found: {path}")
    ckpt = original(path)
    ckpt["global_step"] += 1
    ckpt["model"]["empty_clip_feat"] = ckpt["model"]["empty_clip_feat"] + 1.0
    return ckpt
if os.environ["RANK"] == "1":
    trainer.load_latest_checkpoint = other_view
from wavflow.train.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("view", ["later", "missing"])
def test_ranks_that_read_another_checkpoint_stop_the_run_with_one_clear_line(tmp_path, view):
    from tests.test_train_common import overrides
    from wavflow.train.trainer import run_training

    csv = make_dataset(tmp_path)
    run_training(make_config(tmp_path, csv, training__max_steps=1))
    script = tmp_path / "worker.py"
    script.write_text(_DISAGREEING_RANK)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), view,
         *overrides(tmp_path, csv)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode != 0
    out = proc.stderr
    assert "rank 1 does not see the checkpoint rank 0 resumes from" in out, out[-3000:]
    assert "training.output_dir must be on a file system shared by all nodes" in out, out[-3000:]
    said = "global step 2" if view == "later" else "CheckpointError: resume checkpoint not found"
    assert said in out, out[-3000:]
    assert "Training completed" not in (tmp_path / "out" / "exp" / "training.log").read_text()


@pytest.mark.parametrize("n, world", [(12, 2), (13, 2), (5, 3), (4, 1), (7, 4)])
def test_rest_of_epoch_sampler_is_distributed_samplers_order(n, world):
    from torch.utils.data import DistributedSampler

    from wavflow.train.epoch_data import RestOfEpochSampler

    for rank in range(world):
        ds = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, drop_last=False, seed=0)
        ds.set_epoch(3)
        full = list(ds)
        assert list(RestOfEpochSampler(n, epoch=3, consumed=0, rank=rank, world_size=world)) == full
        skip = 2 * world  # two samples per rank trained: the rest of the same rank's order
        rest = RestOfEpochSampler(n, epoch=3, consumed=skip, rank=rank, world_size=world)
        assert list(rest) == full[2:] and len(rest) == len(full) - 2


@pytest.mark.slow
def test_two_ranks_stopped_mid_epoch_resume_on_one_rank_at_the_exact_sample(tmp_path, monkeypatch):
    """2 ranks train 2 of 3 steps of epoch 1 (8 of 12 samples), then 1 rank resumes: it must
    train exactly the epoch's 4 remaining samples, in the global order, then epoch 2 whole."""
    import torch

    from tests.test_train_common import overrides
    from wavflow.io_utils import safe_torch_load
    from wavflow.train.dataset import TrainDataset
    from wavflow.train.trainer import run_training

    csv = make_dataset(tmp_path)
    common = dict(training__repeat_factor=3, training__max_steps=2)  # 12 samples, batch 2
    env = dict(os.environ, WAVFLOW_PYTHON=sys.executable, OMP_NUM_THREADS="1", NPROC_PER_NODE="2")
    env.pop("CONFIG_PATH", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "launch" / "train_single_node.sh"),
                           *overrides(tmp_path, csv, **common)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = tmp_path / "out" / "exp" / "checkpoint_latest.pth"
    ckpt = safe_torch_load(latest)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["batch_in_epoch"], ckpt["samples_in_epoch"]) == (0, 2, 2, 8)

    seen: list[int] = []
    original = TrainDataset.__getitem__
    monkeypatch.setattr(TrainDataset, "__getitem__", lambda self, i: seen.append(i) or original(self, i))
    try:
        result = run_training(make_config(tmp_path, csv, training__repeat_factor=3))
    finally:
        release_run_locks()
    assert (result.epoch, result.global_step) == (2, 2 + 2 + 6)
    order = [torch.randperm(12, generator=torch.Generator().manual_seed(epoch)).tolist() for epoch in (0, 1)]
    assert seen == order[0][8:] + order[1]
    log = (tmp_path / "out" / "exp" / "training.log").read_text()
    assert "stopped mid-epoch after 8 sample(s) of epoch 1 on 2 rank(s); this run (1 rank(s))" in log
