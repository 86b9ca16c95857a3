"""torchrun runs through the launchers: 2 processes on one node, and 2 "nodes" on one machine."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_common import make_dataset, overrides
from wavflow.io_utils import safe_torch_load

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "scripts" / "launch"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NNODES", "NODE_RANK", "MASTER_PORT", "CONFIG_PATH")}
    env.update(OMP_NUM_THREADS="1", WAVFLOW_PYTHON=sys.executable, **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_node_launcher_needs_master_addr():
    proc = subprocess.run(["bash", str(LAUNCH / "train_multi_node.sh")], env=_env(NNODES="2", NODE_RANK="0"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "MASTER_ADDR not set" in proc.stderr and "NNODES" in proc.stderr


@pytest.mark.slow
def test_two_process_run_writes_everything_and_ranks_agree(tmp_path):
    csv = make_dataset(tmp_path)
    args = overrides(tmp_path, csv, training__gen_train_freq=2, training__checkpoint_save_epoch=2,
                     training__ema_checkpoint_save_epoch=1, training__tensorboard=True)
    proc = subprocess.run(["bash", str(LAUNCH / "train_single_node.sh"), "--config", str(ROOT / "configs" / "train.yaml"), *args],
                          env=_env(NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exp = tmp_path / "out" / "exp"
    for name in ("checkpoint_latest.pth", "checkpoint_epoch_2.pth", "ema_epoch_1.pth", "ema_epoch_2.pth", "config.yaml"):
        assert (exp / name).is_file(), name
    samples = sorted(p.name.split("_id_")[0] for p in (exp / "samples" / "epoch_2").glob("*.wav"))
    assert samples == ["gen_rank0", "gen_rank1", "gt_rank0", "gt_rank1"]
    assert list((exp / "tensorboard").glob("events.out.tfevents.*"))
    log = (exp / "training.log").read_text()
    assert "Weights identical on all 2 rank(s)" in log and "Effective batch size: 4" in log
    assert "Epoch [2/2] Step [1/1] GlobalStep 2 Loss:" in log  # 4 rows / (2 ranks x batch 2)
    ckpt = safe_torch_load(exp / "checkpoint_latest.pth")
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["world_size"]) == (2, 2, 2)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["generator"], ckpt["rng"][1]["generator"])
    ema = safe_torch_load(exp / "ema_epoch_2.pth")
    assert torch.equal(ema["empty_clip_feat"], ckpt["model_ema1"]["empty_clip_feat"])


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_together(tmp_path):
    csv = make_dataset(tmp_path)
    args = overrides(tmp_path, csv, training__epochs=1)
    port = str(_free_port())
    procs = [
        subprocess.Popen(["bash", str(LAUNCH / "train_multi_node.sh"), *args], cwd=ROOT,
                         env=_env(NNODES="2", NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NPROC_PER_NODE="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    exp = tmp_path / "out" / "exp"
    log = (exp / "training.log").read_text()
    assert "Weights identical on all 2 rank(s)" in log and "Training completed" in log
    ckpt = safe_torch_load(exp / "checkpoint_latest.pth")
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 1


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_exits_0(tmp_path):
    import signal
    import time

    csv = make_dataset(tmp_path, modes=("t2a", "vt2a"))
    args = overrides(tmp_path, csv, training__epochs=1000, training__checkpoint_freq=0, training__repeat_factor=4)
    proc = subprocess.Popen(["bash", str(LAUNCH / "train_single_node.sh"), *args], cwd=ROOT,
                            env=_env(NPROC_PER_NODE="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "out" / "exp" / "training.log"
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and "GlobalStep 1 " in log.read_text():
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends to the job script
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out  # before: torchrun's SignalException, exit 1
    assert "SignalException" not in out and "Traceback" not in out
    assert "Stopped by SIGTERM" in log.read_text()
    assert safe_torch_load(tmp_path / "out" / "exp" / "checkpoint_latest.pth")["global_step"] >= 1


def _free_port_in(low: int, high: int) -> int:
    for port in random.Random(os.getpid()).sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def _slurm_stubs(bin_dir: Path, record: Path) -> None:
    """Stand-ins for SLURM's srun (one task per node, here one node: it runs the command with the
    task's variables set) and scontrol (the allocation's hosts); srun logs its options."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        f"echo \"$*\" >> {record}\n"
        "while [ $# -gt 0 ] && [ \"${1#--}\" != \"$1\" ]; do shift; done\n"
        "SLURM_STEP_ID=0 SLURM_NODEID=0 SLURM_PROCID=0 exec \"$@\"\n")
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\necho 127.0.0.2\n")
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)


def test_slurm_launcher_needs_an_allocation():
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(LAUNCH / "train_slurm.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no SLURM allocation" in proc.stderr and "sbatch --nodes=N" in proc.stderr


@pytest.mark.slow
def test_slurm_batch_script_starts_one_torchrun_per_node_through_srun(tmp_path):
    csv = make_dataset(tmp_path)
    record = tmp_path / "srun_calls.txt"
    _slurm_stubs(tmp_path / "bin", record)
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", SLURM_JOB_ID=str(100000 + _free_port_in(20000, 40000) - 20000),
               SLURM_JOB_NODELIST="node[1]", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2")
    args = overrides(tmp_path, csv, training__epochs=1)
    proc = subprocess.run(["bash", str(LAUNCH / "train_slurm.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = record.read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("--nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=1 bash ")
    port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
    assert f"node 0/1 -> 127.0.0.1:{port}, 2 process(es)" in proc.stderr  # first host, port from the job id
    log = (tmp_path / "out" / "exp" / "training.log").read_text()
    assert "Weights identical on all 2 rank(s)" in log
    assert safe_torch_load(tmp_path / "out" / "exp" / "checkpoint_latest.pth")["world_size"] == 2
