"""The launchers keep the job's exit code (torchrun alone reports every failure as 1), and a
launcher killed with SIGKILL takes torchrun and its ranks with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_extract import overrides as extract_overrides
from tests.test_extract import write_dataset
from tests.test_train_common import make_dataset, overrides
from wavflow import errors
from wavflow.exit_codes import exit_code_for, report_error
from wavflow.torchrun_guard import job_exit_code

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "scripts" / "launch"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG_PATH", "NNODES", "NODE_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", WAVFLOW_PYTHON=sys.executable, **extra)
    return env


def test_job_exit_code_from_rank_codes():
    assert job_exit_code([1, 2]) == 2 and job_exit_code([1, 1]) == 1 and job_exit_code([0, 1]) == 1
    assert job_exit_code([-9]) == 137 and job_exit_code([-15, 2]) == 2 and job_exit_code([]) == 1
    assert job_exit_code([1, -15]) == 1  # torchrun SIGTERMs the others after the first failure
    # a deliberate code beats a runtime failure, which is often another rank's broken collective
    assert job_exit_code([4, 3]) == 3 and job_exit_code([4, 1]) == 1 and job_exit_code([3, 2]) == 2
    assert job_exit_code([4, -15]) == 4 and job_exit_code([7, 4]) == 4 and job_exit_code([7]) == 7


@pytest.mark.parametrize("exc, code", [
    (errors.RowsFailedError("x"), 1), (errors.ConfigError("x"), 2), (errors.ManifestError("x"), 3),
    (errors.CheckpointError("x"), 3), (errors.AudioError("x"), 3), (errors.WavFlowError("x"), 3),
    (errors.RuntimeFailure("x"), 4), (OSError(28, "No space left on device"), 4), (KeyError("bug"), 4),
    (KeyboardInterrupt(), 130),
])
def test_each_error_kind_has_its_documented_exit_code_and_one_last_line(exc, code, capsys):
    try:  # raised, as a job raises it: a traceback has frames to show
        raise exc
    except BaseException as caught:
        exc = caught
    assert exit_code_for(exc) == code
    assert report_error("job", exc) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("[wavflow.job] error: ")
    # a traceback only where a bug is the likely cause: never for our own errors or an OSError
    assert ("Traceback" in err) == isinstance(exc, KeyError)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.slow
def test_extract_launcher_keeps_each_exit_code_and_ends_with_the_jobs_line(tmp_path, wavflow_cache_dir):
    ds = write_dataset(tmp_path, videos=False, n=0)  # only the row whose audio is missing
    env = _env(NPROC_PER_NODE="2", WAVFLOW_CACHE_DIR=str(wavflow_cache_dir))
    words = [w for w in extract_overrides(tmp_path, ds, "t2a") if not w.startswith("extraction.mode")]
    launcher = str(LAUNCH / "extract_t2a.sh")
    failed = subprocess.run(["bash", launcher, *words], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stderr[-3000:]
    # the job's own line ends the output, after torchrun's report (not its "=====" banner)
    assert _last_line(failed.stderr).startswith("[wavflow.extract] error: 1 of 1 rows of the input CSV failed")
    assert "'noaudio'" in _last_line(failed.stderr) and "error_file" in failed.stderr
    fatal = subprocess.run(["bash", launcher, *words, f"data.csv_path={tmp_path / 'none.csv'}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert fatal.returncode == 3, fatal.stderr[-3000:]  # bad input: the CSV does not exist
    assert _last_line(fatal.stderr).startswith("[wavflow.extract] error: ") and "none.csv" in _last_line(fatal.stderr)
    usage = subprocess.run(["bash", launcher, *words, "extraction.batch_size=0"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2, usage.stderr[-3000:]
    assert _last_line(usage.stderr).startswith("[wavflow.extract] error: ") and "extraction.batch_size" in _last_line(usage.stderr)


@pytest.mark.slow
def test_train_and_predict_launchers_keep_exit_code_2(tmp_path):
    csv = make_dataset(tmp_path)
    train = subprocess.run(["bash", str(LAUNCH / "train_single_node.sh"), *overrides(tmp_path, csv, training__epochs=0)],
                           env=_env(NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert train.returncode == 2, train.stderr[-3000:]
    assert _last_line(train.stderr).startswith("[wavflow.train] error: training.epochs must be")
    predict = subprocess.run(["bash", str(LAUNCH / "predict.sh"), "--bogus"], env=_env(), capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
    assert predict.returncode == 2, predict.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_stop_together_when_reads_fail_beyond_the_policy(tmp_path):
    """Both ranks reach the same verdict from the all-reduced count: exit 1 (no hang, no
    checkpoint), and the last line names the unreadable row."""
    csv = make_dataset(tmp_path, modes=("t2a", "vt2a", "v2a", "t2a"))
    (tmp_path / "audio" / "v2a_2.wav").write_text("not audio\n")
    args = overrides(tmp_path, csv, training__epochs=2, data__validate_features=False)
    proc = subprocess.run(["bash", str(LAUNCH / "train_single_node.sh"), *args], env=_env(NPROC_PER_NODE="2"),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = _last_line(proc.stderr)
    assert last.startswith("[wavflow.train] error: 1 of 4 row reads of epoch 1") and "'v2a_2'" in last, last
    assert not list((tmp_path / "out" / "exp").glob("*.pth"))


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (this test's own temporary folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")
def test_sigkill_of_the_launchers_process_group_ends_torchrun_and_ranks(tmp_path):
    csv = make_dataset(tmp_path)
    args = overrides(tmp_path, csv, training__epochs=1000, training__repeat_factor=50, training__checkpoint_freq=0)
    launcher = subprocess.Popen(["bash", str(LAUNCH / "train_single_node.sh"), *args], env=_env(NPROC_PER_NODE="2"),
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = tmp_path / "out" / "exp" / "training.log"
    try:
        deadline = time.time() + 240
        while not (log.is_file() and "GlobalStep" in log.read_text()) and time.time() < deadline:
            time.sleep(1)
        assert log.is_file() and "GlobalStep" in log.read_text(), "training did not start"
        assert len(_processes_mentioning(str(tmp_path))) >= 3  # torchrun guard + 2 ranks (+ bash)
        os.killpg(launcher.pid, signal.SIGKILL)  # kill -9 -- -<launcher pid>
        launcher.wait(timeout=30)
        deadline = time.time() + 90
        while _processes_mentioning(str(tmp_path)) and time.time() < deadline:
            time.sleep(1)
        left = _processes_mentioning(str(tmp_path))
        assert left == [], f"still running after the launcher was killed: {left}"
    finally:
        for pid in _processes_mentioning(str(tmp_path)):  # only this test's own processes
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
