"""Stage kinds: kind -> implementing class, imported only when a stage of that kind runs."""

from __future__ import annotations

import importlib

from pipeline.stage import Stage

KINDS: dict[str, str] = {
    "python": "stages.python:PythonStage",
    "tokenizer": "stages.tokenizer:TokenizerStage",
    "tokenize": "stages.tokenize:TokenizeStage",
    "train": "stages.train:TrainStage",
    "sample": "stages.sample:SampleStage",
    "evaluate": "stages.evaluate:EvaluateStage",
}


def stage_class(kind: str) -> type[Stage]:
    target = KINDS.get(kind)
    if target is None:
        raise KeyError(f"no stage class registered for kind {kind!r}")
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
