"""Editors validate pipeline files against schemas/pipeline.schema.json; it must match the models."""

from __future__ import annotations

import json

from helpers import arpipe

from arpipe.schemas.export import SCHEMA_FILE, render


def test_checked_in_schema_is_current():
    assert SCHEMA_FILE.read_text() == render(), "stale: run `python -m arpipe.schemas.export` and commit the file"


def test_arpipe_schema_prints_it(tmp_path):
    proc = arpipe("schema", cwd=tmp_path, check=True)
    schema = json.loads(proc.stdout)
    assert schema["title"] == "PipelineSpec"
    assert "python" in json.dumps(schema["$defs"]["PythonStage"]["properties"]["kind"])
    assert schema["$defs"]["PythonStage"]["additionalProperties"] is False
