"""arpipe models as MLflow models: the ``python_function`` flavor's loader and what ``predict`` answers.

A train stage logs its model folder with this module as the pyfunc ``loader_module`` (the folder is the
MLflow model's ``data/model``), so the standard API works on it::

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/digits@champion")      # or models:/m-<id>, runs:/..., a path
    out = model.predict(pd.DataFrame({"class": ["3", "7"], "seed": [0, 0], "index": [0, 1]}))
    out["tokens"][0], out["media"][0]          # the sample's token ids and its decoded array

and so does ``mlflow models predict -m models:/digits@champion -i rows.json -t json --env-manager local``.

Input rows (a DataFrame, a list of dicts or a dict of columns), every column optional:
``class`` (a class the model knows; absent or null: unconditional), ``prompt`` (text, for a model trained
on captions), ``seed`` (default 0) and ``index`` (default: the row's position): row ``(seed, index)`` is the
sample stage's sample ``index`` drawn with ``seed: seed``, token for token; ``modality`` (the model's
vocabulary name; default its only one), ``length`` (variable-length layouts), and the sampling options
``temperature``, ``top_k``, ``top_p``, ``cfg_scale``, ``cfg_schedule`` (the sample stage's defaults).
The answer has the input columns plus ``tokens`` (tokenizer-local ids, flat), ``shape`` (the decoded
sample's shape) and ``media`` (the decoded sample as its tokenizer decodes it: an image CHW, a video, a
volume, points).
"""

from __future__ import annotations

from typing import Any

#: the sampling options a row may set, with the sample stage's defaults
OPTIONS: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 1.0,
                           "cfg_schedule": "constant"}


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> GeneratorModel:
    """MLflow's entry point: ``data_path`` is the model folder inside the downloaded MLflow model;
    ``model_config={"weights": "raw"}`` (``mlflow.pyfunc.load_model(uri, model_config=...)``) picks the raw
    weights of a model trained with ``ema:`` (default: the EMA weights, as the sample stage)."""
    from arpipe.api import load_model

    weights = (model_config or {}).get("weights", "default")
    return GeneratorModel(load_model(data_path, weights=None if weights == "default" else weights))


def load_model(model_uri: str, *, device: str = "cpu", weights: str | None = None):
    """The :class:`arpipe.api.TrainedModel` behind an MLflow model URI or a model folder."""
    from arpipe.api import load_model as load

    return load(model_uri, device=device, weights=weights)


def _value(row: dict[str, Any], key: str, default: Any) -> Any:
    """A row's value, the default where the column is missing or the cell empty (NaN, None)."""
    value = row.get(key, default)
    try:
        import math

        if value is None or (isinstance(value, float) and math.isnan(value)):
            return default
    except TypeError:
        pass
    return value


class GeneratorModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(rows)`` draws and decodes one sample per row."""

    def __init__(self, model):
        self.model = model   # arpipe.api.TrainedModel

    def predict(self, model_input, params: dict[str, Any] | None = None):
        import numpy as np
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        rows = frame.to_dict(orient="records")
        groups: dict[tuple, list[int]] = {}
        for position, row in enumerate(rows):
            key = (_value(row, "modality", None), int(_value(row, "seed", 0)), _value(row, "length", None),
                   *(_value(row, k, v) for k, v in {**OPTIONS, **(params or {})}.items()))
            groups.setdefault(key, []).append(position)
        tokens: list[Any] = [None] * len(rows)
        media: list[Any] = [None] * len(rows)
        for (modality, seed, length, *options), positions in groups.items():
            labels = [_value(rows[p], "class", None) for p in positions]
            prompts = [_value(rows[p], "prompt", None) for p in positions]
            kwargs = dict(zip(OPTIONS, options, strict=True))
            drawn = self.model.sample(modality, [None if c is None else str(c) for c in labels], seed=seed,
                                      length=None if length is None else int(length),
                                      indices=[int(_value(rows[p], "index", p)) for p in positions],
                                      prompts=prompts if any(prompts) else None, decode=False,
                                      **{k: (int(v) if k == "top_k" else v if k == "cfg_schedule" else float(v))
                                         for k, v in kwargs.items()})
            decoded = self.model.decode(modality, drawn)
            for p, ids, array in zip(positions, drawn, decoded, strict=True):
                tokens[p], media[p] = np.asarray(ids).reshape(-1).tolist(), np.asarray(array)
        out = frame.copy()
        out["tokens"] = tokens
        out["shape"] = [list(m.shape) for m in media]
        out["media"] = media
        return out
