"""Lineage in MLflow, written from one place: one parent run per ``arpipe run``, one nested run per stage.

Everything arpipe sends to MLflow goes through this module: the runner's parent and stage runs
(:class:`Lineage`), a stage's own metrics, tags, artifacts and logged models (:class:`RunLog`, which
``StageContext`` and the train loop's rank 0 use), and the run a ``python`` stage's user code logs to
with plain ``mlflow.log_metric`` (:func:`active_run`).

A stage that runs as a Ray task (a tokenizer's fit, evaluate) does not open MLflow itself: importing
it and opening the tracking store take ~3 s of CPU in each new worker, longer than many such stages
run. Its :class:`DeferredRunLog` keeps what the stage logs in a :class:`StageLog` that travels back
with the stage's outputs, and the driver, whose MLflow is open already, writes it
(:meth:`Lineage.write_log`) before it closes the stage's run. Workers then need no access to the
tracking server either.

Cache hits get a nested run too, tagged ``arpipe.cache=hit`` with the id of the run that produced
the output. Params are the flattened stage config with secrets redacted; inputs are the upstream
outputs with their content digests.

A run in which no stage ran (everything cached) does not wait for MLflow, whose import alone takes
longer than the whole run: it writes a :class:`RunRecord` (already redacted) to
``<storage>/.arpipe/lineage/pending/`` and a detached writer (``pipeline/lineage_queue.py``)
delivers it. A record stays pending until MLflow has all of it, so a writer that dies is replaced
by the next ``arpipe run``, ``plan`` or ``status``; delivery is idempotent (the parent run carries
the record's id, and a second delivery completes the first instead of starting another).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

try:
    import fcntl
except ImportError:   # Windows: no advisory locks; concurrent first runs there are on their own
    fcntl = None

from arpipe.pipeline import __version__
from arpipe.pipeline.config import flatten, redact, scrub
from arpipe.pipeline.storage import is_s3, user_cache

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: MLflow stores dataset digests in 36 characters; the full digest goes into the dataset profile
DATASET_DIGEST_CHARS = 32
PARAM_VALUE_MAX = 6000
#: MLflow takes at most this many metrics (and 100 params) per batch
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
#: the tag that ties a parent run to the record it was delivered from (idempotent delivery)
RECORD_TAG = "arpipe.lineage_record"


def tracking_uri(explicit: str | None = None) -> str:
    """``explicit``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; sqlite paths made absolute."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def git_commit(folder: Path) -> str | None:
    if os.environ.get("ARPIPE_GIT_COMMIT"):   # set by `arpipe submit`: .git is not uploaded to the cluster
        return os.environ["ARPIPE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def flatten_params(config: dict[str, Any]) -> dict[str, str]:
    """A stage's config as MLflow params: dotted names, JSON text values cut to MLflow's limit."""
    return {name: (value if isinstance(value, str) else json.dumps(value, default=str))[:PARAM_VALUE_MAX]
            for name, value in flatten(config).items()}


def now_ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------------------------------------- records


class InputRecord(BaseModel):
    """An upstream output a stage read: ``stage.output``, where it is, its content digest, its producer."""

    name: str
    uri: str
    digest: str
    run_id: str = ""


class StageRecord(BaseModel):
    """One nested run, complete: what MLflow is told about a stage (already redacted)."""

    name: str
    kind: str
    fingerprint: str
    params: dict[str, str]
    inputs: list[InputRecord] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    status: str = "FINISHED"
    start_ms: int
    end_ms: int


class RunRecord(BaseModel):
    """One ``arpipe run``'s lineage as data: its parent run and the stage runs that need no live stage.

    Everything in it is redacted before it is written; the writer that delivers it knows no secrets.
    """

    record_id: str
    #: None when the URI itself held a secret: the delivering process then uses its own
    tracking_uri: str | None
    experiment: str
    pipeline: str
    resolved_yaml: str
    tags: dict[str, str]
    start_ms: int
    end_ms: int | None = None
    status: str = "RUNNING"
    stages: list[StageRecord] = Field(default_factory=list)


def stage_record(name: str, kind: str, fingerprint: str, config: dict[str, Any], inputs: list[dict[str, str]],
                 tags: dict[str, str], secrets: set[str] | frozenset[str], *, status: str = "FINISHED",
                 start_ms: int | None = None, end_ms: int | None = None) -> StageRecord:
    """A stage's nested run as a record: params flattened and redacted, upstream runs as a tag."""
    upstream_runs = sorted({i["run_id"] for i in inputs if i.get("run_id")})
    tags = {"arpipe.stage": name, "arpipe.kind": kind, "arpipe.fingerprint": fingerprint,
            "arpipe.version": __version__, **tags}
    if upstream_runs:
        tags["arpipe.upstream_run_ids"] = ",".join(upstream_runs)
    started = start_ms or now_ms()
    return StageRecord(name=name, kind=kind, fingerprint=fingerprint,
                       params=flatten_params(redact(config, secrets)),
                       inputs=[InputRecord(**{k: scrub(str(v), secrets) for k, v in i.items()}) for i in inputs],
                       tags={k: scrub(v, secrets) for k, v in tags.items()}, status=status,
                       start_ms=started, end_ms=end_ms or started)


# ------------------------------------------------------------------------------------- the writer


@contextlib.contextmanager
def _first_open_lock(uri: str) -> Iterator[None]:
    """One process at a time opens a SQLite tracking file.

    The first open creates its tables by migrations; two runs starting together on a fresh file
    both migrate, and the loser's half-done migration leaves the file unusable for every later run.
    """
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not path or path.startswith(":memory:") or fcntl is None:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with file_lock(path + ".lock"):
        if not os.path.exists(path):
            _seed_sqlite(path)
        yield


def _seed_sqlite(path: str) -> None:
    """Start a new SQLite tracking file as a copy of an empty, migrated one kept in the user's cache.

    MLflow builds a new file by running every schema migration (2.7 s of CPU, on each new project's first
    run); the copy takes milliseconds. The template is built by MLflow's own table set-up, once per MLflow
    version, and holds no experiment: MLflow adds its Default experiment (with this project's artifact
    location) when it first opens the copy, as it does for a file it built itself. Anything unexpected
    leaves the path untouched, and MLflow builds the file as before.
    """
    import mlflow

    template = user_cache(f"mlflow-{mlflow.__version__}-empty.db")
    building, copying = template.with_name(f".{template.name}.{os.getpid()}.tmp"), Path(f"{path}.{os.getpid()}.tmp")
    try:
        if not template.is_file():
            import sqlalchemy
            from mlflow.store.db.utils import _initialize_tables

            template.parent.mkdir(parents=True, exist_ok=True)
            engine = sqlalchemy.create_engine(f"sqlite:///{building}")
            try:
                _initialize_tables(engine)
            finally:
                engine.dispose()
            os.replace(building, template)   # whole or absent: two first runs may both build it
        shutil.copyfile(template, copying)
        os.replace(copying, path)
    except Exception:   # an MLflow whose internals moved, an unwritable cache: MLflow builds the file itself
        building.unlink(missing_ok=True)
        copying.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C during the block takes effect when it ends (in the main thread, where Python raises it).

    A KeyboardInterrupt raised inside SQLAlchemy's transaction handling makes it log the interrupted
    transaction's traceback on stderr ("Exception during reset or similar"), and leaves a run half-written.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield          # another thread, Ctrl-C ignored or already deferred by an enclosing block
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt


def _whole(write):
    """A write to the tracking store, never cut in the middle by Ctrl-C (:func:`interrupts_deferred`)."""
    @functools.wraps(write)
    def wrapper(*args, **kwargs):
        with interrupts_deferred():
            return write(*args, **kwargs)
    return wrapper


class Lineage:
    """Writes runs through MlflowClient with explicit run ids (no global active run).

    Each write is whole: Ctrl-C takes effect after it (:func:`interrupts_deferred`)."""

    def __init__(self, uri: str, experiment: str, secrets: set[str] = frozenset()):
        self.uri = uri
        self.secrets = set(secrets)
        with _first_open_lock(uri):
            self.client = _client(uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def scrub(self, text: str) -> str:
        return scrub(text, self.secrets)

    @_whole
    def start_parent(self, pipeline: str, resolved_yaml: str, tags: dict[str, str],
                     start_ms: int | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=pipeline, start_time=start_ms, tags={
            "arpipe.pipeline": pipeline, "arpipe.version": __version__, **tags})
        self.client.log_text(run.info.run_id, self.scrub(resolved_yaml), "pipeline.yaml")
        return run.info.run_id

    @_whole
    def start_stage(self, parent_id: str, name: str, kind: str, fingerprint: str, config: dict[str, Any],
                    inputs: list[dict[str, str]], tags: dict[str, str]) -> str:
        """A live stage's nested run, left RUNNING for the stage to log into."""
        record = stage_record(name, kind, fingerprint, config, inputs, tags, self.secrets)
        return self._create_stage(parent_id, record)

    @_whole
    def write_stage(self, parent_id: str, record: StageRecord) -> str:
        """A stage run that is complete as recorded (a cache hit): created and terminated."""
        run_id = self._create_stage(parent_id, record)
        self.client.set_terminated(run_id, record.status, end_time=record.end_ms)
        return run_id

    def _create_stage(self, parent_id: str, record: StageRecord) -> str:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Param

        run = self.client.create_run(self.experiment_id, run_name=record.name, start_time=record.start_ms,
                                     tags={"mlflow.parentRunId": parent_id, **record.tags})
        run_id = run.info.run_id
        items = [Param(k[:250], v) for k, v in record.params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + PARAMS_PER_BATCH])
        if record.inputs:
            datasets = [DatasetInput(Dataset(
                name=item.name, digest=item.digest[:DATASET_DIGEST_CHARS],
                source_type="s3" if is_s3(item.uri) else "local",
                source=json.dumps({"uri": item.uri}), schema=None,
                profile=json.dumps({"digest": item.digest, "producer_run_id": item.run_id or None})),
                tags=[InputTag("mlflow.data.context", "input")]) for item in record.inputs]
            self.client.log_inputs(run_id, datasets=datasets)
        return run_id

    @_whole
    def finish_stage(self, run_id: str, status: str, outputs_json: str | None = None,
                     error: str | None = None) -> None:
        if outputs_json is not None:
            self.client.log_text(run_id, outputs_json, "outputs.json")
        if error:
            self.client.set_tag(run_id, "arpipe.error", self.scrub(error)[:4000])
        self.client.set_terminated(run_id, status, end_time=now_ms())

    @_whole
    def write_log(self, run_id: str, log: StageLog) -> None:
        """What a stage on a Ray task logged (:class:`DeferredRunLog`), written to its run as it would have."""
        import tempfile

        from mlflow.entities import Metric, RunTag

        metrics = linked(self.client, [Metric(key, value, stamp, step) for key, value, stamp, step in log.metrics],
                         log.model_id)
        for lo in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[lo:lo + METRICS_PER_BATCH])
        if log.tags:
            self.client.log_batch(run_id, tags=[RunTag(k, self.scrub(v)) for k, v in log.tags.items()])
        for table in log.tables:
            self.client.log_table(run_id, table.columns, artifact_file=table.artifact_file)
        if log.artifacts:
            with tempfile.TemporaryDirectory(prefix="arpipe-artifacts-") as folder:
                for i, item in enumerate(log.artifacts):   # a folder each: two files may share a name
                    path = Path(folder) / str(i) / item.name
                    path.parent.mkdir()
                    path.write_bytes(item.data)
                    self.client.log_artifact(run_id, str(path), item.artifact_path)

    @_whole
    def log_file(self, run_id: str, path: str | os.PathLike, artifact_file: str) -> None:
        """A text file (a stage's console log) as the run's artifact, the pipeline's secrets scrubbed."""
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        self.client.log_text(run_id, self.scrub(text), artifact_file)

    @_whole
    def finish_parent(self, run_id: str, status: str, end_ms: int | None = None) -> None:
        self.client.set_terminated(run_id, status, end_time=end_ms or now_ms())

    @_whole
    def deliver(self, record: RunRecord) -> dict[str, str]:
        """Write ``record`` to MLflow; returns ``{"": parent_run_id, stage: run_id, ...}``.

        Idempotent: a parent already carrying the record's id is completed, not duplicated (a stage
        run cut off half-written is replaced). The parent is terminated last, and only when the
        record has ended: a record of a run still going leaves it RUNNING for the runner.
        """
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RECORD_TAG}` = '{record.record_id}'")
        parents = sorted((r for r in found if "mlflow.parentRunId" not in r.data.tags),
                         key=lambda r: r.info.start_time)
        ids: dict[str, str] = {}
        if parents:
            parent = parents[0].info.run_id
            for child in self.client.search_runs(
                    [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
                stage = child.data.tags.get("arpipe.stage")
                if child.info.status == "RUNNING" and any(s.name == stage for s in record.stages):
                    self.client.delete_run(child.info.run_id)   # cut off while being written
                elif stage:
                    ids[stage] = child.info.run_id
        else:
            parent = self.start_parent(record.pipeline, record.resolved_yaml,
                                       {**record.tags, RECORD_TAG: record.record_id}, record.start_ms)
        for stage in record.stages:
            if stage.name not in ids:
                ids[stage.name] = self.write_stage(parent, stage)
        if record.end_ms is not None:
            self.finish_parent(parent, record.status, record.end_ms)
        return {"": parent, **ids}


# ------------------------------------------------------------------------- a stage's own run


class LoggedFile(BaseModel):
    """A file a stage logged as an artifact, carried by content (the task's folder may be on another node)."""

    name: str
    artifact_path: str | None = None
    data: bytes


class LoggedTable(BaseModel):
    """A table a stage logged (``MlflowClient.log_table``), by column."""

    columns: dict[str, list[Any]]
    artifact_file: str


def linked(client, metrics: list, model_id: str | None) -> list:
    """``metrics`` as logged to the logged model ``model_id`` too: one value per (key, timestamp, step), which
    MLflow keys a model's metrics by; unlinked when the tracking store does not know the model (samples drawn
    under another tracking store), so linking never fails a stage."""
    if model_id is None or not metrics:
        return metrics
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    try:
        client.get_logged_model(model_id)
    except MlflowException:
        return metrics
    last = {(m.key, m.timestamp, m.step): m for m in metrics}
    return [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in last.values()]


class StageLog(BaseModel):
    """What a stage on a Ray task logged to its run, for the driver to write (:meth:`Lineage.write_log`)."""

    #: (key, value, timestamp in ms, step), in the order logged
    metrics: list[tuple[str, float, int, int]] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    artifacts: list[LoggedFile] = Field(default_factory=list)
    tables: list[LoggedTable] = Field(default_factory=list)
    #: the logged model the metrics are also logged to (:meth:`RunLog.link_model`)
    model_id: str | None = None

    def __bool__(self) -> bool:
        return bool(self.metrics or self.tags or self.artifacts or self.tables)


class RunLog:
    """One stage's MLflow run, as stages see it: metrics, tags, artifacts, tables, logged models.

    ``run_id=None`` (lineage off, or a rank other than 0) makes every call a no-op, so callers
    never branch on it. MLflow is imported on first use.
    """

    #: buffered metrics reach the tracking store at least this often (and at 200 values), so the UI lags
    #: a running stage by seconds, not by hundreds of steps
    FLUSH_EVERY_S = 10.0

    def __init__(self, uri: str | None, run_id: str | None):
        self.uri, self.run_id = uri, run_id
        self._client = None
        self._buffer: list = []
        self._flushed = time.monotonic()
        self._system = None
        self.model_id: str | None = None

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.buffer_metrics(metrics, step or 0)
        self.flush()

    def buffer_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        """Metrics kept until :meth:`flush`, 200 of them or :attr:`FLUSH_EVERY_S`: few writes to the
        tracking store, and none older than that."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        stamp = now_ms()
        self._buffer += [Metric(k, float(v), stamp, step) for k, v in metrics.items() if v is not None]
        if len(self._buffer) >= 200 or time.monotonic() - self._flushed >= self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self._flushed = time.monotonic()
        if self.enabled and self._buffer:
            self._buffer = linked(self.client, self._buffer, self.model_id)
            for lo in range(0, len(self._buffer), METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=self._buffer[lo:lo + METRICS_PER_BATCH])
            self._buffer = []

    def watch_system(self, resumed: bool = False):
        """MLflow's system metrics (CPU, memory, disk, network; GPU where NVIDIA's or AMD's library is found)
        sampled on this machine into the run, ``system/...`` every 10 s (``MLFLOW_SYSTEM_METRICS_*``
        variables tune it) until :meth:`stop_watching`; a resumed run continues their steps."""
        if not self.enabled:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.client.tracking_uri)
        self._system.start()

    def stop_watching(self) -> None:
        if self._system is not None:
            self._system.finish()
            self._system = None

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_table(self, columns: dict[str, list[Any]], artifact_file: str) -> None:
        if self.enabled:
            self.client.log_table(self.run_id, columns, artifact_file=artifact_file)

    def metrics(self) -> dict[str, float]:
        """The latest value of every metric logged to the run so far."""
        return dict(self.client.get_run(self.run_id).data.metrics) if self.enabled else {}

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every value of ``key``."""
        if not self.enabled:
            return []
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def log_model(self, folder: str | os.PathLike, *, name: str, params: dict[str, str], tags: dict[str, str],
                  model_type: str) -> str | None:
        """The model folder ``folder`` as an MLflow logged model linked to this run, with a ``python_function``
        flavor (``mlflow.pyfunc.load_model`` works on it) and its weights' digest as a tag; returns its id."""
        if not self.enabled:
            return None
        import tempfile

        from arpipe.pipeline.models import WEIGHTS_TAG, pyfunc_folder, weights_digest

        experiment = self.client.get_run(self.run_id).info.experiment_id
        digest = weights_digest(str(folder))
        model = self.client.create_logged_model(experiment, name=name, source_run_id=self.run_id, params=params,
                                                tags={**tags, **({WEIGHTS_TAG: digest} if digest else {})},
                                                model_type=model_type)
        with tempfile.TemporaryDirectory(prefix="arpipe-mlmodel-") as tmp:
            pyfunc_folder(str(folder), str(Path(tmp) / "mlmodel"))
            self.client.log_model_artifacts(model.model_id, str(Path(tmp) / "mlmodel"))
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def link_model(self, model_id: str | None) -> None:
        """Metrics logged from now on are also the logged model ``model_id``'s (shown on its MLflow page)."""
        self.model_id = model_id

    def register_model(self, model_id: str | None, name: str, alias: str | None = None) -> str | None:
        """Register the logged model as a new version of ``name`` (moving ``alias`` to it); returns the version."""
        if not self.enabled or model_id is None:
            return None
        from arpipe.pipeline.models import register_version

        version = register_version(self.client, model_id, name, alias, run_id=self.run_id).version
        self.set_tag("arpipe.registered_model", f"{name}/{version}")
        return str(version)

    def find_model(self, weights_digest: str | None) -> str | None:
        """The logged model (in this run's experiment) whose weights have ``weights_digest``, or None."""
        if not self.enabled or not weights_digest:
            return None
        from arpipe.pipeline.models import find_logged_model

        experiment = self.client.get_run(self.run_id).info.experiment_id
        return find_logged_model(self.client, [experiment], weights_digest)

    def use_model(self, model_id: str | None, registered: str | None = None, *, role: str = "model") -> None:
        """Record that this run read the logged model ``model_id`` (an MLflow model input, and tags naming
        it and the registered version ``NAME/VERSION`` it was named by); a ``role`` other than ``model`` (a
        sample stage's ``refiner``) prefixes the tags: ``arpipe.refiner_model_id``."""
        if not self.enabled or model_id is None:
            return
        from mlflow.entities import LoggedModelInput

        prefix = "" if role == "model" else f"{role}_"
        self.client.log_inputs(self.run_id, models=[LoggedModelInput(model_id)])
        self.set_tag(f"arpipe.{prefix}model_id", model_id)
        if registered:
            self.set_tag(f"arpipe.{prefix}registered_model", registered)


class DeferredRunLog(RunLog):
    """A :class:`RunLog` that never opens MLflow: what the stage logs is kept in :attr:`record` (a
    :class:`StageLog`) for the driver to write. Reads answer from what was logged here; a logged model
    needs the live run (a stage kind that logs one runs in the driver, ``placement = "driver"``)."""

    def __init__(self, run_id: str | None):
        super().__init__(None, run_id)
        self.record = StageLog()

    @property
    def client(self):
        raise RuntimeError("a stage on a Ray task does not open MLflow; its log goes back to the driver")

    def buffer_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        if self.enabled:
            stamp = now_ms()
            self.record.metrics += [(k, float(v), stamp, step) for k, v in metrics.items() if v is not None]

    def flush(self) -> None:
        pass

    def link_model(self, model_id: str | None) -> None:
        self.record.model_id = model_id

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.record.tags[key] = value

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled:
            path = Path(local_path)
            self.record.artifacts.append(LoggedFile(name=path.name, artifact_path=artifact_path,
                                                    data=path.read_bytes()))

    def log_table(self, columns: dict[str, list[Any]], artifact_file: str) -> None:
        if self.enabled:
            self.record.tables.append(LoggedTable(columns=columns, artifact_file=artifact_file))

    def metrics(self) -> dict[str, float]:
        return {key: value for key, value, _stamp, _step in self.record.metrics}

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(step, value) for k, value, _stamp, step in self.record.metrics if k == key]

    def log_model(self, folder: str | os.PathLike, *, name: str, params: dict[str, str], tags: dict[str, str],
                  model_type: str) -> str | None:
        if not self.enabled:
            return None
        raise RuntimeError(f"logging the model {name!r} needs the stage's live MLflow run: a stage kind that "
                           "logs models runs in the driver (placement = 'driver')")


@contextlib.contextmanager
def active_run(uri: str | None, run_id: str | None) -> Iterator[None]:
    """User code inside runs with ``run_id`` as MLflow's active run: plain ``mlflow.log_metric`` lands there.

    MLflow's fluent API resumes the run named by ``MLFLOW_RUN_ID``. A Ray worker lives on after the
    task, so the run user code left active is ended here; otherwise the worker's next task would
    log into this stage's run. (The runner sets the run's final status afterwards.)
    """
    if run_id is None:
        yield
        return
    env = {"MLFLOW_RUN_ID": run_id, **({"MLFLOW_TRACKING_URI": uri} if uri else {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        if "mlflow" in sys.modules:   # user code imported it; otherwise there is nothing to end
            import mlflow

            while mlflow.active_run() is not None:
                mlflow.end_run()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
