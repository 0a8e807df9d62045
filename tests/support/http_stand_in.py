"""What the HTTP API stand-ins (Kubernetes, KFP, Vertex) share: a threaded server on a free
loopback port, quiet request handlers, and JSON bodies in and out."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output clean
        pass

    def read_json(self, empty: Any = None) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else empty

    def send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def forwarding_handler(stand_in: Any) -> type[QuietHandler]:
    """A handler that passes every GET and POST to ``stand_in._handle(handler, method)``."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            stand_in._handle(self, "GET")

        def do_POST(self) -> None:  # noqa: N802
            stand_in._handle(self, "POST")

    return Handler


class LoopbackServer:
    """``handler`` served on 127.0.0.1 at a free port from a daemon thread, until ``stop()``;
    over HTTPS with ``tls`` (a server-side context).
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str, tls: ssl.SSLContext | None = None):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name=name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
