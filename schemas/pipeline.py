"""The pipeline file: a name, where outputs go, and stages discriminated on ``kind``.

Stage kinds add their config model to :data:`StageSpec`. Every model forbids
unknown fields, so a typo is an error that names its line.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator

from arpipe.schemas.base import STAGE_NAME, Resources, StageBase, Strict
from arpipe.schemas.sample import EvaluateStage, SampleStage
from arpipe.schemas.tokenize import TokenizerStage, TokenizeStage
from arpipe.schemas.train import TrainStage


class PythonStage(StageBase):
    """Runs ``module:function(config, inputs, out_dir)`` as a Ray task.

    This is arbitrary code execution: the callable runs with the permissions of
    the Ray worker. The dict it returns becomes the stage's named outputs; a
    value that is a path inside ``out_dir`` becomes a file output whose content
    digest flows into downstream fingerprints.
    """

    kind: Literal["python"]
    callable: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                          description="`package.module:function`; the pipeline file's folder is importable.")
    inputs: dict[str, Any] = Field(default_factory=dict,
                                   description="Named inputs, usually `${stage.output}` references.")
    config: dict[str, Any] = Field(default_factory=dict, description="Passed as the `config` argument.")
    outputs: list[str] | None = Field(None, description="Output names the callable returns (checked).")
    resources: Resources = Field(default_factory=Resources, description="Ray resources of the callable's task.")


StageSpec = Annotated[Union[PythonStage, TokenizerStage, TokenizeStage, TrainStage, SampleStage,  # noqa: UP007
                            EvaluateStage],
                      Field(discriminator="kind")]


class PipelineSpec(Strict):
    """A pipeline file."""

    name: str = Field(pattern=STAGE_NAME, description="Pipeline name; also the MLflow experiment by default.")
    experiment: str | None = Field(None, description="MLflow experiment name (default: `name`).")
    storage: str = Field("./arpipe-runs", description="Output root: a local folder or `s3://bucket/prefix`.")
    description: str | None = None
    stages: dict[str, StageSpec] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict[str, Any]) -> dict[str, Any]:
        for name in stages:
            if not re.match(STAGE_NAME, name):
                raise ValueError(f"stage name {name!r} must start with a letter and use letters, digits, '_' or '-'")
        return stages

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name


def stage_kinds() -> dict[str, type[StageBase]]:
    """kind -> config model, read off the StageSpec union."""
    union = StageSpec.__origin__  # type: ignore[attr-defined]
    members = getattr(union, "__args__", (union,))
    return {m.model_fields["kind"].annotation.__args__[0]: m for m in members}
