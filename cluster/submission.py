"""What ``arpipe submit`` sends to a cluster, and how it finds the run that the job started.

The job's ``working_dir`` is the user's project (the pipeline file's folder,
minus data, outputs, MLflow files and environments) and its entrypoint is
``arpipe run`` there, so the cluster's driver sees the same files, fingerprints
and cache as a local run. Each attempt names its run (``ARPIPE_RUN_ID``) and
says so in the job's metadata; the run's ledger in storage then tells which
MLflow run it opened, without reading the job's logs.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import re
import shlex
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arpipe.pipeline.config import LoadedPipeline
from arpipe.pipeline.errors import UserError

#: never uploaded: version control, environments, MLflow's local stores, data (read it from S3 on a cluster)
DEFAULT_EXCLUDES = (".git/", ".venv/", "venv/", "__pycache__/", "mlflow.db", "mlflow.db-*", "mlruns/", "/data/")
#: the run id the job's `arpipe run` takes (pipeline/runner.py reads it), one per attempt
RUN_ID_ENV = "ARPIPE_RUN_ID"


# -- the runtime_env ---------------------------------------------------------------

def project_excludes(project: Path, storage_dir: Path | None, extra: list[str]) -> list[str]:
    """Ray ``excludes`` (gitignore syntax, relative to the project): the defaults, the local storage folder, ``--exclude``."""
    excludes = list(DEFAULT_EXCLUDES)
    if storage_dir is not None:
        try:
            relative = storage_dir.resolve().relative_to(project.resolve())
        except ValueError:
            relative = None
        if relative is not None and str(relative) != ".":
            excludes.append(f"/{relative.as_posix()}/")
    return excludes + list(extra)


def env_from_flags(names: list[str], env: dict[str, str] | None = None) -> dict[str, str]:
    """``--env`` entries: ``NAME=VALUE``, ``NAME`` (this shell's value) or a glob such as ``AWS_*``."""
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    for entry in names:
        name, sep, value = entry.partition("=")
        if sep:
            out[name] = value
        elif any(c in name for c in "*?["):
            out.update({k: v for k, v in env.items() if fnmatch.fnmatchcase(k, name)})
        elif name in env:
            out[name] = env[name]
        else:
            raise UserError(f"{name} is not set in this shell", where=f"--env {entry}",
                            fix=f"export {name}=... first, or write --env {name}=VALUE")
    return out


def pip_packages(specs: list[str], base: Path) -> list[str]:
    """``--pip`` entries: requirement strings, or ``*.txt`` requirements files (read here: the cluster cannot see them)."""
    packages: list[str] = []
    for spec in specs:
        path = Path(spec) if Path(spec).is_absolute() else base / spec
        if spec.endswith(".txt"):
            try:
                lines = path.read_text().splitlines()
            except OSError as err:
                raise UserError(f"cannot read the requirements file: {err.strerror}", where=f"--pip {spec}") from None
            packages += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
        else:
            packages.append(spec)
    return packages


def runtime_env(project: Path, excludes: list[str], env_vars: dict[str, str], pip: list[str]) -> dict[str, Any]:
    """The job's runtime_env: the project as working_dir; pip packages on top of the image's environment if asked."""
    spec: dict[str, Any] = {"working_dir": str(project), "excludes": excludes, "env_vars": env_vars}
    if pip:
        spec["pip"] = {"packages": pip, "pip_check": False}
    return spec


def entrypoint(pipeline_rel: str, args: argparse.Namespace, storage_override: str | None) -> str:
    """The shell command the job runs on the cluster: ``python -m arpipe run FILE`` with the user's selection and
    overrides (``python -m``: a head whose PATH lacks the ``arpipe`` script, such as one started as
    ``.venv/bin/ray start`` without the environment activated, may still have a ``python`` that imports it;
    where it does not, the failed job's log says so and ``submit`` names the fix)."""
    argv = ["python", "-m", "arpipe", "run", pipeline_rel]
    for override in args.overrides:
        argv += ["-s", override]
    if storage_override:
        import yaml

        # `-s` values are YAML: a path that YAML would read as something else goes quoted
        value = storage_override if yaml.safe_load(storage_override) == storage_override else json.dumps(storage_override)
        argv += ["-s", f"storage={value}"]
    for flag, values in (("--only", args.only), ("--force", args.force)):
        for value in values:
            argv += [flag, value]
    if args.from_:
        argv += ["--from", args.from_]
    if args.until:
        argv += ["--until", args.until]
    return shlex.join(argv)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "pipeline"


# -- one submission ------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """One job of a submission: the first, or a retry."""

    submission_id: str
    run_id: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


@dataclass
class Prepared:
    """What one ``submit`` sends; every attempt of ``--retries`` sends the same but for its run id."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    base_id: str
    tracking_uri: str
    loaded: LoadedPipeline

    def attempt(self, number: int) -> Attempt:
        """The job for attempt ``number`` (0 first): its own submission id and run id."""
        submission_id = self.base_id if number == 0 else f"{self.base_id}-retry{number}"
        run_id = uuid.uuid4().hex[:12]
        env = {**self.runtime_env, "env_vars": {**self.runtime_env["env_vars"], RUN_ID_ENV: run_id}}
        metadata = {**self.metadata, "arpipe.attempt": str(number), "arpipe.run_id": run_id}
        return Attempt(submission_id, run_id, env, metadata)


def prepare(args: argparse.Namespace, url: str) -> Prepared:
    """Load and check the pipeline locally, then build what the cluster at ``url`` runs; UserError before any upload."""
    from arpipe.pipeline import __version__
    from arpipe.pipeline.config import load_pipeline
    from arpipe.pipeline.dag import build_graph
    from arpipe.pipeline.lineage import git_commit, tracking_uri
    from arpipe.pipeline.remote import check_cluster_ready
    from arpipe.pipeline.storage import is_s3, normalize

    loaded = load_pipeline(args.pipeline, args.overrides)
    build_graph(loaded)
    tracking = tracking_uri(args.tracking_uri)
    check_cluster_ready(loaded, url, tracking, args.allow_local_storage)
    project = Path(args.working_dir).resolve() if args.working_dir else loaded.directory
    try:
        pipeline_rel = loaded.path.relative_to(project).as_posix()
    except ValueError:
        raise UserError("the pipeline file is outside the uploaded project folder", where=str(loaded.path),
                        fix=f"pass --working-dir with a folder that contains it (now {project})") from None
    storage = loaded.spec.storage
    # a storage from `${env:...}` travels resolved: the job writes where this machine checked, whatever its env
    storage_override = storage if is_s3(storage) and ("storage",) in loaded.from_env else None
    storage_dir = None
    if not is_s3(storage):
        absolute = normalize(storage, loaded.directory)
        storage_dir = Path(absolute)
        # a relative folder would resolve inside the job's unpacked copy of the project and vanish with it
        if absolute != storage:
            storage_override = absolute
    env_vars = {"MLFLOW_TRACKING_URI": tracking, "PYTHONUNBUFFERED": "1", **env_from_flags(args.env)}
    if args.allow_local_storage:
        env_vars["ARPIPE_ALLOW_LOCAL_STORAGE"] = "1"
    commit = git_commit(loaded.directory)
    if commit:
        # the uploaded copy has no .git: the commit travels beside it, for the runs' lineage tags
        env_vars["ARPIPE_GIT_COMMIT"] = commit
    spec = runtime_env(project, project_excludes(project, storage_dir, args.exclude), env_vars,
                       pip_packages(args.pip, Path.cwd()))
    # where the job's run keeps its ledger, and which MLflow it logs to: `jobs status` finds its run from these
    metadata = {"arpipe.pipeline": loaded.spec.name, "arpipe.file": pipeline_rel, "arpipe.version": __version__,
                "arpipe.storage": normalize(storage_override or storage, loaded.directory),
                "arpipe.experiment": loaded.spec.experiment_name, "arpipe.tracking_uri": tracking}
    if commit:
        metadata["arpipe.git_commit"] = commit
    base_id = f"arpipe-{_slug(loaded.spec.name)}-{uuid.uuid4().hex[:8]}"
    return Prepared(entrypoint(pipeline_rel, args, storage_override), spec, metadata, base_id, tracking, loaded)


# -- the run a job started -------------------------------------------------------------

@dataclass(frozen=True)
class MlflowRun:
    """The parent MLflow run of the ``arpipe run`` a job started."""

    run_id: str
    experiment: str
    tracking_uri: str

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in experiment {self.experiment!r} ({self.tracking_uri})"


def recorded_run(metadata: dict[str, str] | None, search_mlflow: bool = True) -> MlflowRun | None:
    """The MLflow run of the job with this metadata, from its run's own records; None until it has one.

    First the pipeline's ledger in storage (cheap, and current while the job runs);
    once a later run of the same pipeline has replaced that ledger, the parent MLflow
    run itself, which carries the run id as its ``arpipe.run_id`` tag
    (``search_mlflow``). None for jobs ``arpipe submit`` did not send (no run id in
    their metadata), and when this machine can read neither record.
    """
    from arpipe.pipeline.ledger import read_ledger

    metadata = metadata or {}
    run_id, storage, pipeline = (metadata.get(key) for key in ("arpipe.run_id", "arpipe.storage", "arpipe.pipeline"))
    if not (run_id and storage and pipeline and run_id.isalnum()):
        return None
    experiment = metadata.get("arpipe.experiment", pipeline)
    tracking = metadata.get("arpipe.tracking_uri", "")
    try:
        ledger = read_ledger(storage, pipeline)
    except Exception:   # shown for information only: e.g. no credentials for the bucket here, say nothing
        ledger = None
    if ledger and ledger.get("run_id") == run_id:
        parent = ledger.get("mlflow_parent_run_id")
        return MlflowRun(parent, experiment, tracking) if parent else None
    if search_mlflow and tracking:
        parent = _parent_run_tagged(tracking, experiment, run_id)
        return MlflowRun(parent, experiment, tracking) if parent else None
    return None


def _parent_run_tagged(tracking: str, experiment: str, run_id: str) -> str | None:
    """The parent MLflow run tagged ``arpipe.run_id=run_id``; None when there is none or MLflow cannot say quickly."""
    if tracking.startswith("sqlite:///") and not Path(tracking.removeprefix("sqlite:///")).is_file():
        return None     # another machine's file: opening it here would create an empty store
    with _mlflow_fails_fast():
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking)
            found = client.get_experiment_by_name(experiment)
            runs = client.search_runs([found.experiment_id], filter_string=f"tags.`arpipe.run_id` = '{run_id}'",
                                      max_results=100) if found else []
        except Exception:   # shown for information only: an unreachable server must not fail `jobs status`
            return None
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    return parents[0].info.run_id if parents else None


@contextlib.contextmanager
def _mlflow_fails_fast() -> Iterator[None]:
    """MLflow retries an unreachable server for minutes by default; a status line is not worth the wait."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update({name: value for name, value in wanted.items() if saved[name] is None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
