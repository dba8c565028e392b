"""SIGTERM/SIGINT (a cluster's preemption, Ctrl-C): finish the step, checkpoint, stop (sae.interrupt: the CLI
exits with its EXIT_CODE, as every stopped stage does)."""

from __future__ import annotations

import signal
import threading
from typing import Any

from sae.interrupt import Interrupted


class TrainingInterrupted(Interrupted):
    """SIGTERM/SIGINT stopped the run after a checkpoint; rerun with --resume."""


class StopFlag:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


__all__ = ["StopFlag", "TrainingInterrupted"]
