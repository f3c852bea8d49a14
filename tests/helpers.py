"""Running the real `arpipe` CLI the way a user does, from the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ARPIPE = [sys.executable, "-m", "arpipe.pipeline.cli"]


def write(folder: Path, files: dict[str, str]) -> Path:
    """Write dedented files into folder; return the folder."""
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return folder


def arpipe(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240,
           check: bool | None = None) -> subprocess.CompletedProcess:
    """Run `arpipe ARGS` in cwd; check=True asserts exit 0 and shows the output if not."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([*ARPIPE, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"arpipe {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def spawn(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen([*ARPIPE, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stage_lines(stdout: str) -> dict[str, list[str]]:
    """stage -> the states it went through, read off `arpipe run` output."""
    states: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[1] in (
                "cached", "running", "resuming", "done", "failed", "skipped", "waiting", "blocked"):
            states.setdefault(parts[0], []).append(parts[1])
    return states
