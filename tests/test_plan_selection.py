"""`arpipe plan` with --only / --from / --until / --force, before and after a run."""

from __future__ import annotations

from helpers import arpipe, write
from test_pipeline_run import PIPELINE, STEPS, SUMMARY


def plan_rows(folder, *args):
    proc = arpipe("plan", "pipeline.yaml", *args, cwd=folder, check=True)
    return {line.split()[0]: line.split(None, 4)[2:] for line in proc.stdout.splitlines()[1:]}


def test_selection_flags(tmp_path, ray_cluster):
    write(tmp_path, {"steps.py": STEPS, "summary.py": SUMMARY, "pipeline.yaml": PIPELINE})
    rows = plan_rows(tmp_path)
    assert rows["a"][0] == "run" and rows["a"][2] == "never run"
    assert rows["b"] == ["run", "-", "after a"]

    rows = plan_rows(tmp_path, "--only", "b")
    assert rows["a"][0] == "blocked" and rows["b"][0] == "run"
    blocked = arpipe("run", "pipeline.yaml", "--only", "b", cwd=tmp_path, env={"RAY_ADDRESS": ray_cluster})
    assert blocked.returncode == 1 and "a: not selected and has no output" in blocked.stderr

    assert set(plan_rows(tmp_path, "--until", "a")) == {"a"}
    assert set(plan_rows(tmp_path, "--from", "b")) == {"a", "b"}   # a shown: it must be built first

    arpipe("run", "pipeline.yaml", "--until", "a", cwd=tmp_path, env={"RAY_ADDRESS": ray_cluster}, check=True)
    rows = plan_rows(tmp_path, "--from", "b")
    assert set(rows) == {"b"} and rows["b"][0] == "run"
    rows = plan_rows(tmp_path, "--force", "all")
    assert rows["a"] == ["run", rows["a"][1], "forced (--force)"]

    bad = arpipe("plan", "pipeline.yaml", "--only", "bb", cwd=tmp_path)
    assert bad.returncode == 2 and "--only bb: no such stage; did you mean 'b'?" in bad.stderr
