"""Running a pipeline: cached stages are skipped, the rest run on Ray, lineage goes to MLflow.

Lineage waits until a stage has to run: a run that finds everything cached never imports MLflow
(nor Ray); its record is handed to a detached writer (``pipeline/lineage_queue.py``) and the command
returns at once. Once a stage runs, the parent run is created, with the cache hits so far.

Independent branches run concurrently and a failure stops only what depends
on it. Each stage output is written by one run at a time (a lock), and only
``outputs.json`` — written last — makes it trusted. Ctrl-C cancels running
stages and leaves their work for the next run to resume.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arpipe.pipeline import lineage as lin
from arpipe.pipeline import lineage_queue
from arpipe.pipeline import outputs as out
from arpipe.pipeline.config import LoadedPipeline, redact, replace_refs
from arpipe.pipeline.console import Router
from arpipe.pipeline.dag import Graph, Selection
from arpipe.pipeline.errors import ArpipeError, StageFailed, UserError
from arpipe.pipeline.execute import StagePayload, execute_stage, forwarded_env
from arpipe.pipeline.ledger import Ledger
from arpipe.pipeline.lineage import Lineage, RunRecord, git_commit, tracking_uri
from arpipe.pipeline.lock import Heartbeats, StageLock, check_exclusive_creates
from arpipe.pipeline.plan import Planner, StagePlan
from arpipe.pipeline.registry import stage_class
from arpipe.pipeline.storage import control_uri, is_s3, join, storage_for, user_cache
from arpipe.schemas.outputs import OutputsRecord

#: set by Ray Jobs in a job's entrypoint process
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass
class Running:
    plan: StagePlan
    lock: StageLock
    mlflow_run_id: str | None
    started: float
    ref: Any = None                  # Ray ObjectRef for task stages
    log: Path | None = None          # the stage's log file here while it runs (quiet console)


@dataclass
class RunResult:
    states: dict[str, str]
    records: dict[str, OutputsRecord]
    errors: dict[str, str] = field(default_factory=dict)
    mlflow_parent_run_id: str | None = None
    run_id: str = ""
    seconds: float = 0.0


def _shown(uri: str) -> str:
    """A log's location as the user can open it: relative to here when that is shorter."""
    if is_s3(uri):
        return uri
    try:
        rel = os.path.relpath(uri)
    except ValueError:   # another drive
        return uri
    return rel if len(rel) < len(uri) else uri


def _unwrap(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def describe_error(err: BaseException) -> str:
    err = _unwrap(err)
    if isinstance(err, ArpipeError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}".rstrip(": ")


class Runner:
    def __init__(self, loaded: LoadedPipeline, graph: Graph, selection: Selection, *,
                 address: str | None = None, tracking: str | None = None,
                 echo: Callable[[str], None] = print, debug: bool = False, lineage_in_background: bool = False,
                 router: Router | None = None):
        """``lineage_in_background``: when no stage runs, leave MLflow to a detached writer (the CLI does;
        inside a Ray job it does not: the job's end may take its helpers along, and its submitter reads
        MLflow right after). ``router``: the console's (:func:`arpipe.pipeline.console.routed`), which
        gets each running stage's log file."""
        self.loaded, self.graph, self.selection = loaded, graph, selection
        self.address = address
        self.echo = echo
        self.debug = debug
        self.router = router
        self._ended_logs: list[tuple[StagePlan, Path, str | None]] = []
        self.planner = Planner(loaded, graph)
        self.root = self.planner.root
        # `arpipe submit` names the run, so it can find the run's ledger (and its MLflow run) afterwards
        self.run_id = os.environ.get("ARPIPE_RUN_ID") or uuid.uuid4().hex[:12]
        self.tracking = tracking_uri(tracking)
        self._pool: cf.ThreadPoolExecutor | None = None
        self._ray_started = False
        self._user_failed: set[str] = set()   # stages that failed on a UserError (exit 2 if only those)
        self._heartbeats: Heartbeats | None = None
        self.lineage_in_background = lineage_in_background and not os.environ.get(RAY_JOB_ENV)
        self._lineage_box: dict[str, Any] = {}
        self._lineage_thread: threading.Thread | None = None
        self._record: RunRecord | None = None
        self._parent: str | None = None      # the MLflow parent run, once a stage has to run

    # -- lineage -----------------------------------------------------------
    def _begin_lineage(self) -> None:
        """Open MLflow in a thread (~1 s of imports), overlapping with whatever comes next (Ray's start)."""
        if self._lineage_thread is None:
            self._lineage_thread = threading.Thread(target=self._open_lineage, daemon=True)
            self._lineage_thread.start()

    def _open_lineage(self) -> None:
        try:
            self._lineage_box["lineage"] = Lineage(self.tracking, self.loaded.spec.experiment_name,
                                                   self.loaded.secret_values)
        except BaseException as err:  # surfaced in the main thread
            self._lineage_box["error"] = err

    @property
    def lineage(self) -> Lineage:
        self._begin_lineage()
        self._lineage_thread.join()
        if "error" in self._lineage_box:
            err = self._lineage_box["error"]
            raise UserError(f"cannot open MLflow tracking at {self.tracking}: {describe_error(err)}",
                            fix="check MLFLOW_TRACKING_URI (or --tracking-uri)") from err
        return self._lineage_box["lineage"]

    def _parent_run(self, ledger: Ledger) -> str:
        """The MLflow parent run, created on first need together with the cache hits recorded so far."""
        if self._parent is None:
            self._adopt_runs(self.lineage.deliver(self._record), ledger)
        return self._parent

    def _adopt_runs(self, ids: dict[str, str], ledger: Ledger) -> None:
        """Take a delivered record's run ids (``""``: the parent) into the ledger and say where the run is."""
        ids = dict(ids)
        self._parent = ids.pop("")
        ledger.data["mlflow_parent_run_id"] = self._parent
        for name, run_id in ids.items():
            ledger.stage(name, mlflow_run_id=run_id)
        self.echo(f"  MLflow run {self._parent} in experiment {self._record.experiment!r} ({self.tracking})")

    def _end_lineage(self, ledger: Ledger, status: str) -> str | None:
        """Close the parent run; with no parent yet, hand the whole record over. Returns the parent run id."""
        if self._parent is not None:
            self.lineage.finish_parent(self._parent, status)
            return self._parent
        record = self._record
        record.status, record.end_ms = status, lin.now_ms()
        lineage_queue.queue(self.root, record)   # kept until it is in MLflow: a writer that dies loses nothing
        if self.lineage_in_background:
            lineage_queue.deliver_in_background(self.root)
            return None
        delivered = (lineage_queue.deliver_pending(self.root, self.tracking).get(record.record_id)
                     or lineage_queue.delivered(self.root, record.record_id))   # or another writer got to it first
        if delivered:
            self._adopt_runs(delivered, ledger)
        return self._parent

    def _stage_tags(self, name: str, upstream_runs: list[str]) -> dict[str, str]:
        tags = {"arpipe.run_id": self.run_id}
        if self._git:
            tags["mlflow.source.git.commit"] = self._git
            tags["arpipe.git_commit"] = self._git
        return tags

    def _inputs_for(self, name: str, records: dict[str, OutputsRecord]) -> list[dict[str, str]]:
        items = []
        for _path, up, output in self.graph.refs[name]:
            record = records[up]
            items.append({"name": f"{up}.{output}",
                          "uri": str(out.resolve(record, out.output_uri(self.root, up, record.fingerprint), output)),
                          "digest": record.outputs[output].digest, "run_id": record.mlflow_run_id or ""})
        return items

    def _resolved_config(self, name: str, records: dict[str, OutputsRecord]) -> dict[str, Any]:
        spec = self.loaded.spec.stages[name]

        def resolve(stage: str, output: str) -> Any:
            record = records[stage]
            return out.resolve(record, out.output_uri(self.root, stage, record.fingerprint), output)

        return replace_refs(spec.model_dump(mode="json"), resolve)

    # -- execution ---------------------------------------------------------
    def _submit(self, plan: StagePlan, payload: StagePayload) -> tuple[cf.Future, Any]:
        cls = stage_class(plan.kind)
        if cls.placement == "driver":
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="arpipe-stage")
            self._connect()
            return self._pool.submit(execute_stage, payload), None
        self._connect()
        import ray

        options = cls.ray_options(self.loaded.spec.stages[plan.name])
        remote = ray.remote(execute_stage).options(name=f"arpipe:{plan.name}", **options)
        ref = remote.remote(payload)
        return ref.future(), ref

    def _connect(self) -> None:
        if not self._ray_started:
            from arpipe.pipeline.remote import connect_ray

            where = connect_ray(self.address)
            self._ray_started = True
            self.echo(f"  stages run on {where}")

    def _clear_for_force(self, uri: str) -> None:
        """A forced stage starts over: its outputs and its resumable work (checkpoints, unit records) go; the
        lock this run holds and a failure note stay."""
        if is_s3(uri):
            shutil.rmtree(out.staging_dir(uri), ignore_errors=True)
        storage = storage_for(uri)
        storage.delete(join(uri, out.OUTPUTS_FILE))
        for entry in list(storage.list(uri)):
            if out.is_work(entry.relpath):
                storage.delete(join(uri, entry.relpath))

    def _line(self, name: str, state: str, detail: str = "") -> None:
        width = max(len(n) for n in self.loaded.spec.stages)
        self.echo(f"  {name:<{width}}  {state:<8} {detail}".rstrip())

    def run(self) -> RunResult:
        t0 = time.time()
        spec = self.loaded.spec
        self._git = git_commit(self.loaded.directory)
        selected = set(self.selection.selected)
        involved = [n for n in self.graph.order
                    if n in selected or any(n in self.graph.ancestors(s) for s in selected)]
        self.echo(f"arpipe run {self.run_id}: pipeline {spec.name!r}, {len(selected)} stage(s), "
                  f"outputs under {self.root}")
        check_exclusive_creates(self.root)   # a store that cannot make locks exclusive: refuse before any work
        if self.lineage_in_background:
            lineage_queue.deliver_if_pending(self.root)   # records an earlier run's writer did not get to
        secrets = self.loaded.secret_values
        resolved_yaml = json.dumps(redact({"name": spec.name, "storage": spec.storage, "stages": {
            n: s.model_dump(mode="json") for n, s in spec.stages.items()}}, secrets), indent=1)
        self._record = RunRecord(
            record_id=uuid.uuid4().hex, experiment=spec.experiment_name, pipeline=spec.name,
            tracking_uri=self.tracking if lin.scrub(self.tracking, secrets) == self.tracking else None,
            resolved_yaml=lin.scrub(resolved_yaml, secrets), start_ms=int(t0 * 1000),
            tags={"arpipe.run_id": self.run_id, "arpipe.pipeline_file": str(self.loaded.path)})
        ledger = Ledger(self.root, spec.name, self.run_id, None)
        ledger.data["lineage_record"] = self._record.record_id
        states: dict[str, str] = {n: "pending" for n in involved}
        records: dict[str, OutputsRecord] = {}
        errors: dict[str, str] = {}
        running: dict[cf.Future, Running] = {}
        waiting_noted: set[str] = set()
        forced_done: set[str] = set()
        result = RunResult(states, records, errors, None, self.run_id)
        try:
            while any(s == "pending" for s in states.values()) or running:
                lock_wait = False
                for name in [n for n in involved if states[n] == "pending"]:
                    ups = self.graph.upstream[name]
                    bad = [u for u in ups if states.get(u) in ("failed", "skipped", "blocked")]
                    if bad:
                        states[name] = "skipped"
                        self._line(name, "skipped", f"upstream {', '.join(sorted(bad))} did not finish")
                        ledger.stage(name, state="skipped")
                        continue
                    if not all(u in records for u in ups):
                        continue
                    forced = name in self.selection.forced and name not in forced_done
                    try:
                        plan = self.planner.decide(name, records, forced=forced)
                    except UserError as err:     # e.g. an upstream did not return a referenced output
                        states[name], errors[name] = "failed", str(err)
                        self._line(name, "failed", str(err))
                        ledger.stage(name, state="failed", error=str(err))
                        continue
                    if plan.action == "cached":
                        self._cache_hit(plan, records, ledger, states)
                        continue
                    if name not in selected:
                        states[name] = "blocked"
                        errors[name] = "not selected and has no output"
                        self._line(name, "blocked", "needed upstream but not selected and not built: "
                                   "include it or drop --only/--from")
                        ledger.stage(name, state="blocked")
                        continue
                    lock = StageLock(plan.out_uri, self.run_id)
                    holder = lock.try_acquire()
                    if holder is not None:
                        lock_wait = True
                        if name not in waiting_noted:
                            waiting_noted.add(name)
                            self._line(name, "waiting", f"output is being written by {holder.describe()}")
                        continue
                    if not forced:
                        verdict = out.inspect(plan.out_uri)   # another run may have committed meanwhile
                        if verdict.state == "committed":
                            lock.release()
                            plan.action, plan.record = "cached", verdict.record
                            plan.why = "outputs verified (committed by a concurrent run)"
                            self._cache_hit(plan, records, ledger, states)
                            continue
                    else:
                        self._clear_for_force(plan.out_uri)
                        forced_done.add(name)
                    self._start(plan, lock, records, ledger, states, running)
                if not running:
                    if lock_wait:
                        time.sleep(0.5)
                        continue
                    break
                done, _ = cf.wait(list(running), timeout=0.5 if lock_wait else None,
                                  return_when=cf.FIRST_COMPLETED)
                for future in done:
                    self._finish(future, running.pop(future), records, ledger, states, errors)
        except KeyboardInterrupt:
            self._interrupt(running, ledger, states)
            raise
        finally:
            if self._heartbeats:
                self._heartbeats.stop()
            if self._pool:
                self._pool.shutdown(wait=False, cancel_futures=True)
        failed = sorted(n for n, s in states.items() if s in ("failed", "blocked"))
        parent = result.mlflow_parent_run_id = self._end_lineage(ledger, "FAILED" if failed else "FINISHED")
        ledger.finish("failed" if failed else "done")
        result.seconds = time.time() - t0
        counts = {s: sum(1 for v in states.values() if v == s) for s in ("done", "cached", "failed", "skipped")}
        self.echo(f"finished in {result.seconds:.1f} s: {counts['done']} ran, {counts['cached']} cached, "
                  f"{counts['failed']} failed, {counts['skipped']} skipped")
        where = (f"MLflow run {parent}" if parent else
                 f"MLflow experiment {spec.experiment_name!r}, written in the background within seconds")
        self.echo(f"outputs: {self.root}; lineage: {where} (browse with `arpipe ui`"
                  + (f" --tracking-uri {self.tracking}" if not self.tracking.startswith("sqlite:///") else "")
                  + f"); status: `arpipe status {self.loaded.path.name}`")
        if failed:
            detail = "; ".join(f"{n}: {errors.get(n, states[n])}" for n in failed)
            error = StageFailed(f"stage(s) failed: {detail}. Independent stages finished; fix and rerun to resume.")
            ran = [n for n in failed if states[n] == "failed"]
            if ran and all(n in self._user_failed for n in ran):
                error.exit_code = 2   # bad config or data, found at run time: still the user's to fix
            raise error
        return result

    def _cache_hit(self, plan: StagePlan, records: dict, ledger: Ledger, states: dict) -> None:
        record = plan.record
        records[plan.name] = record
        states[plan.name] = "cached"
        config = self._resolved_config(plan.name, records)
        # complete as it is: outputs.json is an artifact of the producing run
        hit = lin.stage_record(plan.name, plan.kind, plan.fingerprint, config, self._inputs_for(plan.name, records),
                               {**self._stage_tags(plan.name, []), "arpipe.cache": "hit",
                                "arpipe.producer_run_id": record.mlflow_run_id or ""}, self.loaded.secret_values)
        self._record.stages.append(hit)
        run_id = self.lineage.write_stage(self._parent, hit) if self._parent else None
        self._line(plan.name, "cached", plan.why)
        ledger.stage(plan.name, state="cached", fingerprint=plan.fingerprint, out_uri=plan.out_uri,
                     mlflow_run_id=run_id, producer_run_id=record.mlflow_run_id, duration_s=record.duration_s)

    def _start(self, plan: StagePlan, lock: StageLock, records: dict, ledger: Ledger,
               states: dict, running: dict) -> None:
        self._begin_lineage()
        try:
            self._connect()   # Ray starts while MLflow loads
            parent = self._parent_run(ledger)
        except BaseException:
            lock.release()
            raise
        if self._heartbeats is None:
            self._heartbeats = Heartbeats()
        self._heartbeats.add(lock)
        config = self._resolved_config(plan.name, records)
        run_id = self.lineage.start_stage(parent, plan.name, plan.kind, plan.fingerprint, config,
                                          self._inputs_for(plan.name, records),
                                          {**self._stage_tags(plan.name, []), "arpipe.cache": "miss",
                                           "arpipe.reason": plan.why[:500]})
        payload = StagePayload(
            name=plan.name, kind=plan.kind, config=config, fingerprint=plan.fingerprint, fingerprint_doc=plan.doc,
            out_uri=plan.out_uri, pipeline_dir=self.loaded.directory,
            inputs={f"{u}.{o}": out.resolve(records[u], out.output_uri(self.root, u, records[u].fingerprint), o)
                    for _p, u, o in self.graph.refs[plan.name]},
            tracking_uri=self.tracking, mlflow_run_id=run_id, code_digest=plan.code_digest, env=forwarded_env())
        states[plan.name] = "running"
        verb = "resuming" if plan.action == "resume" else "running"
        log = self._open_log(plan)
        self._line(plan.name, verb, plan.why + (f"; log: {_shown(out.log_uri(plan.out_uri, self.run_id))}"
                                                if log else ""))
        ledger.stage(plan.name, state="running", fingerprint=plan.fingerprint, out_uri=plan.out_uri,
                     mlflow_run_id=run_id, started=time.time())
        storage_for(plan.out_uri).delete(control_uri(plan.out_uri, "failed.json"))
        try:
            future, ref = self._submit(plan, payload)
        except BaseException:
            self._close_log(plan, log, None)
            lock.release()
            raise
        running[future] = Running(plan, lock, run_id, time.time(), ref, log)

    def _open_log(self, plan: StagePlan) -> Path | None:
        """The stage's log file here: in its folder's ``.arpipe/logs/`` on local storage; on S3 a local file
        that goes there when the stage ends."""
        if self.router is None:
            return None
        uri = out.log_uri(plan.out_uri, self.run_id)
        path = storage_for(uri).local_path(uri) or user_cache("logs", self.run_id, f"{plan.name}.log")
        self.router.begin(plan.name, path)
        return path

    def _close_log(self, plan: StagePlan, log: Path | None, mlflow_run_id: str | None) -> None:
        """The stage stopped: its log is kept for :meth:`publish_logs` (Ray still relays its workers' last
        lines for a while, and the router keeps appending those)."""
        if log is None or self.router is None:
            return
        self.router.end(plan.name)
        self._ended_logs.append((plan, log, mlflow_run_id))

    def publish_logs(self) -> None:
        """Once the console's router is closed: each stage's log copied to its folder on S3 and logged to the
        stage's MLflow run as ``logs/<run id>.log``."""
        for plan, log, mlflow_run_id in self._ended_logs:
            uri = out.log_uri(plan.out_uri, self.run_id)
            try:
                if is_s3(uri):
                    storage_for(uri).put_file(log, uri)
                if mlflow_run_id:
                    self.lineage.log_file(mlflow_run_id, log, f"logs/{self.run_id}.log")
            except Exception as err:   # a log that cannot be kept must not fail the run it describes
                self.echo(f"  {plan.name}: its log stays at {log} ({describe_error(err)})")
        self._ended_logs.clear()

    def _finish(self, future: cf.Future, item: Running, records: dict, ledger: Ledger, states: dict,
                errors: dict) -> None:
        name = item.plan.name
        seconds = time.time() - item.started
        try:
            result = future.result()
            record = OutputsRecord.model_validate_json(result.outputs_json)
            records[name] = record
            states[name] = "done"
            if result.log:
                self.lineage.write_log(item.mlflow_run_id, result.log)
            self.lineage.finish_stage(item.mlflow_run_id, "FINISHED", result.outputs_json)
            self._line(name, "done", f"{seconds:.1f} s")
            ledger.stage(name, state="done", duration_s=seconds, finished=time.time())
        except Exception as err:
            cause = _unwrap(err)
            message = self.lineage.scrub(describe_error(err))   # a stage's error may quote its credentials
            errors[name] = message
            states[name] = "failed"
            if isinstance(cause, UserError):
                self._user_failed.add(name)
            trace = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
            if "RayTaskError" in type(err).__name__ or hasattr(err, "traceback_str"):
                trace = str(err)
            trace = self.lineage.scrub(trace)
            try:
                storage_for(item.plan.out_uri).write_text(
                    control_uri(item.plan.out_uri, "failed.json"),
                    json.dumps({"run_id": self.run_id, "error": message, "traceback": trace, "time": time.time()}))
            except OSError:
                pass   # the storage that failed the stage (full, gone) may refuse the note too; the run goes on
            self.lineage.finish_stage(item.mlflow_run_id, "FAILED", error=message)
            self._line(name, "failed", message + (f" (log: {_shown(out.log_uri(item.plan.out_uri, self.run_id))})"
                                                  if item.log else ""))
            if self.debug:
                print(trace, file=sys.stderr)
            ledger.stage(name, state="failed", error=message, duration_s=seconds, finished=time.time())
        finally:
            self._close_log(item.plan, item.log, item.mlflow_run_id)
            item.lock.release()
            if self._heartbeats:
                self._heartbeats.remove(item.lock)

    def _interrupt(self, running: dict, ledger: Ledger, states: dict) -> None:
        self.echo("interrupted: stopping running stages; their work stays for the next run to resume")
        for item in running.values():
            if item.ref is not None:
                import ray

                try:
                    ray.cancel(item.ref, force=True)
                except Exception:
                    pass
            try:
                self.lineage.finish_stage(item.mlflow_run_id, "KILLED", error="interrupted (Ctrl-C)")
            except Exception:
                pass
            self._close_log(item.plan, item.log, None)
            item.lock.release()
            states[item.plan.name] = "interrupted"
            ledger.stage(item.plan.name, state="interrupted")
        try:
            self._end_lineage(ledger, "KILLED")
        except Exception:
            pass
        ledger.finish("interrupted")
