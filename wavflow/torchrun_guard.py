"""`python -m wavflow.torchrun_guard [--own-session] TORCHRUN_ARGS...`: torchrun as the launchers
run it, with two fixes over plain torchrun:

- It dies with the launcher that started it. Linux's parent-death signal (SIGTERM) reaches it
  when the launcher exits, however the launcher dies (`kill -9` of its process group
  included), and torchrun then stops its ranks; the ranks in turn die with torchrun
  (`wavflow.distributed.die_with_parent`, armed in every job under torchrun). Nothing keeps
  training, or writing checkpoints, after its launcher is gone.
- Its exit code is the job's (docs/errors.md): torchrun reports any failed rank as 1, which
  would erase the difference between a usage error (2), bad input (3), failed rows (1) and a
  runtime failure (4). Here the ranks' own codes are kept, in that order of precedence; a rank
  killed by signal N gives 128 + N.
- Its last line is the job's one-line error, not torchrun's banner: each rank leaves that line
  in a folder this guard makes (`$WAVFLOW_ERROR_DIR`), and it is printed again after
  torchrun's report, so the line a user (or a scheduler's mail) reads last names the fault.

`--own-session` puts torchrun in a session of its own (as `setsid` would), so a terminal's
Ctrl-C reaches the ranks only through the launcher's forwarding (see scripts/launch/_env.sh).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from wavflow.distributed import die_with_parent
from wavflow.exit_codes import ERROR_DIR_ENV, EXIT_BAD_INPUT, EXIT_ROWS_FAILED, EXIT_RUNTIME, EXIT_USAGE

# A rank's deliberate codes say what went wrong; a runtime failure (4) on another rank is often
# only the echo of the first rank's exit (a broken collective), so it ranks last.
CODE_PRIORITY = (EXIT_USAGE, EXIT_BAD_INPUT, EXIT_ROWS_FAILED, EXIT_RUNTIME)


def job_exit_code(rank_codes: Iterable[int]) -> int:
    """One exit code from the failed ranks' codes (negative = killed by that signal).

    A rank's own code wins over a signal: after the first failure torchrun stops the other
    ranks with SIGTERM, and that is not what went wrong.
    """
    codes = list(rank_codes)
    exited = [c for c in codes if c > 0]
    for code in CODE_PRIORITY:
        if code in exited:
            return code
    if exited:
        return max(exited)
    signalled = [128 - c for c in codes if c < 0]
    return max(signalled) if signalled else 1  # no rank failure at all (e.g. rendezvous): torchrun's 1


def job_error_line(error_dir: Path, failures: dict[int, int], code: int) -> str | None:
    """The one-line error of the lowest rank that exited with `code` and left one."""
    for rank in sorted(r for r, c in failures.items() if c == code):
        try:
            recorded_code, line = (error_dir / f"rank{rank}.txt").read_text(encoding="utf-8").split("\n", 2)[:2]
        except (OSError, ValueError):
            continue
        if recorded_code.strip() == str(code) and line.strip():
            return line.strip()
    return None


def report_failure(failures: dict[int, int], error_dir: Path) -> int:
    """After torchrun's own report: one line per failed rank, then the job's error line, last."""
    code = job_exit_code(failures.values())
    for rank, rank_code in sorted(failures.items()):
        how = f"was killed by signal {-rank_code}" if rank_code < 0 else f"exited with code {rank_code}"
        print(f"[wavflow] rank {rank} {how}", file=sys.stderr)
    line = job_error_line(error_dir, failures, code)
    print(line or f"[wavflow] error: the job failed with exit code {code} (see the ranks' output above)",
          file=sys.stderr, flush=True)
    return code


def main(argv: list[str]) -> int:
    parent = os.getppid()
    if argv[:1] == ["--own-session"]:
        argv = argv[1:]
        try:
            os.setsid()
        except OSError:  # already a group leader: keep the session we have
            pass
    die_with_parent()
    if os.getppid() != parent:  # the launcher died before the guard was armed
        return 128 + 15
    with tempfile.TemporaryDirectory(prefix="wavflow_errors_") as folder:
        os.environ[ERROR_DIR_ENV] = folder  # the ranks inherit it (wavflow/exit_codes.py)
        try:
            torchrun_main(argv)
        except ChildFailedError as exc:
            print(str(exc), file=sys.stderr)  # torchrun's own summary table (ranks, codes, times)
            return report_failure({rank: f.exitcode for rank, f in exc.failures.items()}, Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
