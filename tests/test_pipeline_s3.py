"""The same story with `storage: s3://...` on a real S3 server (SeaweedFS, signatures checked)."""

from __future__ import annotations

import json

from helpers import arpipe, stage_lines, write
from test_pipeline_run import PIPELINE, STEPS, SUMMARY

from arpipe.pipeline.storage import join, storage_for


def test_pipeline_on_s3_storage(tmp_path, ray_cluster, s3_bucket):
    root = f"{s3_bucket}/runs"
    write(tmp_path, {"steps.py": STEPS, "summary.py": SUMMARY,
                     "pipeline.yaml": PIPELINE.replace("storage: ./runs", f"storage: {root}")})
    env = {"RAY_ADDRESS": ray_cluster, "ARPIPE_STAGING": str(tmp_path / "staging")}
    first = arpipe("run", "pipeline.yaml", cwd=tmp_path, env=env, check=True)
    assert stage_lines(first.stdout) == {s: ["running", "done"] for s in "abc"}
    assert not (tmp_path / "runs").exists()

    storage = storage_for(root)
    files = sorted(e.relpath for e in storage.list(root) if not e.relpath.startswith(".arpipe/"))
    b_files = [f for f in files if f.startswith("b/") and f.endswith("scaled.json")]
    assert len(b_files) == 1
    assert json.loads(storage.read_text(join(root, b_files[0]))) == [0, 2, 4, 6, 8]
    record = json.loads(storage.read_text(join(root, b_files[0].replace("scaled.json", "outputs.json"))))
    assert set(record["files"]) == {"partial.txt", "scaled.json"}

    again = arpipe("run", "pipeline.yaml", cwd=tmp_path, env=env, check=True)
    assert stage_lines(again.stdout) == {s: ["cached"] for s in "abc"}

    # an output deleted behind arpipe's back is not trusted: plan says why and run redoes it
    storage.delete(join(root, b_files[0]))
    plan = arpipe("plan", "pipeline.yaml", cwd=tmp_path, env=env, check=True)
    row = next(line for line in plan.stdout.splitlines() if line.startswith("b "))
    assert " run " in row and "output missing: scaled.json" in row
    redo = arpipe("run", "pipeline.yaml", cwd=tmp_path, env=env, check=True)
    assert stage_lines(redo.stdout) == {"a": ["cached"], "b": ["running", "done"], "c": ["cached"]}
    assert json.loads(storage.read_text(join(root, b_files[0]))) == [0, 2, 4, 6, 8]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("story").experiment_id])
    b_runs = [r for r in runs if r.data.tags.get("arpipe.stage") == "b" and r.data.tags["arpipe.cache"] == "miss"]
    [dataset] = b_runs[0].inputs.dataset_inputs
    assert dataset.dataset.source_type == "s3" and root in dataset.dataset.source
