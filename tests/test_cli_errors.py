"""Broken pipelines: each gives one clear line with file:line, exit code 2, and no traceback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import arpipe, write

GOOD = """
name: broken
stages:
  a:
    kind: python
    callable: steps:make
    config: {n: 1}
  b:
    kind: python
    callable: steps:make
    inputs: {x: "${a.out}"}
"""

CASES = {
    "yaml syntax error": (GOOD.replace("config: {n: 1}", "config: {n: 1"), [], r"pipeline\.yaml:\d+:\d+: YAML syntax error"),
    "unknown kind": (GOOD.replace("kind: python\n    callable: steps:make\n    config",
                                  "kind: pyton\n    callable: steps:make\n    config"), [],
                     r"pipeline\.yaml:4:11: stages\.a\.kind: unknown stage kind 'pyton'; did you mean 'python'\?"),
    "misspelled field": (GOOD.replace("config: {n: 1}", "confg: {n: 1}"), [],
                         r"pipeline\.yaml:6:5: stages\.a\.confg: unknown field 'confg'; did you mean 'config'\?"),
    "wrong type": (GOOD.replace("config: {n: 1}", "config: [1, 2]"), [],
                   r"pipeline\.yaml:6:13: stages\.a\.config: input should be a valid dictionary"),
    "cycle": (GOOD.replace("config: {n: 1}", "config: {n: 1}\n    needs: [b]"), [],
              r"pipeline\.yaml:\d+:\d+: stages\.a: cycle: a -> b -> a"),
    "unknown reference": (GOOD.replace("${a.out}", "${aa.out}"), [],
                          r"pipeline\.yaml:10:17: stages\.b\.inputs\.x: unknown stage 'aa' .*did you mean 'a'\?"),
    "missing required field": (GOOD.replace("    callable: steps:make\n    config", "    config"), [],
                               r"pipeline\.yaml:\d+:\d+: stages\.a: missing required field 'callable'"),
    "bad override": (GOOD, ["-s", "stages.c.config.n=2"],
                     r"-s stages\.c\.config\.n=2: no stage 'c' in the pipeline"),
    "unset env": (GOOD.replace("{n: 1}", "{n: \"${env:ARPIPE_TEST_UNSET}\"}"), [],
                  r"pipeline\.yaml:6:17: stages\.a\.config\.n: environment variable ARPIPE_TEST_UNSET is not set; export"),
    "duplicate stage name": (GOOD + "  a:\n    kind: python\n    callable: steps:make\n", [],
                             r"pipeline\.yaml:11:3: stages\.a: duplicate key 'a' \(first at .*pipeline\.yaml:3:3\)"),
    "python tag": (GOOD.replace("{n: 1}", "!!python/object/apply:os.system ['true']"), [],
                   r"pipeline\.yaml:6:13: YAML tag .* is not allowed"),
    "missing file": (None, [], r"nope\.yaml: pipeline file not found"),
}


@pytest.mark.parametrize("case, command", [(case, "validate") for case in CASES] + [
    ("yaml syntax error", "plan"), ("cycle", "run"), ("bad override", "run"), ("unset env", "status")])
def test_broken_pipeline_gives_one_clear_line(tmp_path, case, command):
    text, extra, expected = CASES[case]
    write(tmp_path, {"steps.py": "def make(config, inputs, out_dir):\n    return {'out': 1}\n"})
    if text is not None:
        (tmp_path / "pipeline.yaml").write_text(text.lstrip())
    name = "pipeline.yaml" if text is not None else "nope.yaml"
    proc = arpipe(command, name, *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "arpipe-runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "pipeline.yaml").write_text(CASES["unknown kind"][0].lstrip())
    proc = arpipe("--debug", "validate", "pipeline.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_valid_pipeline_validates_and_plans_without_torch_or_ray(tmp_path):
    write(tmp_path, {"steps.py": "def make(config, inputs, out_dir):\n    return {'out': 1}\n",
                     "pipeline.yaml": GOOD})
    code = ("import sys; from arpipe.pipeline.cli import main; rc = main(['validate', 'pipeline.yaml']);"
            "rc |= main(['plan', 'pipeline.yaml']);"
            "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'mlflow') if m in sys.modules];"
            "print('HEAVY', heavy); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ok: 2 stage(s) in order a -> b" in proc.stdout
    assert "HEAVY []" in proc.stdout
