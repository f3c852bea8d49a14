"""Running the real `arpipe` CLI the way a user does, from the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ARPIPE = [sys.executable, "-m", "arpipe.pipeline.cli"]
#: the niceness of the suite's background work (kill campaigns, fixtures built ahead): it takes the cores only
#: while the tests in front wait (on process and Ray start-up, mostly)
BACKGROUND_NICE = 19
#: a background build's limit: it gets the cores only once the tests in front leave them, which on a slow
#: machine can be most of the session (CI once stopped two builds at 1800 s while the foreground still ran);
#: under the session's own limit (tests/conftest.py), which names a hang with every thread's traceback
BUILD_TIMEOUT_S = 3000


def niced(command: list[str], nice: int) -> list[str]:
    """``command`` run at niceness ``nice`` (0, or a machine without ``nice``: as it is).

    coreutils' ``nice`` sets it and execs the command. A ``preexec_fn`` would do it in Python between fork
    and exec, and a fork of this process is not safe: gRPC (Ray's driver) and torch keep threads here, and
    gRPC's fork handlers can abort or hang the parent (one hung CI for an hour). Without a ``preexec_fn``
    Python starts children with vfork and exec, and no fork handler runs.
    """
    nice_binary = shutil.which("nice")
    return [nice_binary, "-n", str(nice), *command] if nice and nice_binary else command


def lower_group(proc: subprocess.Popen, nice: int) -> None:
    """Lower the scheduling group of a child that started a session of its own (``start_new_session``).

    Where Linux groups processes by session (autogroup), groups share the cores equally whatever their
    processes' niceness, so a niced child in a session of its own needs its group lowered too. The kernel
    takes one such change per 100 ms from an unprivileged user (EAGAIN otherwise): try for a few seconds.
    """
    if not nice:
        return
    for _ in range(50):
        try:
            with open(f"/proc/{proc.pid}/autogroup", "w") as f:
                f.write(str(nice))
            return
        except BlockingIOError:
            time.sleep(0.1)
        except OSError:   # no autogroup (a kernel without it, or turned off), or the child is gone
            return


def start_in_own_session(command: list[str], nice: int = 0, **popen_kwargs) -> subprocess.Popen:
    """``command`` started in a session of its own (nothing sent to its process group reaches the suite's) at
    niceness ``nice``, its scheduling group lowered to match (:func:`niced`, :func:`lower_group`)."""
    proc = subprocess.Popen(niced(command, nice), start_new_session=True, **popen_kwargs)
    lower_group(proc, nice)
    return proc


def background_script(script: str, out: Path, what: str) -> Path:
    """``python script OUT`` run at background priority (tests/background.py) from the tests folder, its output in
    ``OUT.log``; asserts it succeeded, saying ``what`` failed with the log's end. Returns ``out``."""
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run(niced([sys.executable, script, str(out)], BACKGROUND_NICE), stdout=f,
                              stderr=subprocess.STDOUT, cwd=Path(script).parent, timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, f"{what} failed:\n{log.read_text()[-3000:]}"
    return out


def background_project(root: Path, pipeline: str, ray_address: str) -> subprocess.CompletedProcess:
    """`arpipe run PIPELINE` in ``root`` at background priority on the background Ray instance; every stage done."""
    run = arpipe("run", pipeline, cwd=root, env={"RAY_ADDRESS": ray_address}, timeout=BUILD_TIMEOUT_S, check=True,
                 nice=BACKGROUND_NICE)
    assert all(states[-1] == "done" for states in stage_lines(run.stdout).values()), run.stdout
    return run


def json_output(command: str, stdout: str) -> dict:
    """``arpipe COMMAND --json``'s stdout, parsed and checked against its checked-in JSON Schema
    (schemas/cli/, the contract docs/cli.md documents)."""
    import json

    import jsonschema

    from arpipe.schemas.cli import schema_file_name
    from arpipe.schemas.export import CLI_SCHEMAS

    schema = json.loads((CLI_SCHEMAS / schema_file_name(command)).read_text())
    document = json.loads(stdout)
    jsonschema.Draft202012Validator(schema).validate(document)
    return document


def write(folder: Path, files: dict[str, str]) -> Path:
    """Write dedented files into folder; return the folder."""
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return folder


def arpipe(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240,
           check: bool | None = None, nice: int = 0) -> subprocess.CompletedProcess:
    """Run `arpipe ARGS` in cwd; check=True asserts exit 0 and shows the output if not."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(niced([*ARPIPE, *args], nice), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"arpipe {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


class RunsAhead:
    """`arpipe` commands started ahead of the tests that read them, ``at_once`` at a time: a run that mostly waits
    (on process, Ray and Ray Train start-up) leaves a core idle, which the next one takes. ``result(name)`` waits
    for one and returns what :func:`arpipe` would have."""

    def __init__(self, at_once: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="arpipe-ahead")
        self._runs: dict[str, Future] = {}

    def start(self, name: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 600) -> None:
        self._runs[name] = self._pool.submit(arpipe, *args, cwd=cwd, env=env, timeout=timeout)

    def result(self, name: str) -> subprocess.CompletedProcess:
        return self._runs[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def spawn(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen([*ARPIPE, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def committed_output(root: Path, stage: str) -> Path:
    """The folder of ``stage``'s committed output in a project whose storage is ``./runs``."""
    return next(p.parent for p in root.glob(f"runs/{stage}/*/outputs.json"))


def stage_lines(stdout: str) -> dict[str, list[str]]:
    """stage -> the states it went through, read off `arpipe run` output."""
    states: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[1] in (
                "cached", "running", "resuming", "done", "failed", "skipped", "waiting", "blocked"):
            states.setdefault(parts[0], []).append(parts[1])
    return states
