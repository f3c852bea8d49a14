"""``outputs.json``: the commit record of one stage output folder.

Written last and atomically; a folder without a verifying ``outputs.json``
is never trusted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OUTPUTS_FORMAT = 1


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes: int
    digest: str = Field(description="'<algorithm>:<hex>': sha256 by default; a stage that wrote a file "
                                    "straight to storage may record the checksum it computed (e.g. xxh3_128).")


class OutputValue(BaseModel):
    """One named output: a file or folder inside the stage folder, or a JSON value."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["file", "dir", "value"]
    path: str | None = Field(None, description="Relative to the stage folder, for file and dir outputs.")
    value: Any = None
    digest: str = Field(description="Content digest; what downstream fingerprints depend on.")


class OutputsRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int = OUTPUTS_FORMAT
    stage: str
    kind: str
    fingerprint: str
    fingerprint_doc: dict[str, Any]
    outputs: dict[str, OutputValue]
    files: dict[str, FileRecord]
    digest: str = Field(description="sha256 over outputs and files: everything the stage produced.")
    mlflow_run_id: str | None = None
    started: float
    finished: float
    host: str
    arpipe_version: str

    @property
    def duration_s(self) -> float:
        return self.finished - self.started
