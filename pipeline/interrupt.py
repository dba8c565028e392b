"""SIGINT and SIGTERM (Ctrl-C, a scheduler's preemption, `kill`): every stage stops the same way.

While a `sae` command runs, both signals raise KeyboardInterrupt in the main thread (`signals_raise`). A stage's
entry point, decorated with `interruptible`, turns it into `Interrupted`, whose message says what the stopped
run kept and how to continue; the CLI prints that one line and exits with EXIT_CODE, whichever the signal.
Training catches the signals itself (sae.train.signals) so that it checkpoints before it stops.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from . import progress
from .errors import SaeError

EXIT_CODE = 130
"""Exit status of a command stopped by SIGINT or SIGTERM: 128 + SIGINT, what a shell reports for Ctrl-C."""

RERUN = "rerun the same command to continue"
"""How to continue most stopped stages (and every stage of `sae run`, which resumes training by itself)."""

NOTHING_KEPT = "nothing unfinished is kept: outputs are written only once complete"
"""What a stage that writes its output only once complete keeps when stopped."""

_received: list[int] = []
"""The signals `signals_raise` turned into KeyboardInterrupt, last one last."""

F = TypeVar("F", bound=Callable[..., Any])


class Interrupted(SaeError):
    """SIGINT or SIGTERM stopped a stage: `stopped` (which stage, by which signal, where), `kept` (what it left
    that a rerun uses) and `again` (how to continue)."""

    def __init__(self, stopped: str, kept: str, again: str = RERUN) -> None:
        super().__init__(f"{stopped}; {kept}; {again}")
        self.stopped, self.kept, self.again = stopped, kept, again

    def line(self, again: str | None = None) -> str:
        """The one line the CLI prints; `again` replaces the stage's own advice (`sae run` is simply rerun)."""
        return f"interrupted: {self.stopped}; {self.kept}; {again or self.again}"


def received() -> str:
    """Name of the signal that stopped the command: the last one `signals_raise` saw, else SIGINT (Python's own
    KeyboardInterrupt)."""
    return signal.Signals(_received[-1]).name if _received else "SIGINT"


def _raise(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as SIGINT does (without it SIGTERM would kill the process
    with no word said, and no cleanup); the previous handlers come back after it. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    old = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def interruptible(stage: str, kept: Callable[..., tuple[str, str]]) -> Callable[[F], F]:
    """Decorate a stage's entry point: a KeyboardInterrupt becomes Interrupted("STAGE stopped by SIG", *kept(...))
    where `kept`, called with the entry point's arguments, says what the stopped run left and how to continue.
    An interrupted stage prints no summary: its progress totals are dropped (`progress.abandon`)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                progress.abandon(stage)
                raise Interrupted(f"{stage} stopped by {received()}", *kept(*args, **kwargs)) from None
            except Interrupted:
                progress.abandon(stage)
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


__all__ = ["EXIT_CODE", "NOTHING_KEPT", "RERUN", "Interrupted", "interruptible", "received", "signals_raise"]
