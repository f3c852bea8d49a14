"""JSON Schema of the pipeline file, for editors (yaml-language-server) and `arpipe schema`.

Regenerate the checked-in copy with ``python -m arpipe.schemas.export``.
"""

from __future__ import annotations

import json
from pathlib import Path

from arpipe.schemas.pipeline import PipelineSpec

SCHEMA_FILE = Path(__file__).with_name("pipeline.schema.json")


def pipeline_schema() -> dict:
    schema = PipelineSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://github.com/arpipe/arpipe/schemas/pipeline.schema.json"
    return schema


def render() -> str:
    return json.dumps(pipeline_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(render())
    print(f"wrote {SCHEMA_FILE}")
