"""Stage kinds: kind -> implementing class, imported only when a stage of that kind runs.

Built-in kinds are listed in :data:`KINDS`; installed plugins (:mod:`arpipe.pipeline.plugins`) add stage
kinds, readers and tokenizer types, whose config models join the pipeline model :func:`pipeline_spec`
returns: what loading, validating and ``arpipe schema`` use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from arpipe.pipeline import plugins
from arpipe.schemas.base import StageBase
from arpipe.schemas.pipeline import PipelineSpec, pipeline_model, stage_kinds, tags
from arpipe.schemas.tokenize import Source, SourceBase, TokenizerBase, TokenizerConfig

if TYPE_CHECKING:
    from arpipe.pipeline.stage import Stage

KINDS: dict[str, str] = {
    "python": "arpipe.stages.python:PythonStage",
    "tokenizer": "arpipe.stages.tokenizer:TokenizerStage",
    "tokenize": "arpipe.stages.tokenize:TokenizeStage",
    "train": "arpipe.stages.train:TrainStage",
    "sample": "arpipe.stages.sample:SampleStage",
    "evaluate": "arpipe.stages.evaluate:EvaluateStage",
}


def pipeline_spec() -> type[PipelineSpec]:
    """PipelineSpec with the installed plugins' stage kinds, sources and tokenizer configs joined to its unions."""
    return pipeline_model(
        plugins.config_models("arpipe.stages", StageBase, frozenset(KINDS)),
        plugins.config_models("arpipe.readers", SourceBase, frozenset(tags(Source, "modality"))),
        plugins.config_models("arpipe.tokenizers", TokenizerBase, frozenset(tags(TokenizerConfig, "type"))))


def stage_models() -> dict[str, type[StageBase]]:
    """kind -> config model, the installed plugins' kinds included."""
    return stage_kinds(pipeline_spec())


def stage_class(kind: str) -> type[Stage]:
    target = KINDS.get(kind)
    if target is None:
        if kind in plugins.declared("arpipe.stages"):
            # imported here: arpipe.pipeline.stage -> lineage -> config imports this module
            from arpipe.pipeline.stage import Stage

            return plugins.implementation("arpipe.stages", kind, StageBase, Stage)
        raise KeyError(f"no stage class registered for kind {kind!r}")
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
