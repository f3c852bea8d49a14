"""Connecting to Ray: an embedded local instance, or an existing cluster."""

from __future__ import annotations

import os


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Initialise Ray once per process; returns a description of where stages run.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; otherwise a local
    Ray starts inside this process, with no dashboard (bound to 127.0.0.1 if asked for).
    """
    import ray

    if ray.is_initialized():
        return f"Ray at {ray.get_runtime_context().gcs_address}"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"Ray cluster at {address}"
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, dashboard_host="127.0.0.1",
             log_to_driver=True)
    return f"local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
