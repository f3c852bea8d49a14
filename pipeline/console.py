"""Whole lines on the console while several threads print to it.

`arpipe run` prints its status lines from the runner while Ray's log thread
(``log_to_driver``) prints the workers' lines to the same ``sys.stdout``.
``print()`` writes the text and the newline as two separate writes, so two
threads' lines could interleave mid-line (``... 409 samples/s  video  done``
and then an empty line), and whoever reads the output, a user or a test,
missed the stage's state. While the CLI runs, :func:`whole_lines` puts a
:class:`LineWriter` in front of ``sys.stdout`` and ``sys.stderr``: each thread's
text waits in its own buffer until a newline, and every complete line goes to
the real stream in one write under one lock. Ray's log thread looks
``sys.stdout`` up when it prints, so its lines go through the writer too.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

#: one lock for stdout and stderr: a terminal or a CI log often shows both on one descriptor
_LOCK = threading.RLock()   # re-entrant: a signal handler that prints must not deadlock the main thread
#: a thread's unfinished line is written anyway once it grows this long (a writer that never ends a line)
_MAX_PENDING = 64 * 1024
_installed: list[LineWriter] = []


class LineWriter:
    """A text stream that writes only whole lines, each in one write, to the stream it wraps.

    Everything but ``write``, ``writelines`` and ``flush`` (``isatty``, ``fileno``,
    ``encoding``, ``buffer``, ...) is the wrapped stream's, so colour and
    terminal detection in Ray and tqdm see the real console.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._pending: dict[int, str] = {}   # thread id -> its text after its last newline
        self._detached = False

    def write(self, text: str) -> int:
        with _LOCK:
            if self._detached:   # kept by someone (a tqdm bar) after the CLI finished: pass through
                return self.stream.write(text)
            tid = threading.get_ident()
            pending = self._pending.pop(tid, "") + text
            cut = pending.rfind("\n") + 1
            if len(pending) >= _MAX_PENDING:
                cut = len(pending)
            if cut:
                self.stream.write(pending[:cut])
                # a pipe would otherwise hold stdout's lines while stderr's (on the same descriptor) pass them
                self.stream.flush()
            if cut < len(pending):
                self._pending[tid] = pending[cut:]
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Write the calling thread's unfinished line (a progress bar's ``\\r`` text), then flush."""
        with _LOCK:
            pending = self._pending.pop(threading.get_ident(), "")
            if pending:
                self.stream.write(pending)
            self.stream.flush()

    def flush_all(self) -> None:
        """Write every thread's unfinished text (at exit: nothing printed may be lost), then flush."""
        with _LOCK:
            for pending in self._pending.values():
                self.stream.write(pending)
            self._pending.clear()
            self.stream.flush()

    def detach(self) -> None:
        """Flush everything and pass later writes straight through."""
        with _LOCK:
            self.flush_all()
            self._detached = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def flush_pending() -> None:
    """Write out every thread's unfinished text on the wrapped streams (before ``os._exit``, at exit)."""
    for writer in list(_installed):
        with contextlib.suppress(Exception):   # a stream closed under us at interpreter exit
            writer.flush_all()


atexit.register(flush_pending)


@contextlib.contextmanager
def whole_lines() -> Iterator[None]:
    """Wrap ``sys.stdout`` and ``sys.stderr`` in :class:`LineWriter` for the block; idempotent when nested."""
    if isinstance(sys.stdout, LineWriter) or isinstance(sys.stderr, LineWriter):
        yield
        return
    saved = sys.stdout, sys.stderr
    writers = [LineWriter(stream) for stream in saved]
    _installed.extend(writers)
    sys.stdout, sys.stderr = writers
    try:
        yield
    finally:
        # restore only what is still ours: whoever replaced the streams meanwhile keeps their choice
        if sys.stdout is writers[0]:
            sys.stdout = saved[0]
        if sys.stderr is writers[1]:
            sys.stderr = saved[1]
        for writer in writers:
            writer.detach()
            _installed.remove(writer)
