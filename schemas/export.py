"""JSON Schema of the pipeline file, for editors (yaml-language-server) and `arpipe schema`, and of what
``--json`` prints (``schemas/cli/``, :mod:`arpipe.schemas.cli`).

Regenerate the checked-in copies with ``python -m arpipe.schemas.export``.
"""

from __future__ import annotations

import json
from pathlib import Path

from arpipe.schemas.cli import OUTPUTS, schema_file_name
from arpipe.schemas.pipeline import PipelineSpec

SCHEMA_FILE = Path(__file__).with_name("pipeline.schema.json")
CLI_SCHEMAS = Path(__file__).with_name("cli")
ID_BASE = "https://github.com/arpipe/arpipe/schemas/"


def pipeline_schema(model: type[PipelineSpec] = PipelineSpec) -> dict:
    """The JSON Schema of ``model``: the built-in kinds by default (the checked-in file), or the pipeline model
    with installed plugins that ``arpipe schema`` prints (``arpipe.pipeline.registry.pipeline_spec``)."""
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = ID_BASE + "pipeline.schema.json"
    return schema


def render(model: type[PipelineSpec] = PipelineSpec) -> str:
    return json.dumps(pipeline_schema(model), indent=2, sort_keys=True) + "\n"


def render_cli(command: str) -> str:
    """The JSON Schema of ``arpipe COMMAND --json``'s output."""
    schema = OUTPUTS[command].model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = ID_BASE + "cli/" + schema_file_name(command)
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(render())
    print(f"wrote {SCHEMA_FILE}")
    CLI_SCHEMAS.mkdir(exist_ok=True)
    for command in OUTPUTS:
        (CLI_SCHEMAS / schema_file_name(command)).write_text(render_cli(command))
    print(f"wrote {len(OUTPUTS)} schemas under {CLI_SCHEMAS}")
