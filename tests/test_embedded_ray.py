"""An `arpipe run` on an embedded Ray next to another local Ray: its dashboard agent does not take the port
(52365) that `ray start --head` wants, so a local cluster started while a run goes still accepts jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

#: an embedded Ray as `arpipe run` starts it (pipeline.remote.connect_ray); prints where its agent listens
PROBE = textwrap.dedent("""
    import json, os, socket, sys, time
    import ray

    from arpipe.pipeline.remote import connect_ray

    if sys.argv[1] == "arpipe":
        connect_ray(num_cpus=1)
    else:   # what arpipe replaced: a plain ray.init with the same options
        ray.init(num_cpus=1, include_dashboard=False, dashboard_host="127.0.0.1")
    # the agent records the port it bound in the session folder (-1: its HTTP server did not start)
    node = ray._private.worker._global_node
    record = f"{node.get_session_dir_path()}/dashboard_agent_listen_port_{node.node_id}"
    deadline = time.time() + 180
    while not os.path.exists(record) and time.time() < deadline:
        time.sleep(0.5)
    with open(record) as f:
        http_port = int(f.read().strip())
    ip = node.node_ip_address
    answers = False
    if http_port > 0:
        with socket.socket() as s:
            answers = s.connect_ex((ip, http_port)) == 0
    print(json.dumps({"port": http_port, "answers": answers}))
    ray.shutdown()
""")


def _agent(how: str) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_embedded_rays_dashboard_agent_listens_on_a_free_port_not_52365(ray_cluster):
    # the test session's own Ray runs meanwhile, as another local Ray would
    ours = _agent("arpipe")
    assert ours["port"] not in (52365, -1, 0) and ours["answers"], ours
    # the check can fail: Ray's default puts every embedded agent on 52365, where only the first one binds
    plain = _agent("plain")
    assert plain["port"] in (52365, -1), plain
