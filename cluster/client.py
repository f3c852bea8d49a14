"""A plain client for one Ray cluster's Jobs API: its address, its token, and the calls arpipe makes.

Everything goes through Ray's public Jobs API (``JobSubmissionClient``), so
``ray job ...`` and the dashboard see the same jobs. Every problem a user can
fix (address, reachability, token, a missing job) is one :class:`UserError`
line with the fix. No argparse and no printing here: the commands in
:mod:`arpipe.cluster.commands` decide what a user sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from arpipe.pipeline.errors import UserError

DASHBOARD_PORT = 8265
#: the ports of a Ray head that are not the Jobs API, to say so when someone points at them
OTHER_RAY_PORTS = {6379: "the GCS port", 10001: "the Ray Client port"}
#: job states after which nothing changes
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_FIX = ("get the cluster's token (on the head: `ray get-auth-token`; on KubeRay: its Secret) and "
             "export RAY_AUTH_TOKEN=..., or save it to ~/.ray/auth_token or a file named by RAY_AUTH_TOKEN_PATH")


# -- address ---------------------------------------------------------------------

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


def job_url(url: str, submission_id: str) -> str:
    """The dashboard page of one job."""
    return f"{url}/#/jobs/{submission_id}"


# -- token -----------------------------------------------------------------------

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


# -- what the Jobs API raises, as one line -------------------------------------------

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
        raise UserError(f"authentication failed: {first_line(str(err))}", where=url, fix=TOKEN_FIX) from None
    except (ConnectionError, requests.exceptions.ConnectionError) as err:
        if connecting:
            raise UserError("something listens there but does not answer like a Ray dashboard", where=url,
                            fix=_port_hint(url)) from None
        raise UserError(f"lost the connection to the Ray dashboard: {first_line(str(err))}", where=url,
                        fix="check that the head is still up") from None
    except requests.exceptions.RequestException as err:
        raise UserError(f"this does not answer like a Ray dashboard: {first_line(str(err))}", where=url,
                        fix=_port_hint(url)) from None
    except ValueError as err:
        if "Package size" in str(err):
            raise UserError(f"the project is too big to upload: {first_line(str(err)).split('. ')[0]}",
                            where=url, fix="leave large folders out with --exclude (or .gitignore/.rayignore) "
                                           "and read data from S3") from None
        raise UserError(f"Ray refused the job: {first_line(str(err))}", where=url) from None
    except RuntimeError as err:
        text = str(err)
        # the message names which job is missing; it is the only place Ray says so
        missing = re.search(r"Job (\S+) does not exist", text)
        if "404" in text and missing:
            raise UserError(f"no job {missing.group(1)} on this cluster", where=url,
                            fix=f"list them with `arpipe jobs list --address {url}`") from None
        if "Version check returned 404" in text:
            raise UserError("this answers HTTP but is not a Ray dashboard", where=url, fix=_port_hint(url)) from None
        raise UserError(f"the Ray Jobs API said: {first_line(text)}", where=url) from None


def _port_hint(url: str) -> str:
    _host, port = address_host_port(url)
    other = OTHER_RAY_PORTS.get(port or 0)
    prefix = f"{port} is {other}; " if other else ""
    return f"{prefix}the Jobs API is on the dashboard port ({DASHBOARD_PORT} unless the head set --dashboard-port)"


def first_line(text: str) -> str:
    """The first non-blank line of a (possibly multi-line) message."""
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


# -- the client ------------------------------------------------------------------------

class JobsClient:
    """One cluster's Jobs API; each call's failure is one :class:`UserError` line.

    Returned job objects are Ray's own ``JobDetails`` (``submission_id``, ``status``,
    ``metadata``, ``entrypoint``, ``message``, ``start_time``/``end_time`` in ms).
    """

    def __init__(self, address: str | None):
        self.url = dashboard_address(address)
        self.token = read_auth_token()
        _probe(self.url)
        from ray.job_submission import JobSubmissionClient

        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                     "ray._private.runtime_env.packaging"):
            # their INFO lines ("Uploading package ...", "WebSocket closed") would interleave with the job's own logs
            logging.getLogger(name).setLevel(logging.WARNING)
        with jobs_api(self.url, self.token, connecting=True), _address_for_ray(self.url):
            self._ray = JobSubmissionClient(self.url, headers=self._headers() or None)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token.value}"} if self.token else {}

    def _api(self) -> contextlib.AbstractContextManager[None]:
        return jobs_api(self.url, self.token)

    def submit(self, entrypoint: str, runtime_env: dict[str, Any], metadata: dict[str, str],
               submission_id: str) -> None:
        """Start a job (uploading the runtime_env's working_dir unless the cluster has it already)."""
        with self._api():
            self._ray.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata,
                                 submission_id=submission_id)

    def status(self, submission_id: str) -> str:
        """The job's state: PENDING, RUNNING, or one of :data:`TERMINAL`."""
        with self._api():
            return str(self._ray.get_job_status(submission_id).value)

    def info(self, submission_id: str) -> Any:
        with self._api():
            return self._ray.get_job_info(submission_id)

    def jobs(self) -> list[Any]:
        """Every job the cluster knows, newest first."""
        with self._api():
            found = self._ray.list_jobs()
        return sorted(found, key=lambda job: job.start_time or 0, reverse=True)

    def logs(self, submission_id: str) -> str:
        with self._api():
            return self._ray.get_job_logs(submission_id)

    def follow(self, submission_id: str, on_chunk: Callable[[str], None]) -> str:
        """Hand each piece of the job's logs to ``on_chunk`` as it comes, until the job ends; returns them all."""
        seen: list[str] = []

        async def tail() -> None:
            async for chunk in self._ray.tail_job_logs(submission_id):
                seen.append(chunk)
                on_chunk(chunk)

        with self._api():
            asyncio.run(tail())
        return "".join(seen)

    def stop(self, submission_id: str) -> bool:
        """Ask the job to stop; False when it had already ended."""
        with self._api():
            return bool(self._ray.stop_job(submission_id))

    def node_ips(self) -> list[str]:
        """IPs of the cluster's alive nodes, from Ray's State API; empty when it cannot say (then the address decides)."""
        import requests

        params = {"limit": 1000, "detail": "false", "filter_keys": "state", "filter_predicates": "=",
                  "filter_values": "ALIVE"}
        try:
            reply = requests.get(f"{self.url}/api/v0/nodes", params=params, headers=self._headers(), timeout=10)
            reply.raise_for_status()
            nodes = reply.json()["data"]["result"]["result"]
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return []
        return [node["node_ip"] for node in nodes if node.get("node_ip")]
