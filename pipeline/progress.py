"""Progress lines a long stage prints while it works: how far, how fast, how long still.

A stage's work loop calls :meth:`Progress.update` after each unit (a training step, a shard); a line is
printed for the first unit, then whenever ``every_s`` seconds (or ``every_steps`` units, if given) have
passed since the last line, whichever comes first, and for the last unit, so a console (or a CI log) hears from a running stage at least every ``every_s`` seconds however
slow or fast its units are. Each line names the stage, ``done/total``, what the caller measured (loss, lr,
tokens/s), the elapsed time and the estimated time left (from the rate since the first unit this process
ran, so a resumed stage's earlier units do not make it look faster than it is).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

from arpipe.schemas.base import STAGE_NAME

#: seconds between two progress lines of one stage (``arpipe run`` on a terminal asks for 1 s through
#: ``ARPIPE_PROGRESS_EVERY_S``: there the lines update one bar per stage instead of scrolling)
EVERY_S = 10.0


#: a line :class:`Progress` prints, as the console reads it back (on a terminal: one bar per stage)
LINE = re.compile(r"^\[(?P<stage>" + STAGE_NAME.strip("^$") + r")\] (?P<what>\w+) (?P<done>\d+)/(?P<total>\d+)"
                  r"(?P<rest>.*\belapsed .*)$")


def default_every_s() -> float:
    try:
        return float(os.environ.get("ARPIPE_PROGRESS_EVERY_S", EVERY_S))
    except ValueError:
        return EVERY_S


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Prints ``[stage] what done/total  name value ...  elapsed E, ETA T`` at most every ``every_s`` seconds."""

    def __init__(self, stage: str, total: int, *, what: str = "step", start: int = 0, every_s: float | None = None,
                 every_steps: int | None = None, echo: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.what = stage, total, what
        self.every_s = every_s if every_s is not None else default_every_s()
        self.every_steps = every_steps
        self.echo = echo or write_line
        self.clock = clock
        self.started, self.start = clock(), start
        self.last: float | None = None
        self.last_done = start

    def due(self, done: int) -> bool:
        """Whether :meth:`update` for ``done`` would print (the caller may skip measuring otherwise)."""
        return (self.last is None or done >= self.total or self.clock() - self.last >= self.every_s
                or (self.every_steps is not None and done - self.last_done >= self.every_steps))

    def update(self, done: int, **measured: float | str | None) -> str | None:
        """After unit ``done``: the line printed, or None when none was due."""
        if not self.due(done):
            return None
        now = self.clock()
        self.last, self.last_done = now, done
        elapsed = now - self.started
        ran = done - self.start
        values = "  ".join(f"{k} {_value(v)}" for k, v in measured.items() if v is not None)
        line = f"[{self.stage}] {self.what} {done}/{self.total}" + (f"  {values}" if values else "")
        line += f"  elapsed {duration(elapsed)}"
        if done >= self.total:
            line += ", done"
        elif ran > 0:
            line += f", ETA {duration(elapsed / ran * (self.total - done))}"
        self.echo(line)
        return line


def write_line(line: str) -> None:
    """A whole line to stdout, flushed: how a stage's worker prints (not print(): Ray Train replaces it in
    its workers with a logger that writes each line twice where stdout is wrapped)."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _value(v: float | str) -> str:
    if isinstance(v, str):
        return v
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
