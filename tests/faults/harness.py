"""Kill campaigns: `arpipe run` is SIGKILLed at seeded random moments, rerun, and held to its promises.

A campaign runs a group of stage kinds (:class:`Kind`), one independent stage each, in a
pipeline and folder of its own:

1. an undisturbed reference run (storage ``./ref``), beside the attempts;
2. attempts on storage ``./runs``, each started as a user would and SIGKILLed (its whole
   process group) at a seeded moment (the kills each kind gets: ``kinds.CI_KILLS``, or
   ``kinds.FULL_KILLS`` behind the ``full`` marker): once a stage has started, after ``m`` more of its
   resumable units are committed (``m`` drawn from ``Kind.wait_units``), plus a random
   delay. After each kill, for every stage: ``arpipe plan`` trusts no output that is not
   committed and whole (every file re-hashed), committed units are still there byte for
   byte, the attempt resumed from exactly what was committed, at most one unit was cut off;
3. a final run in which one Ray worker of each stage is SIGKILLed mid-work; it must finish
   on its own;
4. the final outputs equal the reference run's (digests), each kind's own check holds
   (a store: no sample duplicated or lost), and no credential from the environment is in
   any file or line the campaign left.

Problems are collected, not raised, so that campaigns can run in threads side by side.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import ARPIPE, BACKGROUND_NICE, arpipe, start_in_own_session

STAGE_STATES = ("running", "resuming", "done", "failed", "cached", "skipped")
#: how long a campaign waits for a run, or for a stage to start or reach a unit: its runs are background work,
#: at the lowest priority, and can wait ten minutes and more for a core while the tests in front are busy (the
#: prepared model once took over 600 s); a hang is still caught, by the session's watchdog (tests/conftest.py)
PATIENCE = 1800.0


# ----------------------------------------------------------------------------- one `arpipe run`


class LiveRun:
    """`arpipe run` in its own process group, its output read line by line as it comes."""

    def __init__(self, folder: Path, args: list[str], env: dict[str, str], nice: int = 0):
        self.started = time.time()
        self.proc = start_in_own_session([*ARPIPE, *args], nice, cwd=folder, env={**os.environ, **env},
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def states(self, stage: str) -> list[str]:
        found = []
        for line in list(self.lines):
            parts = line.split()
            if line.startswith("  ") and len(parts) >= 2 and parts[0] == stage and parts[1] in STAGE_STATES:
                found.append(parts[1])
        return found

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """True once ``condition()`` holds; False when the run ended first or time ran out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return True
            if not self.alive():
                return condition()
            time.sleep(0.02)
        return False

    def kill(self) -> bool:
        """SIGKILL the whole process group; True when it was still running."""
        if not self.alive():
            return False
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def finish(self, timeout: float = 600) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self._reader.join(timeout=10)
        return code


# ------------------------------------------------------------------------ committed outputs


def file_digest(path: Path, algorithm: str) -> str:
    if algorithm == "sha256":
        h = hashlib.sha256()
    else:
        import xxhash

        h = getattr(xxhash, algorithm)()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def committed(out_dir: Path) -> str | None:
    """None when ``outputs.json`` is there and every file it names re-hashes to its digest; else why not."""
    record_path = out_dir / "outputs.json"
    if not record_path.exists():
        return "no outputs.json"
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return "outputs.json does not parse"
    for rel, info in record["files"].items():
        path = out_dir / rel
        algorithm, _, digest = info["digest"].partition(":")
        if not path.is_file():
            return f"{rel} missing"
        if path.stat().st_size != info["bytes"] or file_digest(path, algorithm) != digest:
            return f"{rel} differs from outputs.json"
    return None


def stage_dir(storage: Path, stage: str) -> Path | None:
    found = [p for p in (storage / stage).glob("*") if p.is_dir()]
    return found[0] if len(found) == 1 else None


def plan_rows(folder: Path, pipeline: str, *extra: str) -> dict[str, list[str]]:
    proc = arpipe("plan", pipeline, *extra, cwd=folder)
    if proc.returncode != 0:
        raise AssertionError(f"arpipe plan exited {proc.returncode}: {proc.stderr.strip()}")
    return {line.split()[0]: line.split(None, 4) for line in proc.stdout.splitlines()[1:] if line.strip()}


def trust_problems(folder: Path, pipeline: str, storage: str, stages: list[str]) -> list[str]:
    """What `arpipe plan` trusts must be committed and whole, and what is committed must be trusted."""
    problems = []
    rows = plan_rows(folder, pipeline)
    for stage in stages:
        row = rows.get(stage)
        if row is None:
            problems.append(f"plan has no row for {stage}")
            continue
        out = stage_dir(folder / storage, stage)
        why_not = committed(out) if out is not None else "no output folder"
        if row[2] == "cached" and why_not is not None:
            problems.append(f"plan trusts {stage} ({row[4]}) although {why_not}")
        if row[2] != "cached" and why_not is None:
            problems.append(f"plan redoes {stage} ({row[2]}: {row[4]}) although its output is committed and whole")
    return problems


def compare_outputs(ref_dir: Path, run_dir: Path, volatile: tuple[str, ...]) -> list[str]:
    """The run's outputs.json against the reference's: named outputs and every file's digest."""
    ref = json.loads((ref_dir / "outputs.json").read_text())
    run = json.loads((run_dir / "outputs.json").read_text())
    problems = []
    if ref["fingerprint"] != run["fingerprint"]:
        problems.append(f"fingerprint {run['fingerprint'][:12]} != reference {ref['fingerprint'][:12]}")
    for name, value in ref["outputs"].items():
        got = run["outputs"].get(name, {}).get("digest")
        if got != value["digest"]:
            problems.append(f"output {name!r}: digest {got} != reference {value['digest']}")
    if set(ref["files"]) != set(run["files"]):
        extra, missing = set(run["files"]) - set(ref["files"]), set(ref["files"]) - set(run["files"])
        problems.append(f"files differ: extra {sorted(extra)[:5]}, missing {sorted(missing)[:5]}")
    for rel, info in ref["files"].items():
        if any(fnmatch.fnmatch(rel, pattern) for pattern in volatile):
            continue
        if rel in run["files"] and run["files"][rel]["digest"] != info["digest"]:
            problems.append(f"file {rel} differs from the reference run")
    return problems


def leaks(secrets: dict[str, str], texts: dict[str, str], roots: list[Path], skip: set[str] = frozenset()) -> list[str]:
    """Where any secret appears (as is, or JSON-escaped): in ``texts`` or any file below ``roots``."""
    forms = {name: {value, json.dumps(value)[1:-1]} for name, value in secrets.items()}
    found = [f"{name} in {where}" for where, text in texts.items() for name, values in forms.items()
             if any(v in text for v in values)]
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.name in skip:
                continue
            data = path.read_bytes()
            found += [f"{name} in {path.relative_to(root)}" for name, values in forms.items()
                      if any(v.encode() in data for v in values)]
    return found


# ------------------------------------------------------------------------------ stage kinds


@dataclass
class Kind:
    """One stage kind under fire: its stage, how to count its resumable units, when to kill it.

    ``units(out_dir)`` maps each committed resumable unit to an identity of its bytes (inode,
    size, mtime): a unit redone gets a new identity. ``keep`` is ``"all"`` when every committed
    unit must survive every kill, ``"latest"`` when only the newest must (checkpoints are pruned).
    ``resumed(output, before)`` names a problem when an attempt's output shows it resumed from
    anything but the committed units ``before``; ``cut_off(out_dir, before, after, since)``
    counts units begun in an attempt and lost to its kill (None: not observable, bounded by
    the resume check).
    """

    kind: str
    stage: str
    block: str
    unit: str                                     # its resumable unit, in words (docs/reliability.md)
    units: Callable[[Path], dict[str, Any]]
    worker: str                                   # command line of the stage's Ray worker (ray::...)
    also_quiet: tuple[str, ...] = ()              # other processes of its job that write (a controller)
    wait_units: tuple[int, ...] = (0,)
    start_window: float = 5.0                     # m == 0: kill within this many s of the stage's start
    unit_window: float = 0.5                      # m > 0: kill within this many s of the m-th unit
    keep: str = "all"
    resumed: Callable[[str, dict[str, Any]], str | None] = lambda output, before: None
    cut_off: Callable[[Path, dict, dict, float], int | None] = lambda out, before, after, since: None
    final_check: Callable[[Path], list[str]] = lambda out: []
    volatile: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    total_units: int | None = None
    needs_model: bool = False                     # its block names {model} / {samples}: a trained model
    # the final run starts it over: its workers live only while units are left (an actor pool), and the few
    # an interrupted run leaves can all finish between two looks for a worker to kill
    final_from_scratch: bool = False


CAMPAIGN_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAKILLCAMPAIGN0042",
                    "AWS_SECRET_ACCESS_KEY": "kIlLcAmPaIgN/sEcReT+0042/wJalrXUtnFEMI"}


@dataclass
class Hit:
    """What one attempt did to one kind's stage."""

    killed: bool                 # the SIGKILL landed while the stage was running and uncommitted
    new_units: int
    cut_off: int | None
    problems: list[str]


@dataclass
class Attempt:
    number: int
    trigger: str
    sent: bool                   # a SIGKILL was sent to the running `arpipe run`
    exit_code: int
    seconds: float
    hits: dict[str, Hit]


@dataclass
class CampaignResult:
    kinds: list[str]
    attempts: list[Attempt] = field(default_factory=list)
    restarts_from_scratch: dict[str, int] = field(default_factory=dict)
    worker_killed: dict[str, bool] = field(default_factory=dict)
    final_problems: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)    # CAMPAIGN_SECRETS found in files or output
    seconds: float = 0.0

    def kills(self, kind: str) -> int:
        return sum(a.hits[kind].killed for a in self.attempts if kind in a.hits)

    def attempt_problems(self, kind: str) -> list[str]:
        return [f"#{a.number}: {p}" for a in self.attempts if kind in a.hits for p in a.hits[kind].problems]

    def report(self, kind: str) -> str:
        lines = [f"{kind}: {self.kills(kind)} kills in {len(self.attempts)} attempts of {'+'.join(self.kinds)}, "
                 f"{self.restarts_from_scratch.get(kind, 0)} restarts from scratch, "
                 f"worker killed: {self.worker_killed.get(kind, False)}, campaign {self.seconds:.0f} s"]
        for a in self.attempts:
            hit = a.hits.get(kind)
            if hit is not None:
                lines.append(f"  #{a.number} {a.trigger}: killed={hit.killed} exit={a.exit_code} "
                             f"+{hit.new_units} units cut_off={hit.cut_off} {a.seconds:.1f}s {'; '.join(hit.problems)}")
        lines += [f"  FINAL: {p}" for p in self.final_problems.get(kind, [])] + [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def latest(units: dict[str, Any]) -> Any:
    return max(units.values()) if units else None


class Campaign:
    """Runs a group of :class:`Kind` s, one independent stage each, through the phases in the module doc.

    Every attempt is one `arpipe run` of all their stages; its kill moment is drawn for one kind
    still short of kills (the trigger), and the kill counts for every stage it interrupted.
    A stage that commits before it has its kills is started over (its folder removed).
    """

    PIPELINE = "pipeline.yaml"

    def __init__(self, kinds: list[Kind], folder: Path, ray, seed: int, assets: dict[str, str], kills: int):
        self.kinds, self.folder, self.ray, self.kills = kinds, folder, ray, kills
        self.rng = random.Random(f"{seed}:{'+'.join(k.kind for k in kinds)}")
        # credentials in the environment, as on a cloud machine: no file or line the campaign leaves may hold them
        self.env = {"RAY_ADDRESS": ray.address, "ARPIPE_FAULT_LOG": str(folder / "work.log"), **CAMPAIGN_SECRETS}
        self.outputs: dict[str, str] = {}
        folder.mkdir(parents=True, exist_ok=True)
        blocks = "".join(kind.block.format(**assets) for kind in kinds)
        (folder / self.PIPELINE).write_text(f"name: fault-{'-'.join(k.kind for k in kinds)}\nstorage: ./runs\n"
                                            f"stages:\n{blocks}")
        for kind in kinds:
            for name, body in kind.files.items():
                (folder / name).write_text(body)
        self.result = CampaignResult([k.kind for k in kinds])

    # -- helpers --------------------------------------------------------------
    def out_dir(self, kind: Kind, storage: str = "runs") -> Path | None:
        return stage_dir(self.folder / storage, kind.stage)

    def units(self, kind: Kind) -> dict[str, Any]:
        out = self.out_dir(kind)
        return kind.units(out) if out is not None else {}

    def progress(self, kind: Kind) -> int:
        units = self.units(kind)
        return len(units) if kind.keep == "all" else (latest(units) or 0)

    def quiet(self, job: str | None, timeout: float = 60) -> None:
        """Wait until the killed run's stage workers are gone (Ray reaps a dead driver's work), so that
        none of them still writes while the next attempt starts."""
        markers = [m for kind in self.kinds for m in (kind.worker, *kind.also_quiet)]
        deadline = time.time() + timeout
        while job is not None and time.time() < deadline and \
                any(self.ray.processes(marker, job=job) for marker in markers):
            time.sleep(0.1)

    def spawn(self, *extra: str) -> LiveRun:
        return LiveRun(self.folder, ["run", self.PIPELINE, *extra], self.env, nice=BACKGROUND_NICE)

    def started(self, run: LiveRun, kind: Kind) -> bool:
        return any(s in ("running", "resuming") for s in run.states(kind.stage))

    def short_of_kills(self) -> list[Kind]:
        return [k for k in self.kinds if self.result.kills(k.kind) < self.kills]

    # -- phases ---------------------------------------------------------------
    def reference(self) -> None:
        """The undisturbed run, on its own storage; it runs beside the attempts (it only has to end first)."""
        env = {**self.env, "ARPIPE_FAULT_LOG": str(self.folder / "ref.log")}
        try:   # background work: it may wait long for a core (on a fresh CI machine it took over 600 s)
            proc = arpipe("run", self.PIPELINE, "-s", "storage=./ref", cwd=self.folder, env=env, timeout=PATIENCE)
        except subprocess.TimeoutExpired as err:   # its output comes as bytes, whatever `text` was
            output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
            self.result.problems.append(f"the reference run did not finish within {PATIENCE:.0f} s: "
                                        f"{output[-3000:]}")
            return
        self.outputs["reference run"] = proc.stdout + proc.stderr
        if proc.returncode != 0:
            self.result.problems.append(f"reference run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")

    def attempt(self, number: int) -> Attempt:
        trigger_kind = self.rng.choice(self.short_of_kills())
        before = {k.kind: self.units(k) for k in self.kinds}
        start_progress = self.progress(trigger_kind)
        since = time.time()
        run = self.spawn()
        trigger, sent = f"{trigger_kind.kind}: never started", False
        if run.wait_until(lambda: self.started(run, trigger_kind), timeout=PATIENCE):
            m = self.rng.choice(trigger_kind.wait_units)
            if trigger_kind.total_units is not None:   # units left over from an earlier attempt: kill during the rest
                m = min(m, max(0, trigger_kind.total_units - start_progress))
            window = trigger_kind.start_window if m == 0 else trigger_kind.unit_window
            delay = self.rng.uniform(0, window)
            trigger = f"{trigger_kind.kind}: after {m} unit(s) + {delay:.2f} s"
            if m == 0 or run.wait_until(lambda: self.progress(trigger_kind) >= start_progress + m, timeout=PATIENCE):
                time.sleep(delay)
            sent = run.kill()
        code = run.finish()
        self.outputs[f"attempt {number}"] = run.output
        self.quiet(self.ray.job_of(run.proc.pid, timeout=0.5))   # its log outlives the driver
        hits = {}
        trusted = trust_problems(self.folder, self.PIPELINE, "runs", [k.stage for k in self.kinds])
        for kind in self.kinds:
            hits[kind.kind] = self.check(kind, run, before[kind.kind], since, sent, code,
                                         [p for p in trusted if f" {kind.stage} " in f" {p} "])
        return Attempt(number, trigger, sent, code, time.time() - since, hits)

    def check(self, kind: Kind, run: LiveRun, before: dict, since: float, sent: bool, code: int,
              problems: list[str]) -> Hit:
        """One kind after an attempt: trust, kept units, exact resume, at most one unit cut off."""
        out = self.out_dir(kind)
        after = self.units(kind)
        was_running = self.started(run, kind) and "done" not in run.states(kind.stage)
        killed = sent and was_running and (out is None or committed(out) is not None)
        if not sent and code != 0:
            problems.append(f"exited {code} without being killed: {run.output[-1500:]}")
        if kind.keep == "all":
            lost = [u for u, ident in before.items() if after.get(u) != ident]
            if lost:
                problems.append(f"committed units redone or lost: {lost[:5]}")
        elif (latest(after) or 0) < (latest(before) or 0):
            problems.append(f"latest unit went back from {latest(before)} to {latest(after)}")
        resumed = kind.resumed(run.output, before)
        if resumed:
            problems.append(resumed)
        cut = kind.cut_off(out, before, after, since) if (out is not None and killed) else None
        if cut is not None and cut > 1:
            problems.append(f"{cut} units begun and lost at one kill (at most 1 allowed)")
        new = len(set(after) - set(before)) if kind.keep == "all" else (latest(after) or 0) - (latest(before) or 0)
        return Hit(killed, new, cut, problems)

    def final(self) -> None:
        """A clean rerun in which one Ray worker of each stage is SIGKILLed mid-work; it must finish on its own."""
        before = {k.kind: self.units(k) for k in self.kinds}
        start = {k.kind: self.progress(k) for k in self.kinds}
        run = self.spawn()
        job = None
        pending = {k.kind: k for k in self.kinds}
        delays = {k.kind: self.rng.uniform(0, 0.3) for k in self.kinds}
        deadline = time.time() + PATIENCE
        while pending and run.alive() and time.time() < deadline:
            job = job or self.ray.job_of(run.proc.pid)
            for name, kind in list(pending.items()):
                if job is None or not self.started(run, kind):
                    continue
                left = (kind.total_units or 0) - start[name]
                if left >= 3 and self.progress(kind) < start[name] + 1:
                    continue   # kill it mid-work, not while it starts
                workers = self.ray.processes(kind.worker, job=job)
                if workers:
                    time.sleep(delays[name])
                    for proc in workers:
                        try:
                            proc.kill()
                            self.result.worker_killed[name] = True
                        except Exception:
                            pass
                    del pending[name]
            time.sleep(0.05)
        code = run.finish(timeout=PATIENCE)
        self.outputs["final run"] = run.output
        for kind in self.kinds:
            problems = self.result.final_problems.setdefault(kind.kind, [])
            if code != 0 or run.states(kind.stage)[-1:] != ["done"]:
                problems.append(f"final run exited {code}, {kind.stage} went {run.states(kind.stage)}: "
                                f"{run.output[-3000:]}")
                continue
            resumed = kind.resumed(run.output, before[kind.kind])
            if resumed:
                problems.append(resumed)
            out, ref = self.out_dir(kind), self.out_dir(kind, "ref")
            problems += [f"not committed: {why}" for why in [committed(out)] if why]
            problems += compare_outputs(ref, out, kind.volatile)
            problems += kind.final_check(out)
        trusted = trust_problems(self.folder, self.PIPELINE, "runs", [k.stage for k in self.kinds])
        for kind in self.kinds:
            self.result.final_problems[kind.kind] += [p for p in trusted if f" {kind.stage} " in f" {p} "]

    def run(self) -> CampaignResult:
        started = time.time()
        reference = threading.Thread(target=self.reference, name="reference", daemon=True)
        reference.start()
        try:
            number = 0
            while self.short_of_kills() and number < 3 * self.kills:
                number += 1
                self.result.attempts.append(self.attempt(number))
                for kind in self.short_of_kills():
                    out = self.out_dir(kind)
                    if out is not None and committed(out) is None:
                        # finished before enough kills landed: start the stage over (same fingerprint)
                        self.result.restarts_from_scratch[kind.kind] = \
                            self.result.restarts_from_scratch.get(kind.kind, 0) + 1
                        shutil.rmtree(out)
            reference.join()
            for kind in self.kinds:
                out = self.out_dir(kind)
                if out is not None and (committed(out) is None or kind.final_from_scratch):
                    # it finished in a later attempt, once it had its kills (or its workers outlive only
                    # the units left): the final run must still find it at work to kill one of its Ray
                    # workers, so it starts over
                    shutil.rmtree(out)
            if not self.result.problems:
                self.final()
            self.result.leaks = leaks(CAMPAIGN_SECRETS, self.outputs, [self.folder])
        except Exception as err:  # surfaced by the tests that read the result
            self.result.problems.append(f"{type(err).__name__}: {err}")
        self.result.seconds = time.time() - started
        return self.result


@dataclass
class Handle:
    """A campaign running in its thread; ``campaign`` is set once its assets are ready."""

    thread: threading.Thread | None = None
    campaign: Campaign | None = None
    error: str | None = None


def start_campaigns(groups: list[list[Kind]], root: Path, ray, seed: int,
                    assets: Callable[[list[Kind]], dict[str, str]], kills: int) -> dict[str, Handle]:
    """One campaign per group of kinds, ``kills`` kills of each kind, each in its thread once
    ``assets(group)`` (which may wait) returns.

    Returns kind -> the handle of its group's campaign.
    """
    handles: dict[str, Handle] = {}
    for group in groups:
        handle = Handle()

        def work(group: list[Kind] = group, handle: Handle = handle) -> None:
            try:
                handle.campaign = Campaign(group, root / "-".join(k.kind for k in group), ray, seed, assets(group),
                                           kills)
            except Exception as err:
                handle.error = f"the campaign could not start: {type(err).__name__}: {err}"
                return
            handle.campaign.run()

        handle.thread = threading.Thread(target=work, name=f"campaign-{group[0].kind}", daemon=True)
        handle.thread.start()
        for kind in group:
            handles[kind.kind] = handle
    return handles
