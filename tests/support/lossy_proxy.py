"""An HTTP proxy on loopback that loses chosen responses: the request reaches the server, the
client never hears back (its connection is closed), as when a response is lost in the network.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from tests.support.http_stand_in import LoopbackServer, QuietHandler

# Headers that describe one hop, not the message (RFC 9110 7.6.1).
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


class LossyProxy:
    """Forwards every request to ``upstream``; loses the response of the first ``losses`` requests
    that ``lose`` picks (called with the method and the path with its query).

    Attributes:
        url: The proxy's ``http://127.0.0.1:PORT``.
        lost: ``(method, path)`` of each request whose response was lost, in order.
    """

    def __init__(self, upstream: str, lose: Callable[[str, str], bool], losses: int = 1):
        self.lost: list[tuple[str, str]] = []
        lock = threading.Lock()
        target = urlsplit(upstream)
        proxy = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                try:
                    upstream_conn.request(self.command, self.path, body=body, headers=headers)
                    response = upstream_conn.getresponse()
                    payload = response.read()
                finally:
                    upstream_conn.close()
                with lock:
                    losing = len(proxy.lost) < losses and lose(self.command, self.path)
                    if losing:
                        proxy.lost.append((self.command, self.path))
                if losing:
                    self.close_connection = True  # the server acted; the client hears nothing
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP | {"content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward  # noqa: N815 - http.server's naming

        self._server = LoopbackServer(Handler, "lossy-proxy")
        self.url = self._server.url

    def stop(self) -> None:
        self._server.stop()
