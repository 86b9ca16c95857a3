"""The exit codes of every WavFlow job and launcher (docs/errors.md), and the one place that
turns an exception into that code and a one-line message.

    0  success (failed rows, if any, stayed within data.max_failed_fraction)
    1  rows failed: more than data.max_failed_fraction of the rows (or all of them) failed;
       what succeeded is written and the failed rows are listed with their reasons
    2  usage error: a bad command line or configuration key; nothing was done
    3  bad input: a CSV, media, feature file, checkpoint or weights file the job cannot use
    4  runtime failure: the job started but could not go on (disk full, permission denied,
       out of memory, a lost rank, training diverged; a bug: then a traceback is printed above)
  130  interrupted (Ctrl-C) outside a launcher; 128 + N: a process was killed by signal N

The message is always the last line of the output, `[wavflow.<job>] error: ...`, so the line a
user reads last (and the one a scheduler mails) names the file, row or key at fault. Under
torchrun each rank also writes that line to $WAVFLOW_ERROR_DIR/rank<RANK>.txt, from where
`wavflow.torchrun_guard` repeats it after torchrun's own report.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from wavflow.errors import ConfigError, RowsFailedError, RuntimeFailure, WavFlowError

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_RUNTIME = 4
EXIT_INTERRUPTED = 130
ERROR_DIR_ENV = "WAVFLOW_ERROR_DIR"


class JobArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigError (exit 2, with the job's one last line and the usage
    above it) instead of a SystemExit from inside a job's main()."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message}\n{self.format_usage().strip()}")


def exit_code_for(exc: BaseException) -> int:
    passed_on = getattr(exc, "exit_code", None)  # a stage's own code (the demo, the benchmark)
    if isinstance(exc, WavFlowError) and isinstance(passed_on, int) and passed_on != 0:
        return passed_on if passed_on > 0 else 128 - passed_on  # -N: the stage was killed by signal N
    if isinstance(exc, RowsFailedError):
        return EXIT_ROWS_FAILED
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, RuntimeFailure):
        return EXIT_RUNTIME
    if isinstance(exc, WavFlowError):
        return EXIT_BAD_INPUT
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_RUNTIME


def error_line(job: str, exc: BaseException) -> tuple[list[str], str]:
    """(detail lines, the one line that ends the output) for `exc`."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if isinstance(exc, WavFlowError):
        head = lines[0] if lines else type(exc).__name__
    elif isinstance(exc, KeyboardInterrupt):
        head = "interrupted"
    else:  # OSError and friends name their file in str(exc); a bug names its type
        head = f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"
    details = lines[1:]
    if details:
        head += " (details above)"
    return details, f"[wavflow.{job}] error: {head}"


def _record_for_launcher(line: str, code: int) -> None:
    """Under torchrun: leave the line where wavflow.torchrun_guard will find it."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return
    try:
        path = Path(folder) / f"rank{int(os.environ.get('RANK', '0'))}.txt"
        path.write_text(f"{code}\n{line}\n", encoding="utf-8")
    except OSError:
        pass  # the message is on stderr already; the folder is only a courtesy


def report_error(job: str, exc: BaseException) -> int:
    """Print `exc` as documented above and return its exit code."""
    code = exit_code_for(exc)
    if code == EXIT_RUNTIME and not isinstance(exc, (OSError, RuntimeFailure)):
        traceback.print_exception(exc, file=sys.stderr)  # a bug or a library failure: show where
    details, line = error_line(job, exc)
    sys.stdout.flush()
    for detail in details:
        print(detail, file=sys.stderr)
    print(line, file=sys.stderr, flush=True)
    _record_for_launcher(line, code)
    return code


def run_job(job: str, body: Callable[[], int]) -> int:
    """`body()`'s exit code, or the code of the exception it raised (reported as above)."""
    try:
        return body()
    except (Exception, KeyboardInterrupt) as exc:
        return report_error(job, exc)
