"""``arpipe submit`` and ``arpipe jobs``: a pipeline run as a Ray job on a cluster.

``submit`` uploads the user's project and runs ``arpipe run`` there
(:mod:`arpipe.cluster.submission` builds what is sent); a failed job resubmitted
with ``--retries`` resumes through the cache. ``jobs`` lists, shows, follows and
stops jobs. All calls go through :class:`arpipe.cluster.client.JobsClient`; this
module holds the flags and what a user reads. ``pipeline/cli.py`` imports it by
name only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable

from arpipe.cluster.client import TERMINAL, JobsClient, dashboard_address, first_line, job_url
from arpipe.cluster.submission import MlflowRun, prepare, recorded_run
from arpipe.pipeline.cli import format_table
from arpipe.pipeline.errors import ArpipeError, UserError
from arpipe.pipeline.progress import duration

#: how often a waiting submit looks for the run's MLflow run in its ledger
RECORD_POLL_S = 2.0


class JobFailed(ArpipeError):
    """The Ray job ran and did not succeed (its logs say why): exit code 1."""

    exit_code = 1


def _say(line: str) -> None:
    print(line, flush=True)


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


# -- submit ----------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    """Submit; with --wait/--follow/--retries also wait, follow and resubmit failed attempts."""
    if args.retries < 0:
        raise UserError("--retries must be 0 or more", where=f"--retries {args.retries}")
    prepared = prepare(args, dashboard_address(args.address))
    client = JobsClient(args.address)
    url = client.url
    if not args.allow_local_storage:
        from arpipe.pipeline.remote import check_cluster_ready

        check_cluster_ready(prepared.loaded, url, prepared.tracking_uri, False, node_ips=client.node_ips())
    wait = args.wait or args.follow or args.retries > 0
    for number in range(args.retries + 1):
        attempt = prepared.attempt(number)
        submission_id = attempt.submission_id
        client.submit(prepared.entrypoint, attempt.runtime_env, attempt.metadata, submission_id)
        _say(f"submitted {submission_id} to {url}" + (f" (retry {number} of {args.retries})" if number else ""))
        _say(f"  dashboard: {job_url(url, submission_id)}")
        _say(f"  runs: {prepared.entrypoint}")
        if number == 0:
            _say(f"  uploaded: {prepared.runtime_env['working_dir']} (as the job's working_dir)")
        if not wait:
            _say(f"  follow it: arpipe jobs logs {submission_id} --follow --address {url}")
            return 0
        try:
            status, mlflow_run = wait_for(client, submission_id, attempt.metadata, follow=args.follow)
        except KeyboardInterrupt:
            print(f"arpipe: stopped waiting; {submission_id} keeps running "
                  f"(arpipe jobs stop {submission_id} --address {url})", file=sys.stderr)
            return 130
        if status == "SUCCEEDED":
            _say(f"{submission_id} SUCCEEDED" + _mlflow_suffix(mlflow_run))
            return 0
        if status == "STOPPED" or number == args.retries:
            break
        _say(f"{submission_id} {status}; resubmitting: finished stages are cached and resume")
    raise JobFailed(f"Ray job {submission_id} {status}{_mlflow_suffix(mlflow_run)}; "
                    f"see `arpipe jobs logs {submission_id} --address {url}`")


#: what a job's log says when the cluster's Python has no arpipe
NO_ARPIPE = re.compile(r"No module named '?arpipe|(?:arpipe|python3?): (?:\d+: )?(?:command )?not found")


def diagnose(log_tail: list[str]) -> str | None:
    """What a failed job's last log lines say about the cluster, when it is that it cannot run arpipe."""
    if any(NO_ARPIPE.search(line) for line in log_tail):
        return ("the cluster's Python cannot run arpipe: install it in the image the cluster runs (see "
                "Dockerfile) or pass `--pip arpipe` (or a wheel's path)")
    return None


def _mlflow_suffix(run: MlflowRun | None) -> str:
    return f" (MLflow run {run.run_id})" if run else ""


def wait_for(client: JobsClient, submission_id: str, metadata: dict[str, str], follow: bool,
             echo: Callable[[str], None] = _say) -> tuple[str, MlflowRun | None]:
    """Wait until the job ends; print its MLflow run once its ledger names it (and its logs if ``follow``).

    Returns (final status, the MLflow run or None when the run never recorded one).
    """
    mlflow_run: MlflowRun | None = None
    if follow:
        client.follow(submission_id, _write)     # the logs carry `arpipe run`'s own "MLflow run" line
        mlflow_run = recorded_run(metadata)
    last_record_check = 0.0
    while True:
        status = client.status(submission_id)
        ended = status in TERMINAL
        if mlflow_run is None and (ended or time.time() - last_record_check > RECORD_POLL_S):
            last_record_check = time.time()
            # while the job runs its ledger is current; MLflow is asked only once, at the end
            mlflow_run = recorded_run(metadata, search_mlflow=ended)
            if mlflow_run and not follow:
                echo(f"  {mlflow_run.describe()}")
        if ended and status != "SUCCEEDED" and not follow:
            tail = [line for line in client.logs(submission_id).strip().splitlines() if line.strip()][-12:]
            echo("  last log lines:\n" + "\n".join(f"    {line}" for line in tail))
            if (hint := diagnose(tail)) is not None:
                echo(f"  {hint}")
        if ended:
            return status, mlflow_run
        time.sleep(0.5)


# -- jobs ------------------------------------------------------------------------------

def _job(client: JobsClient, job, run: MlflowRun | None):
    """A job as ``--json`` prints it (arpipe.schemas.cli.Job): times in Unix seconds, missing values null."""
    from arpipe.schemas.cli import Job

    meta = job.metadata or {}
    job_id = job.submission_id or job.job_id or ""
    return Job(submission_id=job_id, status=str(job.status.value), pipeline=meta.get("arpipe.pipeline"),
               file=meta.get("arpipe.file"), entrypoint=job.entrypoint or "",
               start_time=job.start_time / 1000 if job.start_time else None,
               end_time=job.end_time / 1000 if job.end_time else None, message=job.message or None,
               mlflow_run_id=run.run_id if run else None, dashboard_url=job_url(client.url, job_id))


def cmd_jobs_list(args: argparse.Namespace) -> int:
    client = JobsClient(args.address)
    jobs = [job for job in client.jobs() if not args.arpipe_only or "arpipe.pipeline" in (job.metadata or {})]
    if args.json:
        from arpipe.schemas.cli import JobsOutput

        print(JobsOutput(address=client.url, jobs=[_job(client, job, recorded_run(job.metadata, search_mlflow=False))
                                                   for job in jobs]).model_dump_json(indent=2))
        return 0
    rows = []
    for job in jobs:
        meta = job.metadata or {}
        rows.append([job.submission_id or job.job_id or "-", str(job.status.value), meta.get("arpipe.pipeline", "-"),
                     _when(job.start_time), _took(job.start_time, job.end_time)])
    if not rows:
        print(f"no jobs on {client.url}")
        return 0
    print(format_table(rows, ["submission id", "status", "pipeline", "started", "took"]))
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    client = JobsClient(args.address)
    info = client.info(args.id)
    meta = info.metadata or {}
    run = recorded_run(meta)
    if args.json:
        from arpipe.schemas.cli import JobOutput

        print(JobOutput(job=_job(client, info, run)).model_dump_json(indent=2))
        return 0
    print(f"{args.id}: {info.status.value}")
    if meta.get("arpipe.pipeline"):
        print(f"  pipeline: {meta['arpipe.pipeline']} ({meta.get('arpipe.file', '?')})")
    print(f"  entrypoint: {info.entrypoint}")
    print(f"  started: {_when(info.start_time)}, took {_took(info.start_time, info.end_time)}")
    if info.message:
        print(f"  message: {first_line(info.message)}")
    if run:
        print(f"  {run.describe()}")
    print(f"  dashboard: {job_url(client.url, args.id)}")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    client = JobsClient(args.address)
    if args.follow:
        try:
            client.follow(args.id, _write)
        except KeyboardInterrupt:
            return 130
        return 0
    sys.stdout.write(client.logs(args.id))
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    client = JobsClient(args.address)
    stopped = client.stop(args.id)
    status = client.status(args.id)
    if not stopped and status in TERMINAL:
        print(f"{args.id} had already ended: {status}")
        return 0
    if args.wait:
        deadline = time.time() + args.timeout
        while status not in TERMINAL and time.time() < deadline:
            time.sleep(0.5)
            status = client.status(args.id)
    print(f"{args.id}: {status}" + ("" if status in TERMINAL else " (stop requested)"))
    return 0


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _took(start: int | None, end: int | None) -> str:
    if not start:
        return "-"
    return duration(((end or time.time() * 1000) - start) / 1000)


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
    q.add_argument("--json", action="store_true", help="print the jobs as one JSON object (docs/cli.md)")
    q.set_defaults(func=cmd_jobs_list)
    q = sub.add_parser("status", help="a job's state, message, MLflow run and dashboard URL")
    q.add_argument("id", help="submission id")
    _add_address(q)
    q.add_argument("--json", action="store_true", help="print the job as one JSON object (docs/cli.md)")
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
