"""SIGTERM/SIGINT during training: remembered, not obeyed at once, so every rank stops after
the step in progress and rank 0 writes checkpoint_latest.pth (the loop asks `requested`)."""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Installed for the length of `Trainer.train` (main thread only; a no-op elsewhere)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: Any) -> None:
            self.received = signum
            # A second signal falls back to the old behaviour (e.g. KeyboardInterrupt).
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

        for sig in STOP_SIGNALS:
            self._old[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old.clear()
