"""arpipe's Python API: what ``arpipe validate | plan | run`` do, plus reading what a run made.

    import arpipe

    pipe = arpipe.load("pipeline.yaml", overrides=["stages.train.steps=10"])   # validated, or UserError
    for step in arpipe.plan(pipe):
        print(step.name, step.action, step.why)
    result = arpipe.run(pipe)                  # embedded Ray and a SQLite MLflow unless told otherwise
    model = arpipe.load_model("./runs/train/<fingerprint>/model")   # a train stage's `model` output
    digits = model.sample("image", labels=[3, 3, 7], seed=0)         # decoded arrays, one per label

Each function is the command's own code path (the CLI calls the same modules), so a pipeline that
runs from Python behaves exactly as it does from the shell: same cache, same lineage, same errors
(:class:`arpipe.pipeline.errors.UserError` carries the file, line and fix that the CLI prints).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from arpipe.pipeline.config import LoadedPipeline
    from arpipe.pipeline.dag import Graph
    from arpipe.pipeline.plan import StagePlan
    from arpipe.pipeline.runner import RunResult
    from arpipe.stages.models.folder import ModelFolder
    from arpipe.stages.store import TokenStore


@dataclass(frozen=True)
class Pipeline:
    """A loaded, validated pipeline: its spec (``loaded.spec``) and its stage graph."""

    loaded: LoadedPipeline
    graph: Graph

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    @property
    def path(self) -> Path:
        return self.loaded.path

    @property
    def stages(self) -> list[str]:
        """Stage names in the order they run."""
        return list(self.graph.order)


def load(path: str | Path, overrides: Sequence[str] = ()) -> Pipeline:
    """Read and validate a pipeline file, as ``arpipe validate`` does.

    ``overrides`` are ``PATH=VALUE`` strings, like the CLI's ``-s``. Raises ``UserError`` for a bad
    file; every python stage's callable must be importable from the pipeline's folder.
    """
    from arpipe.pipeline.config import load_pipeline
    from arpipe.pipeline.dag import build_graph
    from arpipe.pipeline.plan import Planner

    loaded = load_pipeline(str(path), list(overrides))
    graph = build_graph(loaded)
    planner = Planner(loaded, graph)
    for name in graph.order:
        planner.code_digest(name)
    return Pipeline(loaded, graph)


def _pipeline(pipeline: Pipeline | str | Path) -> Pipeline:
    return pipeline if isinstance(pipeline, Pipeline) else load(pipeline)


def plan(pipeline: Pipeline | str | Path, *, only: Sequence[str] = (), from_: str | None = None,
         until: str | None = None, force: Sequence[str] = ()) -> list[StagePlan]:
    """What ``arpipe run`` would do for each selected stage: ``run``, ``cached``, ``resume`` or ``blocked``."""
    from arpipe.pipeline.dag import select
    from arpipe.pipeline.plan import Planner

    pipe = _pipeline(pipeline)
    selection = select(pipe.graph, only=list(only), from_=from_, until=until, force=list(force))
    return Planner(pipe.loaded, pipe.graph).plan(selection)


def run(pipeline: Pipeline | str | Path, *, only: Sequence[str] = (), from_: str | None = None,
        until: str | None = None, force: Sequence[str] = (), address: str | None = None,
        tracking_uri: str | None = None, echo: Callable[[str], None] | None = print) -> RunResult:
    """Run the pipeline (finished stages are cache hits; interrupted ones resume), as ``arpipe run`` does.

    ``address`` is a Ray cluster (default: ``RAY_ADDRESS`` or an embedded local Ray);
    ``tracking_uri`` an MLflow server (default: SQLite beside the storage root). ``echo`` gets the
    progress lines the CLI prints; pass ``None`` for silence. Raises ``StageFailed`` when a stage fails.
    """
    from arpipe.pipeline.dag import select
    from arpipe.pipeline.runner import Runner

    pipe = _pipeline(pipeline)
    selection = select(pipe.graph, only=list(only), from_=from_, until=until, force=list(force))
    runner = Runner(pipe.loaded, pipe.graph, selection, address=address, tracking=tracking_uri,
                    echo=echo or (lambda _line: None))
    return runner.run()


def open_store(uri: str | Path, **options: Any) -> TokenStore:
    """Open a committed token store (a local folder or ``s3://...``); see ``TokenStore.open`` for options."""
    from arpipe.stages.store import TokenStore

    return TokenStore.open(str(uri), **options)


@dataclass(frozen=True)
class TrainedModel:
    """A generator a train stage wrote, loaded and ready to sample (what the sample stage runs per actor)."""

    opened: ModelFolder

    @property
    def modalities(self) -> list[str]:
        """The names ``sample`` takes: one per tokenizer the model was trained on."""
        return list(self.opened.tokenizers)

    def sample(self, modality: str | None = None, labels: Sequence[Any] = (None,), *, seed: int = 0,
               length: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               cfg_scale: float = 1.0, cfg_schedule: str = "constant", decode: bool = True,
               indices: Sequence[int] | None = None, prompts: Sequence[str | None] | None = None) -> list[np.ndarray]:
        """One sample per label (``None``: unconditional), decoded by the modality's tokenizer unless
        ``decode`` is off (then the local token ids, as the sample stage stores them). ``length`` is only for
        variable-length layouts (point clouds). Sample ``i`` (``indices``, default ``0..n-1``) is the same for a
        seed whatever else is asked with it: the sample stage's sample ``i`` with that ``seed``. ``prompts``:
        one text per label for a model trained on captions."""
        from arpipe.pipeline.errors import UserError
        from arpipe.stages.models import Prompt, SamplingOptions, generate

        names = [n for n, info in self.opened.tokenizers.items() if not info.get("prompt")]
        name = modality or (names[0] if len(names) == 1 else None)
        if name is None:
            raise UserError(f"the model has several modalities ({', '.join(names)})", where=self.opened.uri,
                            fix="pass modality=")
        layout = self.opened.tokenizers.get(name, {}).get("layout") or {}
        if length is None and not (layout.get("scales") or layout.get("grid")) and name in names:
            raise UserError(f"{name} samples have no fixed length", where=self.opened.uri, fix="pass length=")
        plan = self.opened.plan(name, length)
        options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                                  cfg_schedule=cfg_schedule)
        streams = None
        if prompts is not None and any(prompts):
            if "text" not in self.opened.tokenizers:
                raise UserError("prompts need a model trained on captions; this one was not",
                                where=self.opened.uri, fix="sample with labels only")
            text = self._tokenizer("text")
            encoded = text.encode_texts([p or "" for p in prompts])
            streams = [{"text": [int(t) for t in ids]} if p else None for p, ids in zip(prompts, encoded, strict=True)]
        prompt = Prompt.from_vocab(self.opened.vocab, name, list(labels), prompts=streams)
        gen = generate(self.opened.model, plan, prompt, options, seed=seed, sample_indices=indices)
        local = self.opened.vocab.to_local(name, gen.tokens.cpu()).numpy()
        if gen.lengths is not None:   # next_level: each sample's own tree
            local = [row[:int(n)] for row, n in zip(local, gen.lengths.tolist(), strict=True)]
        trim = getattr(self._tokenizer(name), "trim", None)
        rows = [trim(row) if trim else row for row in local]
        return rows if not decode else self.decode(name, rows)

    def decode(self, modality: str | None, tokens: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Local token ids (as :meth:`sample` gives them with ``decode=False``) decoded to arrays."""
        names = [n for n, info in self.opened.tokenizers.items() if not info.get("prompt")]
        return self._tokenizer(modality or names[0]).decode_arrays(list(tokens))

    def _tokenizer(self, name: str):
        from arpipe.stages.modalities import load_tokenizer

        cache = self.__dict__.setdefault("_tokenizers", {})
        if name not in cache:
            cache[name] = load_tokenizer(self.opened.tokenizers[name]["tokenizer_uri"])
        return cache[name]


def load_model(uri: str | Path, *, device: str = "cpu", weights: str | None = None) -> TrainedModel:
    """Load a train stage's model folder (local or ``s3://``) or an MLflow model (``models:/NAME@alias``,
    ``models:/NAME/VERSION``, ``models:/m-<id>``): weights (``weights``: ``"ema"`` or ``"raw"``; default the
    EMA weights when the model has them, as the sample stage), vocabulary, tokenizers."""
    from arpipe.pipeline.models import resolve_model
    from arpipe.stages.models.folder import open_model

    return TrainedModel(open_model(resolve_model(str(uri)).location, device=device, weights=weights))
