"""`python -m wavflow.torchrun_guard [--own-session] TORCHRUN_ARGS...`: torchrun as the launchers
run it, with two fixes over plain torchrun:

- It dies with the launcher that started it. Linux's parent-death signal (SIGTERM) reaches it
  when the launcher exits, however the launcher dies (`kill -9` of its process group
  included), and torchrun then stops its ranks; the ranks in turn die with torchrun
  (`wavflow.distributed.die_with_parent`, armed in every job under torchrun). Nothing keeps
  training, or writing checkpoints, after its launcher is gone.
- Its exit code is the job's: torchrun reports any failed rank as 1, which would erase the
  difference between a fatal error (2) and "finished, but rows failed" (1). Here a rank's 2
  wins, then the highest other code; a rank killed by signal N gives 128 + N.

`--own-session` puts torchrun in a session of its own (as `setsid` would), so a terminal's
Ctrl-C reaches the ranks only through the launcher's forwarding (see scripts/launch/_env.sh).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable

from wavflow.distributed import die_with_parent

EXIT_FATAL = 2


def job_exit_code(rank_codes: Iterable[int]) -> int:
    """One exit code from the failed ranks' codes (negative = killed by that signal).

    A rank's own code wins over a signal: after the first failure torchrun stops the other
    ranks with SIGTERM, and that is not what went wrong.
    """
    codes = list(rank_codes)
    exited = [c for c in codes if c > 0]
    if exited:
        return EXIT_FATAL if EXIT_FATAL in exited else max(exited)
    signalled = [128 - c for c in codes if c < 0]
    return max(signalled) if signalled else 1  # no rank failure at all (e.g. rendezvous): torchrun's 1


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
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        print(str(exc), file=sys.stderr)  # torchrun's own summary table (ranks, codes, times)
        return job_exit_code(failure.exitcode for failure in exc.failures.values())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
