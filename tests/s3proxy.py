"""An S3-compatible store that ignores conditional writes, for the tests.

moto's server honours ``If-None-Match`` (a second create is answered 412), as AWS S3,
MinIO and SeaweedFS do; some S3-compatible stores do not. :class:`IgnoringProxy` sits
in front of a moto server on 127.0.0.1 and forwards every request without its
``If-None-Match`` header, so creates always succeed: the behaviour of such a store.
moto does not check signatures, so dropping a signed header is harmless there.
"""

from __future__ import annotations

import http.client
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: headers that belong to one connection, not to the request or response being forwarded
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-connection", "proxy-authorization"}


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: IgnoringProxy

    def _forward(self) -> None:
        if "If-None-Match" in self.headers:
            with self.owner.mutex:
                self.owner.dropped += 1
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "if-none-match"}
        conn = http.client.HTTPConnection(*self.owner.moto.get_host_and_port(), timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
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


class IgnoringProxy:
    """A moto server behind a proxy that drops ``If-None-Match``; ``env`` points AWS clients at it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server: ThreadingHTTPServer | None = None
        self.dropped = 0   # requests whose If-None-Match was dropped
        self.mutex = threading.Lock()

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "ignoring-key", "AWS_SECRET_ACCESS_KEY": "ignoring-secret",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    def start(self) -> IgnoringProxy:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)   # moto's server logs every request otherwise
        self.moto.start()
        handler = type("Forward", (_Forward,), {"owner": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="s3-ignoring-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self.moto.stop()
