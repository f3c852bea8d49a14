"""`arpipe run`'s status lines stay whole while Ray's log thread prints worker lines to the same stdout.

print() writes a line's text and its newline as two writes; from two threads they used to interleave
("... 409 samples/s  video       done     2.5 s" and an empty line) and the stage's state was lost.
"""

from __future__ import annotations

import io
import re
import sys
import threading

from helpers import stage_lines

from arpipe.pipeline.console import whole_lines

LINES = 3000
STATUS = re.compile(r"  video       done +\d+\.\d s")
WORKER = re.compile(r"\(arpipe:tok pid=1\) \[image\] \d+/\d+ units, \d+ samples encoded, \d+ samples/s")


def _runner_and_ray_log_thread_print(lines: int) -> None:
    """The runner's echo (print with flush) and Ray's log thread (print to sys.stdout as it is now)."""
    def ray_log_thread():
        for i in range(lines):
            print(f"(arpipe:tok pid=1) [image] {i}/{lines} units, {64 * i} samples encoded, 409 samples/s")

    def runner():
        for i in range(lines):
            print(f"  video       done     {i % 10}.5 s", flush=True)

    threads = [threading.Thread(target=ray_log_thread), threading.Thread(target=runner)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads as often as a busy 2-core CI machine does
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch)


def test_status_and_worker_lines_from_two_threads_stay_whole(tmp_path, monkeypatch):
    # stdout as `arpipe run` has it under PYTHONUNBUFFERED (the tests, CI): every write is a write(2),
    # which lets the other thread run between a line's text and its newline
    with io.TextIOWrapper(open(tmp_path / "out.txt", "wb", buffering=0), encoding="utf-8",
                          write_through=True) as console:
        monkeypatch.setattr(sys, "stdout", console)
        with whole_lines():
            # Ray and tqdm still see the real console (colours, terminal width)
            assert sys.stdout.fileno() == console.fileno() and sys.stdout.encoding == console.encoding
            _runner_and_ray_log_thread_print(LINES)
        monkeypatch.undo()
    out = (tmp_path / "out.txt").read_text()
    broken = [line for line in out.splitlines() if not (STATUS.fullmatch(line) or WORKER.fullmatch(line))]
    assert not broken, f"{len(broken)} broken line(s), e.g. {broken[:3]}"
    assert stage_lines(out) == {"video": ["done"] * LINES}
    assert len(out.splitlines()) == 2 * LINES


def test_unfinished_lines_are_written_at_flush_and_when_the_cli_ends(capsys):
    with whole_lines():
        print("rendering", end="", flush=True)                 # a progress line: flush shows it now
        assert capsys.readouterr().out == "rendering"
        worker = threading.Thread(target=lambda: print("[image] 7/8 units", end=""))
        worker.start()
        worker.join()                                         # a thread that never ended its line
        print(" 100%")
        assert capsys.readouterr().out == " 100%\n"
    assert capsys.readouterr().out == "[image] 7/8 units"    # nothing lost when the wrapper goes
