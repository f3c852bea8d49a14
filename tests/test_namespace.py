"""A user's project that has its own `pipeline/`, `stages.py`, `schemas.py` and `cluster.py`.

Those names are common in ML repositories. arpipe installs as `arpipe.*`, so the user's modules and
arpipe's never shadow each other: python stages import the user's, arpipe keeps its own, and the
Python API (`import arpipe`) works from inside such a folder.
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import arpipe, stage_lines, write

USER_MODULES = {
    "pipeline/__init__.py": 'WHO = "user pipeline package"\n',
    "pipeline/steps.py": """
        import os
        import sys

        import cluster
        import schemas
        import stages

        import pipeline

        PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


        def make(config, inputs, out_dir):
            # every arpipe module this worker holds is arpipe's own, none is a file of this project
            foreign = sorted(name for name, module in sys.modules.items() if name.split(".")[0] == "arpipe"
                             and (getattr(module, "__file__", "") or "").startswith(PROJECT + os.sep))
            return {"who": [pipeline.WHO, stages.WHO, schemas.WHO, cluster.WHO], "foreign": foreign,
                    "n": config["n"]}
    """,
    "stages.py": """
        import sys

        WHO = "user stages module"


        def total(config, inputs, out_dir):
            arpipe_stage = sys.modules.get("arpipe.stages.python")
            return {"total": inputs["n"] * 2, "arpipe_python_stage": getattr(arpipe_stage, "__name__", None)}
    """,
    "schemas.py": 'WHO = "user schemas module"\n',
    "cluster.py": 'WHO = "user cluster module"\n',
}

PIPELINE = """
name: collide
storage: ./runs
stages:
  a:
    kind: python
    callable: pipeline.steps:make
    config: {n: 21}
  b:
    kind: python
    callable: stages:total
    inputs: {n: "${a.n}"}
"""


def _record(folder, stage: str) -> dict:
    return json.loads(next((folder / "runs" / stage).glob("*/outputs.json")).read_text())


def test_user_modules_named_like_arpipe_packages_run_locally(tmp_path, ray_cluster):
    folder = write(tmp_path / "project", {**USER_MODULES, "pipeline.yaml": PIPELINE})
    env = {"RAY_ADDRESS": ray_cluster}
    arpipe("validate", "pipeline.yaml", cwd=folder, check=True)
    run = arpipe("run", "pipeline.yaml", cwd=folder, env=env, check=True)
    assert stage_lines(run.stdout) == {"a": ["running", "done"], "b": ["running", "done"]}
    made = _record(folder, "a")["outputs"]
    assert made["who"]["value"] == ["user pipeline package", "user stages module", "user schemas module",
                                    "user cluster module"]
    assert made["foreign"]["value"] == []
    total = _record(folder, "b")["outputs"]
    assert total["total"]["value"] == 42
    assert total["arpipe_python_stage"]["value"] == "arpipe.stages.python"


def test_the_python_api_from_inside_a_colliding_folder(tmp_path, ray_cluster):
    folder = write(tmp_path / "project", {**USER_MODULES, "pipeline.yaml": PIPELINE})
    script = """
import json, sys
import arpipe

pipe = arpipe.load("pipeline.yaml", overrides=["stages.a.config.n=5"])
before = [(p.name, p.action) for p in arpipe.plan(pipe)]
result = arpipe.run(pipe, address=sys.argv[1], echo=None)
after = [(p.name, p.action) for p in arpipe.plan(pipe)]
print(json.dumps({"stages": pipe.stages, "before": before, "states": result.states, "after": after,
                  "total": result.records["b"].outputs["total"].value}))
"""
    proc = subprocess.run([sys.executable, "-c", script, ray_cluster], cwd=folder, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["stages"] == ["a", "b"]
    assert seen["before"] == [["a", "run"], ["b", "run"]]
    assert seen["states"] == {"a": "done", "b": "done"}
    assert seen["after"] == [["a", "cached"], ["b", "cached"]]
    assert seen["total"] == 10
