"""Editors validate pipeline files against schemas/pipeline.schema.json; it must match the models."""

from __future__ import annotations

import json

from helpers import arpipe

from arpipe.schemas.cli import OUTPUTS, schema_file_name
from arpipe.schemas.export import CLI_SCHEMAS, SCHEMA_FILE, render, render_cli


def test_checked_in_schema_is_current():
    assert SCHEMA_FILE.read_text() == render(), "stale: run `python -m arpipe.schemas.export` and commit the file"


def test_checked_in_json_output_schemas_are_current():
    """`--json`'s documented contracts (schemas/cli/) are the output models' schemas, one per command."""
    assert sorted(p.name for p in CLI_SCHEMAS.glob("*.json")) == sorted(schema_file_name(c) for c in OUTPUTS)
    for command in OUTPUTS:
        assert (CLI_SCHEMAS / schema_file_name(command)).read_text() == render_cli(command), \
            "stale: run `python -m arpipe.schemas.export` and commit the files"


def test_arpipe_schema_prints_it(tmp_path):
    proc = arpipe("schema", cwd=tmp_path, check=True)
    schema = json.loads(proc.stdout)
    assert schema["title"] == "PipelineSpec"
    assert "python" in json.dumps(schema["$defs"]["PythonStage"]["properties"]["kind"])
    assert schema["$defs"]["PythonStage"]["additionalProperties"] is False
