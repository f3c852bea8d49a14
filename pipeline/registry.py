"""Stage kinds: kind -> implementing class, imported only when a stage of that kind runs."""

from __future__ import annotations

import importlib

from arpipe.pipeline.stage import Stage

KINDS: dict[str, str] = {
    "python": "arpipe.stages.python:PythonStage",
    "tokenizer": "arpipe.stages.tokenizer:TokenizerStage",
    "tokenize": "arpipe.stages.tokenize:TokenizeStage",
    "train": "arpipe.stages.train:TrainStage",
    "sample": "arpipe.stages.sample:SampleStage",
    "evaluate": "arpipe.stages.evaluate:EvaluateStage",
}


def stage_class(kind: str) -> type[Stage]:
    target = KINDS.get(kind)
    if target is None:
        raise KeyError(f"no stage class registered for kind {kind!r}")
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
