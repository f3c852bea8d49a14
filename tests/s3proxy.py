"""HTTP relays in front of an S3 server, for the tests: one that ignores conditional writes, one that counts.

moto's server honours ``If-None-Match`` (a second create is answered 412), as AWS S3,
MinIO and SeaweedFS do; some S3-compatible stores do not. :class:`IgnoringProxy` sits
in front of a moto server on 127.0.0.1 and forwards every request without its
``If-None-Match`` header, so creates always succeed: the behaviour of such a store.
moto does not check signatures, so dropping a signed header is harmless there.

:class:`CountingProxy` sits in front of any S3 server (the suite's SeaweedFS, which
checks SigV4 signatures: the client's headers, ``Host`` included, are forwarded as
signed) and counts the requests and the response body bytes it relays: the bytes a
client really had transferred, whatever library made the requests.
"""

from __future__ import annotations

import http.client
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

#: headers that belong to one connection, not to the request or response being forwarded
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-connection", "proxy-authorization", "expect"}


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # a response's headers and body go out as written, not 40 ms apart
    owner: Relay

    def _forward(self) -> None:
        owner = self.owner
        drop = owner.drops_if_none_match and "If-None-Match" in self.headers
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP and not (drop and k.lower() == "if-none-match")}
        conn = http.client.HTTPConnection(*owner.upstream(), timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        with owner.mutex:
            owner.dropped += drop
            owner.requests += 1
            owner.bytes_served += len(data) if self.command != "HEAD" else 0
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else
                                               response.getheader("Content-Length") or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    def log_message(self, format: str, *args) -> None:   # quiet: the tests read their own output
        pass


class Relay:
    """A threaded HTTP relay on 127.0.0.1 to :meth:`upstream`; ``env`` points AWS clients at it.

    ``requests`` and ``bytes_served`` (response bodies relayed, headers not counted) grow with every request;
    :meth:`reset` zeroes them.
    """

    drops_if_none_match = False
    access_key, secret_key = "ignoring-key", "ignoring-secret"

    def __init__(self) -> None:
        self.server: ThreadingHTTPServer | None = None
        self.mutex = threading.Lock()
        self.dropped = 0   # requests whose If-None-Match was dropped
        self.requests = 0
        self.bytes_served = 0

    def upstream(self) -> tuple[str, int]:
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    def reset(self) -> None:
        with self.mutex:
            self.requests = self.bytes_served = self.dropped = 0

    def start(self) -> Relay:
        handler = type("Forward", (_Forward,), {"owner": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name=f"s3-{type(self).__name__}", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class IgnoringProxy(Relay):
    """A moto server behind a relay that drops ``If-None-Match``."""

    drops_if_none_match = True

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        super().__init__()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)

    def upstream(self) -> tuple[str, int]:
        return self.moto.get_host_and_port()

    def start(self) -> IgnoringProxy:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)   # moto's server logs every request otherwise
        self.moto.start()
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self.moto.stop()


class CountingProxy(Relay):
    """A relay to the S3 server at ``endpoint`` (signing with its keys) that counts what it serves."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str) -> None:
        super().__init__()
        url = urlsplit(endpoint)
        self._upstream = (url.hostname or "127.0.0.1", url.port or 80)
        self.access_key, self.secret_key = access_key, secret_key

    def upstream(self) -> tuple[str, int]:
        return self._upstream
