"""Ownership of an experiment folder: one live trainer per folder, and no stale temporaries.

`RunLock` is an exclusive `flock` on `<exp_dir>/train.lock`, which records the PID and host
of the trainer holding it. The kernel drops the lock when that process dies, however it dies
(SIGKILL included), so a lock file left behind never blocks a later run; only a live trainer
does. `remove_stale_temporaries` deletes the temporary files an interrupted atomic write of
this run's own checkpoints left behind (`.checkpoint_latest.pth.<random>.tmp`, ...).
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
from pathlib import Path

from wavflow.errors import ConfigError

LOCK_NAME = "train.lock"

# The temporaries of wavflow.io_utils' atomic writes of this run's own files, nothing else.
_STALE_TMP = re.compile(
    r"^\.((adapter_)?checkpoint_latest\.pth|(adapter_)?checkpoint_epoch_\d+\.pth|ema_epoch_\d+\.pth|config\.yaml)"
    r"\.[A-Za-z0-9_]+\.tmp$"
)


# Locks this process holds: {folder: fd}. A second Trainer on the same folder in the same
# process (tests, notebooks) shares it; only another process is refused.
_HELD: dict[str, int] = {}


class RunLock:
    """`<exp_dir>/train.lock`, held from `acquire` until `release_run_locks` or process exit."""

    def __init__(self, exp_dir: Path) -> None:
        self.path = exp_dir / LOCK_NAME

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the trainer (PID, host) that holds it."""
        key = str(self.path.resolve())
        if key in _HELD:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "PID unknown"
            os.close(fd)
            raise ConfigError(
                f"another trainer ({holder}) is running on {self.path.parent}; two trainers on one "
                "experiment folder would overwrite each other's checkpoints. Stop it first, or choose "
                "another training.experiment_id / training.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        os.fsync(fd)
        _HELD[key] = fd


def release_run_locks() -> None:
    """Drop every lock this process holds (closing the descriptor drops the flock; the file
    stays behind, harmless: see the module docstring)."""
    while _HELD:
        _, fd = _HELD.popitem()
        os.close(fd)


def remove_stale_temporaries(exp_dir: Path) -> list[Path]:
    """Delete this run's leftover checkpoint/config temporaries; return what was removed.

    Call it only while holding the RunLock: then no live writer of this folder exists.
    """
    removed = []
    if not exp_dir.is_dir():
        return removed
    for path in sorted(exp_dir.iterdir()):
        if _STALE_TMP.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed
