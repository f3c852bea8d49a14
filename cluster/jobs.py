"""``arpipe submit`` and ``arpipe jobs``: a pipeline run as a Ray job on a cluster.

``submit`` uploads the user's project (the pipeline file's folder, minus data,
outputs, MLflow files and environments) as the job's ``working_dir`` and runs
``arpipe run`` there, so the cluster's driver sees the same files, fingerprints
and cache as a local run. A failed job resubmitted with ``--retries`` resumes
through that cache. Everything goes through Ray's public Jobs API
(``JobSubmissionClient``), so ``ray job ...`` and the dashboard see the same jobs.

Every problem a user can fix (address, reachability, token, pipeline file)
is one :class:`UserError` line with the fix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from arpipe.pipeline.errors import ArpipeError, UserError

if TYPE_CHECKING:
    from arpipe.pipeline.config import LoadedPipeline

DASHBOARD_PORT = 8265
#: the ports of a Ray head that are not the Jobs API, to say so when someone points at them
OTHER_RAY_PORTS = {6379: "the GCS port", 10001: "the Ray Client port"}
#: never uploaded: version control, environments, MLflow's local stores, data (read it from S3 on a cluster)
DEFAULT_EXCLUDES = (".git/", ".venv/", "venv/", "__pycache__/", "mlflow.db", "mlflow.db-*", "mlruns/", "/data/")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
MLFLOW_LINE = re.compile(r"MLflow run (?P<run>[0-9a-f]{8,}) in experiment (?P<experiment>.+?) \((?P<uri>[^()]*)\)\s*$",
                         re.MULTILINE)
TOKEN_FIX = ("get the cluster's token (on the head: `ray get-auth-token`; on KubeRay: its Secret) and "
             "export RAY_AUTH_TOKEN=..., or save it to ~/.ray/auth_token or a file named by RAY_AUTH_TOKEN_PATH")


class JobFailed(ArpipeError):
    """The Ray job ran and did not succeed (its logs say why): exit code 1."""

    exit_code = 1


# -- address, token, client ------------------------------------------------------

def dashboard_address(address: str | None) -> str:
    """The Jobs API URL (``http(s)://host:port``) from ``--address`` or the environment, checked for shape.

    The Jobs API is served by the dashboard (port 8265), not by the GCS (6379) or
    Ray Client (10001) ports, which are the usual mix-ups.
    """
    given = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not given and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        given = os.environ["RAY_ADDRESS"]
    if not given:
        raise UserError("no Ray cluster address", where="--address",
                        fix="pass --address http://HEAD:8265 (the dashboard) or export RAY_API_SERVER_ADDRESS")
    text = given.strip().rstrip("/")
    if "://" not in text:
        # a bare HEAD or HEAD:PORT is the dashboard over http, on its default port unless given
        text = f"http://{text}"
        if not _port_text(text):
            text = f"{text}:{DASHBOARD_PORT}"
    scheme = text.split("://", 1)[0].lower()
    if scheme == "ray":
        raise UserError(f"{given} is a Ray Client address; jobs are submitted to the dashboard", where="--address",
                        fix=f"use http://{address_host_port(text)[0]}:{DASHBOARD_PORT}")
    if scheme not in ("http", "https"):
        raise UserError(f"bad address {given!r}: the scheme must be http or https", where="--address",
                        fix="write it as http://HEAD:8265")
    host, port = address_host_port(text)
    if not host or port is None:
        raise UserError(f"bad address {given!r}", where="--address", fix="write it as http://HEAD:8265")
    explicit = f":{port}" if _port_text(text) else ""
    path = urlsplit(text).path.rstrip("/")
    return f"{scheme}://{_bracket(host)}{explicit}{path}"


def _port_text(url: str) -> str:
    """What follows the host in the URL's authority (``"8265"``, ``"abc"``, or ``""`` when there is no port)."""
    authority = urlsplit(url).netloc.rsplit("@", 1)[-1]
    after_host = authority[authority.rfind("]") + 1:]       # past an [IPv6] literal's colons
    _, colon, port = after_host.rpartition(":")
    return port if colon else ""


def address_host_port(url: str) -> tuple[str, int | None]:
    """Host and port of a URL (the scheme's default port when none is written); port None when it is not a number."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return urlsplit(url).hostname or "", None
    if port is None:
        port = 443 if parts.scheme.lower() == "https" else 80
    return parts.hostname or "", port


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Token:
    value: str
    source: str


def read_auth_token(env: dict[str, str] | None = None) -> Token | None:
    """The cluster token, found where Ray's own clients look: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``.

    Ray 2.60's ``JobSubmissionClient`` attaches the token only when this process
    itself runs with ``RAY_AUTH_MODE=token``; reading it here and sending it
    explicitly lets ``arpipe submit`` reach a token cluster whatever the local mode.
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as err:
            raise UserError(f"cannot read the Ray token file: {err.strerror}", where=f"RAY_AUTH_TOKEN_PATH={path}",
                            fix="point RAY_AUTH_TOKEN_PATH at the file holding the cluster's token, or unset it") from None
        if not value:
            raise UserError("the Ray token file is empty", where=f"RAY_AUTH_TOKEN_PATH={path}", fix=TOKEN_FIX)
        return Token(value, f"RAY_AUTH_TOKEN_PATH={path}")
    home = env.get("HOME")
    default = (Path(home) if home else Path.home()) / ".ray" / "auth_token"
    try:
        value = default.read_text().strip()
    except OSError:
        return None
    return Token(value, str(default)) if value else None


def _probe(url: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line, when nothing listens there (requests would hang for minutes on a dropped SYN)."""
    host, port = address_host_port(url)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except socket.gaierror:
        raise UserError(f"cannot resolve the host {host!r}", where=url,
                        fix="check the name, or use the head's IP address") from None
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err)).lower()
        raise UserError(f"cannot reach the Ray dashboard ({reason})", where=url,
                        fix="check that the head is up and its dashboard port is reachable from here "
                            "(KubeRay: kubectl port-forward svc/HEAD-SERVICE 8265:8265)") from None


@contextlib.contextmanager
def jobs_api(url: str, token: Token | None, connecting: bool = False) -> Iterator[None]:
    """Turn what Ray's Jobs API raises into one-line :class:`UserError`\\ s naming the fix.

    ``connecting``: the port already accepted a TCP connection, so a connection
    error now means something other than a dashboard listens there.
    """
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        if token is None:
            raise UserError("the Ray cluster requires an authentication token and none was found "
                            "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)", where=url,
                            fix=TOKEN_FIX) from None
        if "403" in str(err) or "invalid" in str(err).lower():
            raise UserError(f"the Ray cluster rejected the token from {token.source}", where=url,
                            fix=TOKEN_FIX) from None
        raise UserError(f"authentication failed: {_first_line(str(err))}", where=url, fix=TOKEN_FIX) from None
    except (ConnectionError, requests.exceptions.ConnectionError) as err:
        if connecting:
            raise UserError("something listens there but does not answer like a Ray dashboard", where=url,
                            fix=_port_hint(url)) from None
        raise UserError(f"lost the connection to the Ray dashboard: {_first_line(str(err))}", where=url,
                        fix="check that the head is still up") from None
    except requests.exceptions.RequestException as err:
        raise UserError(f"this does not answer like a Ray dashboard: {_first_line(str(err))}", where=url,
                        fix=_port_hint(url)) from None
    except ValueError as err:
        if "Package size" in str(err):
            raise UserError(f"the project is too big to upload: {_first_line(str(err)).split('. ')[0]}",
                            where=url, fix="leave large folders out with --exclude (or .gitignore/.rayignore) "
                                           "and read data from S3") from None
        raise UserError(f"Ray refused the job: {_first_line(str(err))}", where=url) from None
    except RuntimeError as err:
        text = str(err)
        missing = re.search(r"Job (\S+) does not exist", text)
        if "404" in text and missing:
            raise UserError(f"no job {missing.group(1)} on this cluster", where=url,
                            fix=f"list them with `arpipe jobs list --address {url}`") from None
        if "Version check returned 404" in text:
            raise UserError("this answers HTTP but is not a Ray dashboard", where=url, fix=_port_hint(url)) from None
        raise UserError(f"the Ray Jobs API said: {_first_line(text)}", where=url) from None


def _port_hint(url: str) -> str:
    _host, port = address_host_port(url)
    other = OTHER_RAY_PORTS.get(port or 0)
    prefix = f"{port} is {other}; " if other else ""
    return f"{prefix}the Jobs API is on the dashboard port ({DASHBOARD_PORT} unless the head set --dashboard-port)"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text.strip()


@contextlib.contextmanager
def _address_for_ray(url: str) -> Iterator[None]:
    """Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address argument; ``--address`` must win."""
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def connect(address: str | None) -> tuple[Any, str, Token | None]:
    """A checked ``JobSubmissionClient`` for the cluster at ``address``: (client, dashboard URL, token used)."""
    url = dashboard_address(address)
    token = read_auth_token()
    _probe(url)
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        # their INFO lines ("Uploading package ...", "WebSocket closed") would interleave with the job's own logs
        logging.getLogger(name).setLevel(logging.WARNING)
    with jobs_api(url, token, connecting=True), _address_for_ray(url):
        client = JobSubmissionClient(url, headers=headers)
    return client, url, token


def cluster_node_ips(url: str, token: Token | None) -> list[str]:
    """IPs of the cluster's alive nodes, from Ray's State API; empty when it cannot say (then the address decides)."""
    import requests

    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    params = {"limit": 1000, "detail": "false", "filter_keys": "state", "filter_predicates": "=",
              "filter_values": "ALIVE"}
    try:
        reply = requests.get(f"{url}/api/v0/nodes", params=params, headers=headers, timeout=10)
        reply.raise_for_status()
        nodes = reply.json()["data"]["result"]["result"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return []
    return [node["node_ip"] for node in nodes if node.get("node_ip")]


# -- what is submitted -------------------------------------------------------------

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


def forwarded_env(names: list[str], env: dict[str, str] | None = None) -> dict[str, str]:
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
    """The shell command the job runs on the cluster: ``arpipe run FILE`` with the user's selection and overrides."""
    argv = ["arpipe", "run", pipeline_rel]
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


def parse_mlflow_run(logs: str) -> dict[str, str] | None:
    """The parent MLflow run that ``arpipe run`` announced in the job's logs (the last one, after retries)."""
    found = list(MLFLOW_LINE.finditer(logs))
    if not found:
        return None
    match = found[-1]
    experiment = match.group("experiment").strip()
    if len(experiment) >= 2 and experiment[0] == experiment[-1] and experiment[0] in "'\"":
        experiment = experiment[1:-1]
    return {"run_id": match.group("run"), "experiment": experiment, "tracking_uri": match.group("uri")}


def job_url(url: str, submission_id: str) -> str:
    return f"{url}/#/jobs/{submission_id}"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "pipeline"


# -- submit ----------------------------------------------------------------------------

@dataclass
class Prepared:
    """What one ``submit`` sends; every attempt of ``--retries`` sends the same."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    base_id: str
    tracking_uri: str
    loaded: LoadedPipeline


def prepare(args: argparse.Namespace, url: str) -> Prepared:
    """Load and check the pipeline locally, then build what the cluster at ``url`` runs; UserError before any upload."""
    from arpipe.cluster.sanity import check_cluster_ready
    from arpipe.pipeline import __version__
    from arpipe.pipeline.config import load_pipeline
    from arpipe.pipeline.dag import build_graph
    from arpipe.pipeline.lineage import git_commit, tracking_uri
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
    # a storage from `${env:...}` travels resolved: the job writes where this machine checked, whatever its env
    env_storage = re.search(r"^storage:.*\$\{env:", loaded.path.read_text(), re.M) is not None
    storage_override = loaded.spec.storage if is_s3(loaded.spec.storage) and env_storage else None
    storage_dir = None
    if not is_s3(loaded.spec.storage):
        absolute = normalize(loaded.spec.storage, loaded.directory)
        storage_dir = Path(absolute)
        # a relative folder would resolve inside the job's unpacked copy of the project and vanish with it
        if absolute != loaded.spec.storage:
            storage_override = absolute
    env_vars = {"MLFLOW_TRACKING_URI": tracking, "PYTHONUNBUFFERED": "1",
                **forwarded_env(args.env)}
    if args.allow_local_storage:
        env_vars["ARPIPE_ALLOW_LOCAL_STORAGE"] = "1"
    commit = git_commit(loaded.directory)
    if commit:
        # the uploaded copy has no .git: the commit travels beside it, for the runs' lineage tags
        env_vars["ARPIPE_GIT_COMMIT"] = commit
    spec = runtime_env(project, project_excludes(project, storage_dir, args.exclude), env_vars,
                       pip_packages(args.pip, Path.cwd()))
    metadata = {"arpipe.pipeline": loaded.spec.name, "arpipe.file": pipeline_rel, "arpipe.version": __version__}
    if commit:
        metadata["arpipe.git_commit"] = commit
    base_id = f"arpipe-{_slug(loaded.spec.name)}-{uuid.uuid4().hex[:8]}"
    return Prepared(entrypoint(pipeline_rel, args, storage_override), spec, metadata, base_id, tracking, loaded)


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit; with --wait/--follow/--retries also wait, follow and resubmit failed attempts."""
    if args.retries < 0:
        raise UserError("--retries must be 0 or more", where=f"--retries {args.retries}")
    prepared = prepare(args, dashboard_address(args.address))
    client, url, token = connect(args.address)
    if not args.allow_local_storage:
        from arpipe.cluster.sanity import check_cluster_ready

        check_cluster_ready(prepared.loaded, url, prepared.tracking_uri, False, node_ips=cluster_node_ips(url, token))
    wait = args.wait or args.follow or args.retries > 0
    for attempt in range(args.retries + 1):
        submission_id = prepared.base_id if attempt == 0 else f"{prepared.base_id}-retry{attempt}"
        with jobs_api(url, token):
            client.submit_job(entrypoint=prepared.entrypoint, runtime_env=prepared.runtime_env,
                              metadata={**prepared.metadata, "arpipe.attempt": str(attempt)},
                              submission_id=submission_id)
        print(f"submitted {submission_id} to {url}" + (f" (retry {attempt} of {args.retries})" if attempt else ""),
              flush=True)
        print(f"  dashboard: {job_url(url, submission_id)}", flush=True)
        print(f"  runs: {prepared.entrypoint}", flush=True)
        if attempt == 0:
            print(f"  uploaded: {prepared.runtime_env['working_dir']} (as the job's working_dir)", flush=True)
        if not wait:
            print(f"  follow it: arpipe jobs logs {submission_id} --follow --address {url}", flush=True)
            return 0
        try:
            status, mlflow_run = wait_for(client, url, token, submission_id, follow=args.follow)
        except KeyboardInterrupt:
            print(f"arpipe: stopped waiting; {submission_id} keeps running "
                  f"(arpipe jobs stop {submission_id} --address {url})", file=sys.stderr)
            return 130
        if status == "SUCCEEDED":
            print(f"{submission_id} SUCCEEDED" + _mlflow_suffix(mlflow_run), flush=True)
            return 0
        if status == "STOPPED" or attempt == args.retries:
            break
        print(f"{submission_id} {status}; resubmitting: finished stages are cached and resume", flush=True)
    raise JobFailed(f"Ray job {submission_id} {status}{_mlflow_suffix(mlflow_run)}; "
                    f"see `arpipe jobs logs {submission_id} --address {url}`")


def _mlflow_suffix(run: dict[str, str] | None) -> str:
    return f" (MLflow run {run['run_id']})" if run else ""


def wait_for(client: Any, url: str, token: Token | None, submission_id: str, follow: bool,
             echo: Callable[[str], None] | None = None) -> tuple[str, dict[str, str] | None]:
    """Wait until the job ends; print its MLflow run once known (and its logs if ``follow``). Returns (status, run)."""
    echo = echo or (lambda line: print(line, flush=True))
    mlflow_run: dict[str, str] | None = None
    if follow:
        text = follow_logs(client, url, token, submission_id)
        mlflow_run = parse_mlflow_run(text)
    last_logs_check = 0.0
    while True:
        with jobs_api(url, token):
            status = str(client.get_job_status(submission_id).value)
        ended = status in TERMINAL
        failed_quietly = ended and status != "SUCCEEDED" and not follow
        if (mlflow_run is None and (ended or time.time() - last_logs_check > 2.0)) or failed_quietly:
            last_logs_check = time.time()
            with jobs_api(url, token):
                logs = client.get_job_logs(submission_id)
            if mlflow_run is None:
                mlflow_run = parse_mlflow_run(logs)
                if mlflow_run:
                    echo(f"  MLflow run {mlflow_run['run_id']} in experiment {mlflow_run['experiment']!r} "
                         f"({mlflow_run['tracking_uri']})")
            if failed_quietly:
                tail = [line for line in logs.strip().splitlines() if line.strip()][-12:]
                echo("  last log lines:\n" + "\n".join(f"    {line}" for line in tail))
        if ended:
            return status, mlflow_run
        time.sleep(0.5)


def follow_logs(client: Any, url: str, token: Token | None, submission_id: str) -> str:
    """Print the job's logs as they come until it ends; returns all that was printed."""
    seen: list[str] = []

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            seen.append(chunk)
            sys.stdout.write(chunk)
            sys.stdout.flush()

    with jobs_api(url, token):
        asyncio.run(tail())
    return "".join(seen)


# -- jobs ------------------------------------------------------------------------------

def cmd_jobs_list(args: argparse.Namespace) -> int:
    client, url, token = connect(args.address)
    with jobs_api(url, token):
        jobs = client.list_jobs()
    jobs = sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)
    rows = []
    for job in jobs:
        meta = job.metadata or {}
        if args.arpipe_only and "arpipe.pipeline" not in meta:
            continue
        rows.append([job.submission_id or job.job_id or "-", str(job.status.value), meta.get("arpipe.pipeline", "-"),
                     _when(job.start_time), _took(job.start_time, job.end_time)])
    if not rows:
        print(f"no jobs on {url}")
        return 0
    print(_table(rows, ["submission id", "status", "pipeline", "started", "took"]))
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    client, url, token = connect(args.address)
    with jobs_api(url, token):
        info = client.get_job_info(args.id)
        logs = client.get_job_logs(args.id)
    meta = info.metadata or {}
    print(f"{args.id}: {info.status.value}")
    if meta.get("arpipe.pipeline"):
        print(f"  pipeline: {meta['arpipe.pipeline']} ({meta.get('arpipe.file', '?')})")
    print(f"  entrypoint: {info.entrypoint}")
    print(f"  started: {_when(info.start_time)}, took {_took(info.start_time, info.end_time)}")
    if info.message:
        print(f"  message: {_first_line(info.message)}")
    run = parse_mlflow_run(logs)
    if run:
        print(f"  MLflow run {run['run_id']} in experiment {run['experiment']!r} ({run['tracking_uri']})")
    print(f"  dashboard: {job_url(url, args.id)}")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    client, url, token = connect(args.address)
    if args.follow:
        try:
            follow_logs(client, url, token, args.id)
        except KeyboardInterrupt:
            return 130
        return 0
    with jobs_api(url, token):
        sys.stdout.write(client.get_job_logs(args.id))
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    client, url, token = connect(args.address)
    with jobs_api(url, token):
        stopped = client.stop_job(args.id)
        status = str(client.get_job_status(args.id).value)
    if not stopped and status in TERMINAL:
        print(f"{args.id} had already ended: {status}")
        return 0
    if args.wait:
        deadline = time.time() + args.timeout
        while status not in TERMINAL and time.time() < deadline:
            time.sleep(0.5)
            with jobs_api(url, token):
                status = str(client.get_job_status(args.id).value)
    print(f"{args.id}: {status}" + ("" if status in TERMINAL else " (stop requested)"))
    return 0


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _took(start: int | None, end: int | None) -> str:
    if not start:
        return "-"
    seconds = ((end or time.time() * 1000) - start) / 1000
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


# -- argparse ------------------------------------------------------------------------

def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 "
                                     "(default: RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``submit`` and ``jobs`` to the ``arpipe`` parser (``pipeline/cli.py`` calls this lazily)."""
    p = subparsers.add_parser("submit", help="submit a pipeline to a Ray cluster as a Ray job",
                              description="Upload the pipeline's folder and run `arpipe run` on the cluster as a "
                                          "Ray job. Prints the submission id, the dashboard URL and the MLflow run.")
    p.add_argument("pipeline", help="pipeline YAML file")
    _add_address(p)
    p.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a value, e.g. -s stages.train.steps=10 (repeatable)")
    p.add_argument("--only", action="append", default=[], metavar="STAGE", help="passed to `arpipe run`")
    p.add_argument("--from", dest="from_", metavar="STAGE", help="passed to `arpipe run`")
    p.add_argument("--until", metavar="STAGE", help="passed to `arpipe run`")
    p.add_argument("--force", action="append", default=[], metavar="STAGE|all", help="passed to `arpipe run`")
    p.add_argument("--wait", action="store_true", help="wait until the job ends; exit 1 unless it succeeded")
    p.add_argument("--follow", action="store_true", help="print the job's logs as they come (implies --wait)")
    p.add_argument("--retries", type=int, default=0, metavar="N",
                   help="resubmit a failed job up to N times; it resumes from what is cached (implies --wait)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for the job (default: MLFLOW_TRACKING_URI, "
                                          "else sqlite:///mlflow.db)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]|GLOB",
                   help="environment variable for the job: NAME=VALUE, NAME (from this shell) or e.g. 'AWS_*'")
    p.add_argument("--pip", action="append", default=[], metavar="REQ|FILE.txt",
                   help="pip packages installed for this job on top of the image's environment (repeatable)")
    p.add_argument("--working-dir", metavar="DIR", help="project folder to upload (default: the pipeline's folder)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave this out of the upload (gitignore syntax; repeatable)")
    p.add_argument("--allow-local-storage", action="store_true",
                   help="allow local storage/SQLite MLflow on a remote cluster (every node mounts the same paths)")
    p.set_defaults(func=cmd_submit)

    jobs = subparsers.add_parser("jobs", help="list, follow and stop submitted Ray jobs")
    sub = jobs.add_subparsers(dest="jobs_command", metavar="list|status|logs|stop", required=True)
    q = sub.add_parser("list", help="jobs on the cluster, newest first")
    _add_address(q)
    q.add_argument("--arpipe-only", action="store_true", help="only jobs submitted by `arpipe submit`")
    q.set_defaults(func=cmd_jobs_list)
    q = sub.add_parser("status", help="a job's state, message, MLflow run and dashboard URL")
    q.add_argument("id", help="submission id")
    _add_address(q)
    q.set_defaults(func=cmd_jobs_status)
    q = sub.add_parser("logs", help="a job's logs")
    q.add_argument("id", help="submission id")
    _add_address(q)
    q.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    q.set_defaults(func=cmd_jobs_logs)
    q = sub.add_parser("stop", help="stop a running job")
    q.add_argument("id", help="submission id")
    _add_address(q)
    q.add_argument("--wait", action="store_true", help="wait until it has stopped")
    q.add_argument("--timeout", type=float, default=60.0, help="seconds to wait with --wait (default 60)")
    q.set_defaults(func=cmd_jobs_stop)
