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


# ------------------------------------------------------------------ quiet by default (`arpipe run`)

#: what reaches `arpipe run`'s stdout during a run, as Ray and the libraries print it
RUN_OUTPUT = """\
arpipe run 0123456789ab: pipeline 'p', 2 stage(s), outputs under runs
2026-12-03 22:30:15,230\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled
  images  running  never run
  train   running  never run
(arpipe:images:unit pid=11) [images] read 9 samples
(arpipe:images:unit pid=11) /x/torch/functional.py:12: UserWarning: something deprecated
(arpipe:images:unit pid=11)   return f(*args)
(arpipe:images pid=12) a line the user's own code printed
[images] units 1/4  samples 64  elapsed 1 s, ETA 3 s
(PlacementGroupCleaner pid=27416) Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.
(RayTrainWorker pid=27448) [2026-12-03 22:30:47,384] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.
(RayTrainWorker pid=27448) [train] step 1/60  loss 6.282  lr 0  tokens_per_s 5498  elapsed 2 s, ETA 1 min 58 s
(RayTrainWorker pid=27448) 2026/12/03 22:30:55 INFO mlflow.system_metrics.system_metrics_monitor: Started monitoring.
/venv/ray/train/v2/api/data_parallel_trainer.py:95: FutureWarning: a Ray Train driver-side warning
  warnings.warn(
(RayTrainWorker pid=27448) 2026-12-03 22:31:02,001	ERROR checkpoint_manager.py:80 -- a real error
  images  done     4.0 s
(arpipe:images:unit pid=11) [images] a last line Ray relays after the stage ended
"""

#: what the user sees of it
QUIET = """\
arpipe run 0123456789ab: pipeline 'p', 2 stage(s), outputs under runs
  images  running  never run
  train   running  never run
[images] read 9 samples
a line the user's own code printed
[images] units 1/4  samples 64  elapsed 1 s, ETA 3 s
[train] step 1/60  loss 6.282  lr 0  tokens_per_s 5498  elapsed 2 s, ETA 1 min 58 s
2026-12-03 22:31:02,001	ERROR checkpoint_manager.py:80 -- a real error
  images  done     4.0 s
[images] a last line Ray relays after the stage ended
"""


def _route(tmp_path, verbose=False, bars=False, text=RUN_OUTPUT):
    """RUN_OUTPUT through a Router with both stages running; returns (console, images log, train log, run log)."""
    from arpipe.pipeline.console import Router

    console = io.StringIO()
    router = Router({"images", "train"}, verbose=verbose, run_log=tmp_path / "run.log", bars=bars)
    lines = text.splitlines(keepends=True)
    router.emit(console, "".join(lines[:4]))
    router.begin("images", tmp_path / "images.log")
    router.begin("train", tmp_path / "train.log")
    router.emit(console, "".join(lines[4:6]))
    router.emit(console, "".join(lines[6:-2]))
    router.end("images")
    router.emit(console, "".join(lines[-2:]))
    router.close()
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("images", "train", "run")]
    return console.getvalue(), *logs


def test_the_console_shows_arpipes_lines_and_each_stage_log_keeps_everything_about_it(tmp_path):
    console, images, train, run = _route(tmp_path)
    assert console == QUIET
    # the stage's log: its own lines, with Ray's prefix, and the chatter of its tasks
    assert "(arpipe:images:unit pid=11) [images] read 9 samples" in images
    assert "UserWarning: something deprecated" in images and "return f(*args)" in images
    assert "[train]" not in images and "a line the user's own code printed" in images
    assert "a last line Ray relays after the stage ended" in images   # its log outlives the stage
    assert "a real error" in train
    # Ray Train's actors name no stage: their lines go to the log of every stage running then
    assert "PlacementGroupCleaner" in train and "PlacementGroupCleaner" in images
    assert "[train] step 1/60" in train and "Setting accelerator to CPU" in train
    # before any stage runs, and the runner's own lines: the run's log
    assert "Token authentication" in run and "images  done" in run
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in (images + train + run).splitlines())


def test_verbose_shows_every_line_as_it_came(tmp_path):
    console, *_ = _route(tmp_path, verbose=True)
    assert console == RUN_OUTPUT != QUIET   # (so the quiet check above can fail)


def test_on_a_terminal_progress_lines_update_one_bar_per_stage(tmp_path):
    console, images, _train, _run = _route(tmp_path, bars=True, text=RUN_OUTPUT.replace(
        "[images] units 1/4  samples 64  elapsed 1 s, ETA 3 s\n",
        "[images] units 1/4  samples 64  elapsed 1 s, ETA 3 s\n[images] units 4/4  samples 256  elapsed 2 s, done\n"))
    # tqdm redraws in place with carriage returns; the ordinary lines are written whole between the redraws
    assert "\r" in console
    assert re.search(r"\[images\] units 4/4 \|#+\| samples 256  elapsed 2 s, done", console)
    assert re.search(r"\[train\] step 1/60 \|.*\| loss 6.282", console)
    visible = re.sub(r"\r[^\n\r]*(?=\r)", "", console)   # what the terminal keeps
    for line in ("  images  running  never run", "[images] read 9 samples", "  images  done     4.0 s"):
        assert line in visible
    assert "[images] units 1/4  samples" not in console   # not a scrolling line: a bar
    # the log file keeps every progress line as printed
    assert "[images] units 1/4  samples 64  elapsed 1 s, ETA 3 s" in images
