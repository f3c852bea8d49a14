"""The fault suite's session fixtures, registered for the whole test session by ``tests/conftest.py``.

The kill campaigns run on their own local Ray instance (``fault_ray``), started in a subprocess
with more logical CPUs than cores, so that the campaigns (one per group of stage kinds) can each
keep their stages and an undisturbed reference run going while the others are killed and
restarted; its worker processes are the only ones the suite ever kills (each kill is aimed at one
Ray job's processes). It is the suite's background instance: it, its workers and the campaigns'
drivers run at the lowest priority (``helpers.BACKGROUND_NICE``), and the fixtures built ahead
(``tests/background.py``) run their pipelines on it too. The campaigns start with the session's
first test and run through the rest of the suite, on the cores the tests in front leave idle;
``tests/conftest.py`` orders the fault tests after the others and ``test_stage_kills.py`` at the very end,
where it reads their results.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers import BACKGROUND_NICE, start_in_own_session

RAY_HEAD = textwrap.dedent("""
    import sys
    import ray

    ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    print(ray.get_runtime_context().gcs_address, flush=True)
    print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
    sys.stdin.read()   # held until the test session closes this pipe
    ray.shutdown()
""")


@dataclass
class FaultRay:
    """A Ray instance of the suite's own: its GCS address, session folder and the process that owns it."""

    address: str
    session: Path
    head: subprocess.Popen

    def job_of(self, driver_pid: int, timeout: float = 0.0) -> str | None:
        """The Ray job id of a driver process, read off the log file Ray names after it."""
        deadline = time.time() + timeout
        while True:
            logs = list((self.session / "logs").glob(f"python-core-driver-*_{driver_pid}.log"))
            if logs:
                return logs[0].name[len("python-core-driver-"):][:8]
            if time.time() >= deadline:
                return None
            time.sleep(0.05)

    def processes(self, marker: str = "", job: str | None = None) -> list[psutil.Process]:
        """This instance's processes whose command line holds ``marker`` (Ray titles workers ``ray::<task>``),
        of Ray job ``job`` when given."""
        found = []
        try:
            children = psutil.Process(self.head.pid).children(recursive=True)
        except psutil.Error:
            return []
        for proc in children:
            try:
                if marker not in " ".join(proc.cmdline()):
                    continue
                if job is not None and proc.environ().get("RAY_JOB_ID") != job:
                    continue
                found.append(proc)
            except psutil.Error:
                continue
        return found


def extensions_with_a_stale_lock(folder: Path) -> Path:
    """A torch extensions folder of the suite's own holding the ``lock`` file a worker killed while
    JIT-building DeepSpeed's shared-memory op leaves behind (train stages once waited for it forever; they
    no longer build that op at all, and must not wait for the lock)."""
    from torch.utils import cpp_extension

    saved = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    try:
        ours = Path(cpp_extension._get_build_directory("deepspeed_shm_comm", verbose=False))
    finally:
        if saved is None:
            os.environ.pop("TORCH_EXTENSIONS_DIR")
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = saved
    ours.mkdir(parents=True, exist_ok=True)
    (ours / "lock").touch()
    return folder


@pytest.fixture(scope="session")
def fault_ray(tmp_path_factory) -> FaultRay:
    extensions = extensions_with_a_stale_lock(tmp_path_factory.mktemp("torch_extensions"))
    # background work: the instance and its workers at the lowest priority, so they take the cores only while
    # the tests in front wait
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TORCH_EXTENSIONS_DIR": str(extensions),
           "RAY_worker_niceness": str(BACKGROUND_NICE)}
    log = open(tmp_path_factory.mktemp("fault-ray") / "head.log", "w")
    # a session of its own: nothing Ray does to its process group can reach the test session's
    head = start_in_own_session([sys.executable, "-c", RAY_HEAD, "12"], BACKGROUND_NICE, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    address = head.stdout.readline().strip()
    session = head.stdout.readline().strip()
    if not address or not session:
        head.kill()
        pytest.fail(f"the suite's Ray instance did not start; see {log.name}")
    yield FaultRay(address, Path(session), head)
    head.stdin.close()
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
    log.close()


@pytest.fixture(scope="session")
def fault_digits(tmp_path_factory) -> Path:
    """240 of scikit-learn's digits as 8x8 PNGs, one folder per label."""
    from realdata import digits_folder

    return digits_folder(tmp_path_factory.mktemp("digits") / "digits", count=240)


class Assets:
    """The digits, a tokenizer artifact and a token store made from them, prepared in the background;
    on request (:meth:`with_model`), then a tiny trained model and samples drawn from it."""

    def __init__(self, ray: FaultRay, folder: Path, digits: Path):
        self.ray, self.folder, self.digits, self.value, self.error = ray, folder, digits, {}, None
        self._thread = threading.Thread(target=self._make, name="assets", daemon=True)
        self._thread.start()
        self._model_thread: threading.Thread | None = None
        self._model_lock = threading.Lock()
        self.model_value, self.model_error = {}, None

    def _make(self) -> None:
        from faults.kinds import prepare

        try:
            self.value = {"digits": str(self.digits), **prepare(self.folder, self.ray.address, self.digits)}
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"

    def _make_model(self) -> None:
        from faults.kinds import prepare_model

        try:
            self.model_value = prepare_model(self.folder, self.ray.address, self.get()["store"])
        except Exception as err:
            self.model_error = f"{type(err).__name__}: {err}"

    def get(self) -> dict[str, str]:
        self._thread.join()
        if self.error:
            raise AssertionError(f"preparing the suite's tokenizer and store failed: {self.error}")
        return self.value

    def with_model(self) -> dict[str, str]:
        """``get()`` and ``model`` (a model folder), ``samples`` (a store drawn from it), ``project`` (the folder
        that trained it, ``kinds.MODEL_PIPELINE``): made once, the suite's one small trained digits model."""
        with self._model_lock:
            if self._model_thread is None:
                self._model_thread = threading.Thread(target=self._make_model, name="model", daemon=True)
                self._model_thread.start()
        self._model_thread.join()
        if self.model_error:
            raise AssertionError(f"preparing the suite's model and samples failed: {self.model_error}")
        return {**self.get(), **self.model_value}


@pytest.fixture(scope="session")
def assets(fault_ray, fault_digits, tmp_path_factory) -> Assets:
    return Assets(fault_ray, tmp_path_factory.mktemp("prep") / "prep", fault_digits)


@pytest.fixture(scope="session")
def prepared(assets) -> dict[str, str]:
    """``digits``, ``tokenizer`` (an artifact folder) and ``store`` (a token store of the digits)."""
    return assets.get()


KILL_TEST = "test_kill_9_at_random_moments_then_a_killed_worker"


@pytest.fixture(scope="session", autouse=True)
def kill_campaigns(request, tmp_path_factory):
    """The kill campaigns of the selected stage kinds, started in the background by the session's first test.

    One campaign per group of kinds runs in a session: ``FULL_KILLS`` kills of each kind when the
    test's ``full`` case is selected, else the seeded subset of ``CI_KILLS``. They take minutes of
    mostly waiting (process and Ray Train start-up); the rest of the suite runs meanwhile, and
    ``test_stage_kills.py`` (ordered last) reads the results.
    """
    tests = [item.callspec.params for item in request.session.items
             if getattr(item, "originalname", "") == KILL_TEST]
    selected = {params["kind"] for params in tests}
    if not selected:
        yield {}
        return
    from faults.harness import start_campaigns
    from faults.kinds import GROUPS, SEED

    ray = request.getfixturevalue("fault_ray")
    ready = request.getfixturevalue("assets")
    kills = max(params["kills"] for params in tests)   # the full campaign serves the subset's test too
    groups = [[k for k in group if k.kind in selected] for group in GROUPS]
    handles = start_campaigns([g for g in groups if g], tmp_path_factory.mktemp("kills"), ray, SEED,
                              lambda group: ready.with_model() if any(k.needs_model for k in group) else ready.get(),
                              kills)
    yield handles
    for handle in handles.values():
        handle.thread.join(timeout=600)
