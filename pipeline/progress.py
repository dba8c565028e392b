"""Progress of long stages, for a terminal and for batch logs alike.

On a TTY a tqdm bar; otherwise (SLURM logs, `| tee`, CI) one plain, flushed line at the start, one every
`interval()` seconds and one at the end, so a job's log is never silent:

    train: 123,456/1,000,000 tok (12.3%) 18.2k tok/s ETA 0:48:10 | bt-k32: loss 0.12 L0 31.8 dead 0.3%

Each stage ends with `summary()` (on stdout): a header line with the stage's wall time, then one indented line
per item.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from .errors import SaeError

DEFAULT_INTERVAL = 30.0
ENV_INTERVAL = "SAE_PROGRESS_INTERVAL"

# Per stage, set by its first Progress: when it started and what its bars counted (for summary()'s header).
_stage_start: dict[str, float] = {}
_stage_done: dict[str, tuple[int, str, float]] = {}


def begin(stage: str) -> None:
    """Mark the start of `stage` (its summary's time runs from here, model loading included); optional: without
    it the time runs from the stage's first Progress."""
    _stage_start[stage] = time.monotonic()
    _stage_done.pop(stage, None)


def abandon(stage: str) -> None:
    """Forget `stage`'s start and counts: a stopped stage prints no summary, and a later run of it in this process
    must not add the stopped run's tokens or time to its own."""
    _stage_start.pop(stage, None)
    _stage_done.pop(stage, None)


def interval() -> float:
    """Seconds between plain progress lines: $SAE_PROGRESS_INTERVAL (set by `sae --progress-interval`), else 30."""
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:  # also rejects nan
        raise SaeError(f"{ENV_INTERVAL} must be a positive number of seconds, got {raw!r}")
    return seconds


def set_interval(seconds: float) -> None:
    """Set the interval for this process and the processes it starts (dask workers, DDP ranks)."""
    if not seconds > 0:
        raise SaeError(f"--progress-interval must be a positive number of seconds, got {seconds}")
    os.environ[ENV_INTERVAL] = repr(float(seconds))


def duration(seconds: float) -> str:
    """H:MM:SS, hours unbounded (a long job reads 27:03:10, not '1 day, 3:03:10')."""
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def rate(per_second: float) -> str:
    """18.2k, 3.1M: one decimal and an SI suffix."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_second >= div:
            return f"{per_second / div:.1f}{suffix}"
    return f"{per_second:.1f}"


def _isatty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress of one long stage: a tqdm bar on a TTY, plain lines every `interval` seconds otherwise."""

    def __init__(
        self,
        stage: str,
        total: int | None,
        unit: str = "tok",
        *,
        interval: float | None = None,
        file: TextIO | None = None,
        initial: int = 0,
    ) -> None:
        self.stage = stage
        self.total = total
        self.unit = unit
        self.interval = _module_interval() if interval is None else float(interval)
        self.file = file if file is not None else sys.stderr
        self.n = initial
        self.initial = initial
        self._figures: dict[str, str] = {}
        self._closed = False
        self._t0 = time.monotonic()
        self._last = self._t0
        _stage_start.setdefault(stage, self._t0)
        self._bar = None
        if _isatty(self.file):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                unit=unit,
                unit_scale=True,
                desc=stage,
                file=self.file,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        else:
            todo = f"{total:,} {unit}" if total is not None else f"an unknown number of {unit}"
            done = f", {initial:,} already done" if initial else ""
            self._write(f"{stage}: started, {todo}{done}")

    @property
    def elapsed(self) -> float:
        """Seconds since this bar started."""
        return time.monotonic() - self._t0

    def update(self, n: int) -> None:
        """`n` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval and self.n != self.total:  # at the total, close() writes the line
            self._last = now
            self._write(self._line())

    def figures(self, **named: str) -> None:
        """The stage's own figures, by name (e.g. per SAE); they replace earlier figures of the same name."""
        self._figures.update(named)
        if self._bar is not None:
            self._bar.set_postfix_str(self._figure_text(), refresh=False)

    def close(self) -> None:
        """Finish: close the bar, or write the last plain line (with the wall time)."""
        if self._closed:
            return
        self._closed = True
        done, unit, seconds = _stage_done.get(self.stage, (0, self.unit, 0.0))
        _stage_done[self.stage] = (done + self.n - self.initial, self.unit, seconds + self.elapsed)
        if self._bar is not None:
            self._bar.close()
        else:
            self._write(self._line(final=True))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _figure_text(self) -> str:
        return " | ".join(f"{name}: {text}" for name, text in self._figures.items())

    def _line(self, final: bool = False) -> str:
        elapsed = self.elapsed
        per_s = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.stage}:"]
        if self.total is not None:
            pct = 100.0 * self.n / self.total if self.total else 100.0
            parts.append(f"{self.n:,}/{self.total:,} {self.unit} ({pct:.1f}%)")
        else:
            parts.append(f"{self.n:,} {self.unit}")
        parts.append(f"{rate(per_s)} {self.unit}/s")
        if final:
            parts.append(f"in {duration(elapsed)}")
        elif self.total is not None and per_s > 0:
            parts.append(f"ETA {duration(max(self.total - self.n, 0) / per_s)}")
        line = " ".join(parts)
        return f"{line} | {self._figure_text()}" if self._figures else line

    def _write(self, line: str) -> None:
        print(line, file=self.file, flush=True)


_module_interval = interval  # the constructor's `interval` argument shadows the function's name


def summary(stage: str, lines: list[str], file: TextIO | None = None) -> None:
    """The end-of-stage paragraph, on stdout by default (it is the stage's result, beside its progress on
    stderr): "train: done in 0:12:03 (1,000,000 tok, 18.2k tok/s)", then one indented line per item (per SAE,
    per site...). The time runs from `begin(stage)`, else from the stage's first Progress in this process."""
    file = file if file is not None else sys.stdout
    start = _stage_start.pop(stage, None)
    done = _stage_done.pop(stage, None)
    head = f"{stage}: done"
    if start is not None:
        head += f" in {duration(time.monotonic() - start)}"
    if done is not None and done[0] > 0:
        n, unit, seconds = done
        head += f" ({n:,} {unit}" + (f", {rate(n / seconds)} {unit}/s)" if seconds > 0 else ")")
    print("\n".join([head, *(f"  {line}" for line in lines)]), file=file, flush=True)
