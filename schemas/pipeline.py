"""The pipeline file: a name, where outputs go, and stages discriminated on ``kind``.

Built-in stage kinds add their config model to :data:`StageSpec`. Every model forbids
unknown fields, so a typo is an error that names its line. Plugins (docs/extending.md)
join their config models to the unions through :func:`pipeline_model`; this module
does not look for them (``arpipe.pipeline.registry`` does).
"""

from __future__ import annotations

import functools
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, create_model, field_validator

from arpipe.schemas.base import STAGE_NAME, Resources, StageBase, Strict
from arpipe.schemas.sample import EvaluateStage, SampleStage
from arpipe.schemas.tokenize import Source, TokenizerConfig, TokenizerStage, TokenizeStage
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


def tags(union: Any, tag: str) -> dict[str, type[BaseModel]]:
    """tag value -> member model of a discriminated union (``StageSpec`` on ``kind``, ``Source`` on
    ``modality``, ``TokenizerConfig`` on ``type``)."""
    members = get_args(get_args(union)[0] if get_origin(union) is Annotated else union)
    return {get_args(m.model_fields[tag].annotation)[0]: m for m in members
            if isinstance(m, type) and issubclass(m, BaseModel)}


def stage_kinds(model: type[PipelineSpec] | None = None) -> dict[str, type[StageBase]]:
    """kind -> config model, read off the stages union of ``model`` (default: the built-in kinds only)."""
    stages = (model or PipelineSpec).model_fields["stages"].annotation
    return tags(get_args(stages)[1], "kind")  # type: ignore[return-value]


@functools.cache
def pipeline_model(kinds: tuple[type[StageBase], ...] = (), sources: tuple[type[BaseModel], ...] = (),
                   tokenizers: tuple[type[BaseModel], ...] = ()) -> type[PipelineSpec]:
    """PipelineSpec with plugin config models joined to the built-in unions: ``kinds`` to :data:`StageSpec`,
    ``sources`` to ``Source`` and ``tokenizers`` to ``TokenizerConfig`` wherever a stage takes one.

    The models that hold a widened union are rebuilt as subclasses of the built-in ones (validators,
    class variables and ``isinstance`` carry over). Nothing given: :class:`PipelineSpec` itself.
    """
    if not (kinds or sources or tokenizers):
        return PipelineSpec
    swaps = ((frozenset(tags(Source, "modality").values()), sources),
             (frozenset(tags(TokenizerConfig, "type").values()), tokenizers))
    members = tuple(_widen(m, swaps) for m in (*stage_kinds().values(), *kinds))
    stages = Annotated[Union[members], Field(discriminator="kind")]  # noqa: UP007
    return create_model("PipelineSpec", __base__=PipelineSpec, __module__=__name__, __doc__=PipelineSpec.__doc__,
                        stages=(dict[str, stages], PipelineSpec.model_fields["stages"]))


Swaps = tuple[tuple[frozenset, tuple], ...]


def _widen(tp: Any, swaps: Swaps) -> Any:
    """``tp`` with each union that holds all of a swap's built-in members given that swap's extra members."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _widen_model(tp, swaps)
    args = get_args(tp)
    if not args:
        return tp
    origin = get_origin(tp)
    if origin is Annotated:
        inner = _widen(args[0], swaps)
        return tp if inner is args[0] else Annotated[(inner, *tp.__metadata__)]
    if origin in (Union, types.UnionType):
        extra = tuple(m for builtin, more in swaps if builtin <= set(args) for m in more)
        widened = tuple(_widen(a, swaps) for a in (*args, *extra))
        return tp if widened == args else Union[widened]  # noqa: UP007
    widened = tuple(_widen(a, swaps) for a in args)
    return tp if widened == args else origin[widened]


@functools.cache
def _widen_model(model: type[BaseModel], swaps: Swaps) -> type[BaseModel]:
    changed = {}
    for name, info in model.model_fields.items():
        annotation = _widen(info.annotation, swaps)
        if annotation is not info.annotation:
            changed[name] = (annotation, info)
    if not changed:
        return model
    return create_model(model.__name__, __base__=model, __module__=model.__module__, __doc__=model.__doc__,
                        **changed)
