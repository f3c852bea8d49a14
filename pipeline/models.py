"""Models by MLflow URI: ``models:/NAME@alias``, ``models:/NAME/VERSION`` and ``models:/m-<id>`` resolved to the
model folder they hold, logged models found by their weights, versions registered.

A train stage logs its model folder as an MLflow logged model with a ``python_function`` flavor (the folder
sits at ``data/model`` inside the artifact; :func:`pyfunc_folder` writes that layout). Stages that read a
model (``sample``, ``evaluate``, ``train``'s ``init_from``) accept such a URI wherever they take a folder:
:func:`resolve_model` turns it into a :class:`ModelRef` whose ``location`` is a local path or an s3:// URI
any Ray worker can read, and whose ``key`` (registered name, version and model id) goes into the stage's
fingerprint, so moving an alias to another version reruns what sampled the old one.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from arpipe.pipeline.errors import UserError
from arpipe.pipeline.storage import is_s3, join, storage_for

#: where the model folder sits inside the logged model's artifacts
DATA_PATH = "data/model"
#: the logged model's tag holding the weights' digest (how samples find the logged model they came from)
WEIGHTS_TAG = "arpipe.weights_digest"
FLAVOR = "arpipe"
_URI = re.compile(r"^models:/(?:(?P<model_id>m-[0-9a-f]+)|(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+)))/?$")


def is_model_uri(uri: str) -> bool:
    return uri.startswith("models:/")


@dataclass(frozen=True)
class ModelRef:
    """A model as a stage reads it: ``location`` holds the model folder (local path or s3://)."""

    uri: str                     # as the user wrote it
    location: str
    model_id: str | None = None  # the MLflow logged model
    name: str | None = None      # the registered model and version, when named through the registry
    version: str | None = None

    @property
    def key(self) -> str:
        """What identifies the weights behind the URI (a fingerprint part)."""
        return f"{self.name or ''}/{self.version or ''}:{self.model_id or self.location}"

    @property
    def registered(self) -> str | None:
        return f"{self.name}/{self.version}" if self.name else None


def _fix(uri: str) -> str:
    return ("register a version (`arpipe model register RUN_ID NAME --alias ALIAS`, or `register:` on the train "
            f"stage) or name one that exists (`{uri}` is read from the tracking store MLFLOW_TRACKING_URI names)")


def resolve_model(uri: str, tracking_uri: str | None = None, *, where: str | None = None) -> ModelRef:
    """The model folder behind ``uri``: itself for a path or s3:// URI; for ``models:/`` the logged model's
    artifact folder, downloaded to a local cache when its artifact store is neither local nor S3."""
    if not is_model_uri(uri):
        return ModelRef(uri=uri, location=uri)
    match = _URI.match(uri)
    if not match:
        raise UserError(f"{uri!r} is not a model URI arpipe reads", where=where,
                        fix="write models:/NAME@ALIAS, models:/NAME/VERSION or models:/m-<model id>")
    from mlflow.exceptions import MlflowException

    from arpipe.pipeline.lineage import tracking_uri as default_tracking

    client = _client(default_tracking(tracking_uri))
    name, version, model_id = match["name"], match["version"], match["model_id"]
    try:
        if match["alias"]:
            try:
                client.get_registered_model(name)
            except MlflowException:
                raise UserError(f"no registered model named {name!r}", where=where or uri, fix=_fix(uri)) from None
            try:
                found = client.get_model_version_by_alias(name, match["alias"])
            except MlflowException:
                aliases = sorted(client.get_registered_model(name).aliases)
                raise UserError(f"registered model {name!r} has no alias {match['alias']!r} (it has: "
                                f"{', '.join(aliases) or 'none'})", where=where or uri, fix=_fix(uri)) from None
        elif version:
            try:
                found = client.get_model_version(name, version)
            except MlflowException:
                raise UserError(f"registered model {name!r} has no version {version}", where=where or uri,
                                fix=_fix(uri)) from None
        if not model_id:
            version = found.version
            model_id = getattr(found, "model_id", None) or str(found.source).removeprefix("models:/")
        try:
            logged = client.get_logged_model(model_id)
        except MlflowException:
            raise UserError(f"no logged model {model_id}", where=where or uri, fix=_fix(uri)) from None
    except UserError:
        raise
    except MlflowException as err:
        raise UserError(f"the tracking store cannot answer for {uri} ({err.message})", where=where or uri,
                        fix="check MLFLOW_TRACKING_URI") from None
    location = _local_or_s3(logged.artifact_location, model_id)
    return ModelRef(uri=uri, location=join(location, DATA_PATH), model_id=model_id, name=name, version=version)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _local_or_s3(artifact_uri: str, model_id: str) -> str:
    """A location Ray workers read directly: a local path, an s3:// URI, else a download to a local cache."""
    if is_s3(artifact_uri):
        return artifact_uri
    parts = urlsplit(artifact_uri)
    if parts.scheme in ("", "file"):
        return unquote(parts.path)
    import mlflow.artifacts

    cache = Path(tempfile.gettempdir()) / "arpipe-models" / model_id
    if not (cache / DATA_PATH / "config.json").exists():
        mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(cache))
    return str(cache)


def pyfunc_folder(model_dir: str, out: str) -> None:
    """Write ``out`` as an MLflow model: the ``python_function`` flavor (``mlflow.pyfunc.load_model`` loads it
    through :mod:`arpipe.flavor`) with the model folder as its data, plus an ``arpipe`` flavor entry."""
    import mlflow.pyfunc
    from mlflow.models import Model

    import arpipe

    model = Model()
    model.add_flavor(FLAVOR, data=DATA_PATH, arpipe_version=arpipe.__version__)
    # model_config lists what `mlflow.pyfunc.load_model(uri, model_config=...)` may override: MLflow ignores
    # keys the logged model does not declare. "default": the EMA weights when the model has them, else raw
    mlflow.pyfunc.save_model(out, loader_module="arpipe.flavor", data_path=model_dir, mlflow_model=model,
                             pip_requirements=[f"arpipe=={arpipe.__version__}"], model_config={"weights": "default"})


def find_logged_model(client, experiment_ids: list[str], weights_digest: str) -> str | None:
    """The id of the logged model whose weights digest is ``weights_digest`` (newest first), or None."""
    found = client.search_logged_models(experiment_ids=experiment_ids,
                                        filter_string=f"tags.`{WEIGHTS_TAG}` = '{weights_digest}'",
                                        order_by=[{"field_name": "creation_time", "ascending": False}],
                                        max_results=1)
    return found[0].model_id if found else None


def weights_digest(folder: str) -> str | None:
    """The digest a model folder's ``config.json`` records for its weights (None when it records none)."""
    import json

    try:
        record = json.loads(storage_for(folder).read_text(join(folder, "config.json"))).get("files") or {}
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return (record.get("model.safetensors") or {}).get("digest")


def register_version(client, model_id: str, name: str, alias: str | None = None, *,
                     run_id: str | None = None):
    """Register the logged model as a new version of ``name`` (created when new), with ``alias``; returns
    the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    logged = client.get_logged_model(model_id)
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id or logged.source_run_id,
                                          model_id=model_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def logged_model_of(client, what: str) -> str:
    """The logged model id behind ``what``: ``models:/m-<id>``, the id itself, a train stage's MLflow run id,
    or a model folder (found by its weights' digest)."""
    from mlflow.exceptions import MlflowException

    if what.startswith("models:/m-") or what.startswith("m-"):
        return what.removeprefix("models:/")
    if not is_model_uri(what) and re.fullmatch(r"[0-9a-f]{32}", what):
        try:
            run = client.get_run(what)
        except MlflowException:
            raise UserError(f"no MLflow run {what}", where=what, fix="give a train stage's run id (arpipe status "
                            "shows it), a models:/m-<id> URI or a model folder") from None
        found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            filter_string=f"source_run_id = '{what}'", max_results=1)
        if not found:
            raise UserError(f"run {what} logged no model", where=what, fix="give a train stage's run id")
        return found[0].model_id
    if is_model_uri(what):
        return resolve_model(what).model_id
    digest = weights_digest(what)
    if digest is None:
        raise UserError("no model folder here (config.json with a weights record is missing)", where=what,
                        fix="give a train stage's model folder, its MLflow run id or a models:/m-<id> URI")
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = find_logged_model(client, experiments, digest)
    if found is None:
        raise UserError("no logged model in the tracking store has these weights", where=what,
                        fix="run the train stage with this tracking store, or point MLFLOW_TRACKING_URI at its")
    return found


def cmd_register(args) -> int:
    from arpipe.pipeline.lineage import tracking_uri

    client = _client(tracking_uri(args.tracking_uri))
    model_id = logged_model_of(client, args.model)
    version = register_version(client, model_id, args.name, args.alias)
    alias = f" with alias {args.alias!r}" if args.alias else ""
    print(f"registered {args.model} as {args.name} version {version.version}{alias}: "
          f"models:/{args.name}/{version.version}" + (f", models:/{args.name}@{args.alias}" if args.alias else ""))
    return 0


def register(subparsers) -> None:
    """``arpipe model register MODEL NAME [--alias ALIAS]``."""
    model = subparsers.add_parser("model", help="register trained models in the MLflow Model Registry")
    verbs = model.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("register", help="register a trained model as a new version of NAME")
    p.add_argument("model", help="a train stage's MLflow run id, a models:/m-<id> URI or a model folder")
    p.add_argument("name", help="the registered model's name")
    p.add_argument("--alias", help="point this alias (e.g. champion) at the new version")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                          "sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_register)
