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

While ``arpipe run`` runs, a :class:`Router` decides where each whole line goes
(quiet by default): arpipe's own lines (the runner's, and the ``[stage] ...``
lines stages print, in the driver or in a Ray worker) reach the console;
everything else (Ray's and DeepSpeed's chatter, library log records, Python
warnings) goes only to the running stage's log file, whose path the runner
prints. ``-v`` shows every line on the console too. On a terminal, progress
lines (:mod:`arpipe.pipeline.progress`) become one updating tqdm bar per stage.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from arpipe.pipeline.progress import LINE as PROGRESS
from arpipe.schemas.base import STAGE_NAME

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
                _emit(self.stream, pending[:cut])
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
                _emit(self.stream, pending)
            self.stream.flush()

    def flush_all(self) -> None:
        """Write every thread's unfinished text (at exit: nothing printed may be lost), then flush."""
        with _LOCK:
            for pending in self._pending.values():
                _emit(self.stream, pending)
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


# ------------------------------------------------------------------ where each line goes while a run runs

#: the prefix Ray puts on a line it relays from a worker: ``(name pid=12)``, ``(name pid=12, ip=10.0.0.2)``,
#: coloured on a terminal; arpipe names its tasks ``arpipe:<stage>:...``
RAY_PREFIX = re.compile(r"^(?:\x1b\[[\d;]*m)?\((?P<who>[^()]*?) pid=\d+(?:, ip=[^)]*)?\)(?:\x1b\[0m)? ?")
#: a stage's own line: ``[stage] ...``
TAG = re.compile(r"^\[(?P<stage>" + STAGE_NAME.strip("^$") + r")\] ")
#: a library's log record (Ray's and logging's default format, DeepSpeed's, MLflow's, glog's) or a Python warning
LIBRARY_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+\s+[A-Z]+\b"
                          r"|\[\d{4}-\d\d-\d\d [\d:,.]+\]\s*\["
                          r"|\d{4}/\d\d/\d\d \d\d:\d\d:\d\d [A-Z]+ "
                          r"|[IWEF]\d{4} \d\d:\d\d:\d\d"
                          r"|\S+:\d+: \w*Warning: )")
#: ... of level ERROR or CRITICAL (Python logging's names, as those three formats print them): shown
ERROR_RECORD = re.compile(r"^\S+ \S+\s+(?:ERROR|CRITICAL)\b|^\[[^]]*\]\s*\[(?:ERROR|CRITICAL)\]")
WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ")


class Router:
    """Quiet by default: arpipe's lines to the console, every line to the log file of the stage it is about.

    A line belongs to a stage when it carries the stage's tag (``[train] ...``) or comes from a Ray task
    named after it (``(arpipe:images:unit pid=..)``); an unattributed library line (a Ray Train actor's, a
    DeepSpeed warning) goes to the log of every stage running then, and, when none runs, to the run's log.
    Arpipe's lines are the stages' tagged lines, the untagged lines of arpipe's own tasks (a ``python``
    stage's prints) and the driver's, except library records; a record of level ERROR or CRITICAL is shown
    too. ``verbose`` shows every line on the console as it came. On a terminal, a stage's progress lines
    update one tqdm bar per stage instead of scrolling.

    A stage's log stays open after the stage ends, until :meth:`close`: Ray relays a worker's last lines
    after its task returned, and they belong there.
    """

    def __init__(self, stages: set[str], *, verbose: bool = False, run_log: Path | None = None,
                 bars: bool | None = None):
        self.stages, self.verbose = set(stages), verbose
        self._logs: dict[str, TextIO] = {}    # every stage that ran: its log, open until close()
        self._running: set[str] = set()
        self._after_warning: dict[str, bool] = {}   # per source (a worker's prefix, "" for this process)
        self._run_log = _open_log(run_log) if run_log else None
        self._bars: dict[str, Any] = {}
        self._use_bars = bars

    def begin(self, stage: str, path: Path) -> None:
        """From now on ``stage``'s lines (and, while it runs, unattributed chatter) are appended to ``path``."""
        with _LOCK:
            if stage in self._logs:
                self._logs.pop(stage).close()
            self._logs[stage] = _open_log(path)
            self._running.add(stage)

    def end(self, stage: str) -> None:
        """``stage`` stopped running: its bar goes; its log keeps taking the lines that name it."""
        with _LOCK:
            self._running.discard(stage)
            bar = self._bars.pop(stage, None)
            if bar is not None:
                bar.close()

    def close(self) -> None:
        with _LOCK:
            for stage in list(self._bars):
                self.end(stage)
            for log in self._logs.values():
                log.close()
            self._logs.clear()
            self._running.clear()
            if self._run_log is not None:
                self._run_log.close()
                self._run_log = None

    def emit(self, stream: TextIO, text: str) -> None:
        for line in text.splitlines(keepends=True):
            body = line.rstrip("\r\n")
            prefix = RAY_PREFIX.match(body)
            rest = body[prefix.end():] if prefix else body
            # Python prints a warning, then its source line indented: both chatter (Ray relays them one by one)
            source = prefix[0] if prefix else ""
            after_warning = self._after_warning.get(source, False)
            tag = TAG.match(rest)
            stage = tag["stage"] if tag and tag["stage"] in self.stages else None
            tagged = stage is not None
            task = None
            if prefix and prefix["who"].startswith("arpipe:"):
                task = prefix["who"].split(":")[1]
                stage = stage or (task if task in self.stages else None)
            chatter = bool(LIBRARY_LINE.match(rest)) or (after_warning and rest[:1].isspace())
            self._after_warning[source] = bool(WARNING_LINE.match(rest))   # the source line is one line
            # a worker's line is arpipe's when a stage's tag opens it or arpipe's own task printed it
            ours = (tagged or (task is not None and not chatter)) if prefix else not chatter
            if chatter and ERROR_RECORD.match(rest):
                ours = True
            self._log(stage, chatter or prefix is not None, body)
            if self.verbose:
                self._write(stream, line)
            elif ours:
                self._show(stream, rest)

    def _log(self, stage: str | None, from_below: bool, body: str) -> None:
        """To ``stage``'s log; a worker's or a library's line that names none to every running stage's; the
        rest (this process's own lines, anything while no stage runs) to the run's log."""
        if stage in self._logs:
            targets = [self._logs[stage]]
        elif from_below and self._running:
            targets = [self._logs[s] for s in self._running]
        else:
            targets = [self._run_log] if self._run_log else []
        for log in targets:
            log.write(f"{_clock()} {body}\n")

    def _show(self, stream: TextIO, rest: str) -> None:
        progress = PROGRESS.match(rest)
        if progress and self._bars_on(stream):
            self._bar(stream, progress)
        else:
            self._write(stream, rest + "\n")

    def _bars_on(self, stream: TextIO) -> bool:
        if self._use_bars is None:
            try:
                self._use_bars = stream.isatty()
            except (AttributeError, ValueError):
                self._use_bars = False
        return self._use_bars

    def _bar(self, stream: TextIO, m: re.Match) -> None:
        from tqdm import tqdm

        stage, done, total = m["stage"], int(m["done"]), int(m["total"])
        # the line's measurements after the bar, as printed (braces escaped: bar_format is a format string)
        shape = "{desc} {n_fmt}/{total_fmt} |{bar:20}| " + m["rest"].strip().replace("{", "{{").replace("}", "}}")
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, initial=done, desc=f"[{stage}] {m['what']}", file=stream,
                                           leave=True, dynamic_ncols=True, mininterval=0, bar_format=shape)
        else:
            bar.total, bar.n, bar.bar_format = total, done, shape
            bar.refresh()
        if done >= total:
            bar.close()
            del self._bars[stage]

    def _write(self, stream: TextIO, text: str) -> None:
        if self._bars:
            from tqdm import tqdm

            tqdm.write(text, file=stream, end="")   # clears the bars, writes, redraws them
        else:
            stream.write(text)


_router: list[Router] = []


def _emit(stream: TextIO, text: str) -> None:
    if _router:
        _router[-1].emit(stream, text)
    else:
        stream.write(text)


@contextlib.contextmanager
def routed(router: Router) -> Iterator[Router]:
    """Send the wrapped streams' lines through ``router`` for the block (``arpipe run``)."""
    with whole_lines():
        with _LOCK:
            _router.append(router)
        try:
            yield router
        finally:
            flush_pending()
            with _LOCK:
                _router.remove(router)
            router.close()


def _open_log(path: Path) -> TextIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", buffering=1, encoding="utf-8", errors="replace")


def _clock() -> str:
    import time

    return time.strftime("%H:%M:%S")
