"""Where stages run: joining Ray, and whether that place can see this run's storage and lineage and has
the GPUs a stage asks for.

``arpipe run --address`` joins an existing Ray cluster (or starts an embedded
one). Stages run on whichever node Ray picks. A local ``storage:`` folder or a
SQLite/file MLflow store lives on the submitting machine only, so on a
multi-node cluster the workers would write outputs nobody else sees and the
lineage would land in a file on some node. That is found here, in one line,
instead of after an hour of training. These checks import neither ray nor
mlflow. A stage that asks for GPUs no node has and none will bring would wait
for good (Ray keeps such a task pending for an autoscaler): :func:`require_gpus`,
which asks the connected Ray, says so in one line instead.

This is the orchestrator's side of a cluster; ``arpipe.cluster`` (``submit``,
``jobs``) builds on it and the orchestrator never imports ``arpipe.cluster``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from arpipe.pipeline.errors import UserError
from arpipe.pipeline.storage import is_s3

if TYPE_CHECKING:
    from arpipe.pipeline.config import LoadedPipeline

#: seconds a stage waits for a node with the GPUs it asks for to join a cluster that may add one
GPU_WAIT_ENV = "ARPIPE_GPU_WAIT_S"
GPU_WAIT_S = 600.0
#: whether this process started the Ray it is connected to (an embedded Ray never gains nodes)
_embedded = False

#: addresses that name "this machine" without looking anything up
LOCAL_NAMES = {"", "local", "auto", "localhost", "localhost.localdomain"}
SHARED_FIX = ("use storage: s3://BUCKET/PREFIX (AWS_* settings on the cluster) and an MLflow server "
              "(MLFLOW_TRACKING_URI=http://MLFLOW:5000, see cluster/README.md), "
              "or pass --allow-local-storage if every node mounts the same paths")


def address_host(address: str) -> str:
    """The host part of a Ray address: ``http://h:8265``, ``ray://h:10001``, ``h:6379``, ``[::1]:6379`` or ``h``."""
    text = address.strip()
    if "://" not in text:
        text = f"ray://{text}"
    try:
        host = urlsplit(text).hostname
    except ValueError:
        return address.strip()
    return host or ""


def _this_machine_ips() -> set[str]:
    try:
        import psutil
    except ImportError:
        return set()
    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


def is_local_address(address: str | None) -> bool:
    """True when the Ray head is this machine: none given, ``local``/``auto``, loopback, or one of our own IPs.

    Ray advertises a node by its interface address (e.g. ``10.1.2.3:6379``) even on a
    laptop, so "local" cannot mean only 127.0.0.1. Host names are not resolved: a name
    other than localhost is taken as another machine, the safe side.
    """
    if address is None:
        return True
    host = address_host(address).lower()
    if host in LOCAL_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or str(ip) in _this_machine_ips()


def _tracking_problem(tracking_uri: str) -> str | None:
    """Why workers on other nodes cannot reach this MLflow tracking URI, or None if they can."""
    if tracking_uri.split(":")[0].lower() == "databricks":
        return None
    scheme = urlsplit(tracking_uri).scheme.lower() if "://" in tracking_uri else ""
    if scheme in ("sqlite", "file", ""):
        return f"MLflow tracking {tracking_uri} is a file on this machine"
    if scheme in ("http", "https", "postgresql", "postgres", "mysql", "mssql") or scheme.startswith(
            ("postgresql+", "mysql+", "mssql+")):
        host = (urlsplit(tracking_uri).hostname or "").lower()
        if host == "localhost" or _is_loopback(host):
            return f"MLflow tracking {tracking_uri} names this machine's loopback, which on the cluster is the node itself"
    return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_cluster_ready(loaded: LoadedPipeline, address: str | None, tracking_uri: str,
                        allow_local_storage: bool, node_ips: Collection[str] | None = None) -> None:
    """Raise a one-line :class:`UserError` when a remote cluster could not see this run's storage or lineage.

    ``address`` is where stages will run (a GCS, Ray Client or dashboard address;
    None for an embedded Ray). ``node_ips``, when the caller could ask the cluster,
    decides instead of the address: a dashboard port-forwarded to 127.0.0.1 (``ray
    dashboard``, ``kubectl port-forward``) looks local but its nodes are not. A local
    cluster, or ``allow_local_storage`` (every node mounts the same paths, e.g. NFS),
    passes whatever the storage.
    """
    if allow_local_storage:
        return
    if node_ips:
        ours = _this_machine_ips()
        remote = sorted(ip for ip in node_ips if ip not in ours and not _is_loopback(ip))
        if not remote:
            return
        cluster = f"the Ray cluster behind {address_host(address or '')} (nodes at {', '.join(remote[:3])})"
    elif is_local_address(address):
        return
    else:
        cluster = f"the Ray cluster at {address_host(address or '')}"
    problems = []
    where = None
    storage = loaded.spec.storage
    if not is_s3(storage):
        problems.append(f"storage {storage} is a folder on this machine")
        where = loaded.where("storage")
    tracking = _tracking_problem(tracking_uri)
    if tracking:
        problems.append(tracking)
    if not problems:
        return
    raise UserError(f"{' and '.join(problems)}, but stages run on {cluster}, whose nodes cannot reach it",
                    where=where or str(loaded.path), fix=SHARED_FIX)


def env_allows_local_storage() -> bool:
    """``ARPIPE_ALLOW_LOCAL_STORAGE=1`` does what ``--allow-local-storage`` does.

    ``arpipe submit --allow-local-storage`` sets it in the job's environment, so the
    ``arpipe run`` the job starts on the cluster agrees with what was allowed here.
    """
    return os.environ.get("ARPIPE_ALLOW_LOCAL_STORAGE", "").lower() in ("1", "true", "yes")


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Initialise Ray once per process; returns a description of where stages run.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; otherwise a local
    Ray starts inside this process, with no dashboard (bound to 127.0.0.1 if asked for).
    """
    import ray

    global _embedded
    if ray.is_initialized():
        return f"Ray at {ray.get_runtime_context().gcs_address}"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"Ray cluster at {address}"
    with agent_on_free_port():
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, dashboard_host="127.0.0.1",
                 log_to_driver=True)
    _embedded = True
    return f"local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def require_gpus(per_task: float, *, where: str, say: Callable[[str], None]) -> None:
    """Return once a node of the Ray cluster can hold a task of ``per_task`` GPUs; raise a one-line
    :class:`UserError` when none can and none will join.

    Ray keeps a task that no node can hold pending for good, in case an autoscaler adds a node, so a GPU
    request on a cluster without GPUs would hang the stage. A live node with the GPUs passes at once.
    Otherwise: where the autoscaler publishes its node groups (autoscaler v2, e.g. KubeRay; read as Ray
    Train reads them before it places its workers) a group with the GPUs passes (Ray waits for the node)
    and none fails; a Ray embedded in this process cannot grow and fails; any other cluster (the cluster
    launcher's autoscaler, whose node types Ray does not publish) gets ``ARPIPE_GPU_WAIT_S`` seconds (600)
    for such a node to join, ``say`` telling the user it waits. ``where`` names the config field.
    """
    import ray

    def most_on_one_node() -> float:
        return max((float(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)

    if per_task <= 0 or most_on_one_node() >= per_task:
        return
    groups = _autoscaler_gpus()
    if groups is not None and any(g >= per_task for g in groups):
        return
    wait = 0.0 if groups is not None or _embedded else float(os.environ.get(GPU_WAIT_ENV, GPU_WAIT_S))
    if wait > 0:
        say(f"no Ray node has {per_task:g} GPU(s) yet: waiting up to {wait:g} s for one to join (an autoscaler's "
            f"GPU node; {GPU_WAIT_ENV} sets how long)")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            if most_on_one_node() >= per_task:
                return
    most = most_on_one_node()
    has = "a GPU" if most == 0 else f"more than {most:g}"
    why = ("its autoscaler adds none" if groups is not None else "it is the Ray this run started, on this machine "
           "alone" if _embedded else f"none joined within {wait:g} s")
    raise UserError(f"asks for {per_task:g} GPU(s) per task, but no node of the Ray cluster has {has} ({why})",
                    where=where, fix="set it to 0 to run on CPUs, or run on a Ray cluster with GPU nodes "
                                     "(--address, docs/cluster.md)")


def _autoscaler_gpus() -> list[float] | None:
    """GPUs per node of each node group the cluster's autoscaler can still start (None: not published)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except (ImportError, AttributeError):   # a Ray without it: as if not published
        return None
    if config is None or not config.node_group_configs:
        return None
    return [float(group.resources.get("GPU", 0)) for group in config.node_group_configs if group.max_count != 0]


@contextlib.contextmanager
def agent_on_free_port() -> Iterator[None]:
    """An embedded Ray's dashboard agent on a port the OS picks, not Ray's fixed 52365.

    Every other port an embedded Ray binds is already picked free; the agent's HTTP port is the one that
    ``ray start --head`` also wants, so a local cluster started next to an ``arpipe run`` would lose its
    agent (and accept no job). ``ray start`` has ``--dashboard-agent-listen-port``; ``ray.init`` does not
    pass one on, so its default is set to 0 (the agent binds a free port and records it in the GCS, where
    Ray's own clients look it up) for the ``ray.init`` call in the block. This reaches into Ray's private
    ``RayParams`` (the one way short of running ``ray start`` as a separate process, whose lifetime would
    then be arpipe's to manage): where a Ray version has no such parameter the block changes nothing, and
    tests/test_embedded_ray.py says so.
    """
    import inspect

    from ray._private import parameter

    original = parameter.RayParams.__init__
    if "dashboard_agent_listen_port" not in inspect.signature(original).parameters:
        yield
        return

    def free_agent_port(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = free_agent_port
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original
