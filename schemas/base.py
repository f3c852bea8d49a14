"""Building blocks of every stage config: strict models, resources, the fields all kinds share."""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

STAGE_NAME = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
REF_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_\-]*)\.([A-Za-z_][A-Za-z0-9_\-]*)\}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(Strict):
    """Ray resources one stage task asks for."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved for the stage's Ray task.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved for the stage's Ray task.")
    memory: int | None = Field(None, ge=0, description="Bytes of memory reserved (Ray's `memory` resource).")


class StageBase(Strict):
    """Fields every stage kind has."""

    #: config fields that change how a stage runs but not what it produces; left out of fingerprints
    runtime_fields: ClassVar[frozenset[str]] = frozenset(
        {"needs", "description", "workers", "progress", "resources"})
    #: named outputs a reference may use; None when they are known only at run time
    output_names: ClassVar[tuple[str, ...] | None] = None

    needs: list[str] = Field(default_factory=list,
                             description="Stages to run first although no output of theirs is used.")
    description: str | None = Field(None, description="Free text shown by `arpipe plan` and in MLflow.")
