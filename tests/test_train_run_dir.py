"""One trainer per experiment folder (lock file), stale temporaries cleaned at start-up, and
every rank resuming from the same checkpoint as rank 0 (or a clear stop)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
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
import wavflow.train.trainer as trainer
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
