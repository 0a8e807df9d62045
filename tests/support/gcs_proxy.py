"""A latency-and-fault HTTP proxy in front of the GCS emulator, on loopback.

Test and benchmark infrastructure: it adds a fixed delay to every request, answers a share of
object reads with 503 or 429 or drops their connection halfway through the body, and counts the
object reads in flight at once. Both GCS clients reach it as they reach the emulator (set
``STORAGE_EMULATOR_HOST`` to its URL); it rewrites ``Host`` so the emulator serves the XML-API
object paths that obstore uses.

``GcsProxy`` runs one proxy in a background thread (its counters are exact). For rates beyond
one Python process, ``python -m tests.support.gcs_proxy`` serves one more process on the same
port (``SO_REUSEPORT``); start several.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Faults:
    """What the proxy does to requests.

    Attributes:
        delay: Seconds added to every request before it is forwarded.
        unavailable: Share of object reads answered 503.
        throttled: Share of object reads answered 429.
        dropped: Share of object reads whose connection is closed halfway through the body.
        seed: Seed of the draws.
    """

    delay: float = 0.0
    unavailable: float = 0.0
    throttled: float = 0.0
    dropped: float = 0.0
    seed: int = 0


@dataclass
class Counters:
    """What the proxy saw. ``native_*`` count the native reader's requests (obstore's user agent)
    apart from google-cloud-storage's.
    """

    requests: int = 0
    reads: int = 0
    bytes_out: int = 0  # response bytes sent to the clients
    reads_in_flight: int = 0
    peak_reads_in_flight: int = 0
    injected: dict[str, int] = field(default_factory=lambda: {"503": 0, "429": 0, "dropped": 0})
    native_reads: int = 0
    native_injected: int = 0


def is_native(headers: dict[str, str]) -> bool:
    """A request of the native reader: obstore sends object_store's user agent."""
    return "object_store" in headers.get("user-agent", "")


def is_object_read(method: str, target: str) -> bool:
    """A GET of an object's bytes: JSON-API media downloads and XML-API object paths."""
    if method != "GET":
        return False
    return "alt=media" in target or not target.startswith(
        ("/storage/", "/upload/", "/download/", "/_internal")
    )


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], *, to_eof: bool) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            parts.append(size_line)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    parts.append(line)
                parts.append(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size + 2))
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read() if to_eof else b""


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int) -> None:
    """Forward ``length`` body bytes as they arrive: a large ranged read is never held whole, so
    the proxy adds its delay and not a second transfer's time.
    """
    while length > 0:
        chunk = await reader.read(min(length, RELAY_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", length)
        length -= len(chunk)
        writer.write(chunk)
        await writer.drain()


RELAY_CHUNK = 1 << 20


def _error(status: int, reason: str) -> bytes:
    body = json.dumps(
        {"error": {"code": status, "message": f"{reason} (injected by the test proxy)"}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Proxy:
    def __init__(self, upstream: str, faults: Faults):
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname, parts.port
        self.faults = faults
        self.random = random.Random(faults.seed)
        self.counters = Counters()

    def _fault(self) -> str | None:
        f, draw = self.faults, self.random.random()
        for name, share in (("503", f.unavailable), ("429", f.throttled), ("dropped", f.dropped)):
            if draw < share:
                self.counters.injected[name] += 1
                return name
            draw -= share
        return None

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while (head := await _read_head(client_reader)) is not None:
                method, target, _ = head.split(b" ", 2)
                method, target = method.decode(), target.decode("latin-1")
                request_headers = _headers(head)
                body = await _read_body(client_reader, request_headers, to_eof=False)
                read = is_object_read(method, target)
                native = read and is_native(request_headers)
                c = self.counters
                c.requests += 1
                if read:
                    c.reads += 1
                    c.native_reads += native
                    c.reads_in_flight += 1
                    c.peak_reads_in_flight = max(c.peak_reads_in_flight, c.reads_in_flight)
                try:
                    if self.faults.delay:
                        await asyncio.sleep(self.faults.delay)
                    fault = self._fault() if read else None
                    c.native_injected += native and fault is not None
                    if fault in ("503", "429"):
                        reason = "Service Unavailable" if fault == "503" else "Too Many Requests"
                        client_writer.write(_error(int(fault), reason))
                        await client_writer.drain()
                        continue
                    if upstream is None:
                        upstream = await asyncio.open_connection(self.host, self.port, limit=RELAY_CHUNK)
                    up_reader, up_writer = upstream
                    lines = head.split(b"\r\n")
                    lines = [
                        b"Host: %s:%d" % (self.host.encode(), self.port)
                        if line.lower().startswith(b"host:")
                        else line
                        for line in lines
                    ]
                    up_writer.write(b"\r\n".join(lines) + body)
                    await up_writer.drain()
                    response_head = await _read_head(up_reader)
                    if response_head is None:
                        return
                    status = int(response_head.split(b" ", 2)[1])
                    no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                    headers = _headers(response_head)
                    streamed = (
                        not no_body
                        and fault is None
                        and "content-length" in headers
                        and "chunked" not in headers.get("transfer-encoding", "").lower()
                    )
                    if streamed:
                        length = int(headers["content-length"])
                        client_writer.write(response_head)
                        await _relay(up_reader, client_writer, length)
                        c.bytes_out += len(response_head) + length
                        if headers.get("connection", "").lower() == "close":
                            up_writer.close()
                            upstream = None
                        continue
                    response = b"" if no_body else await _read_body(up_reader, headers, to_eof=True)
                    if fault == "dropped":
                        client_writer.write(response_head + response[: len(response) // 2])
                        await client_writer.drain()
                        return
                    client_writer.write(response_head + response)
                    c.bytes_out += len(response_head) + len(response)
                    await client_writer.drain()
                    if headers.get("connection", "").lower() == "close":
                        up_writer.close()
                        upstream = None
                finally:
                    if read:
                        c.reads_in_flight -= 1
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            client_writer.close()
            if upstream is not None:
                upstream[1].close()


def _listening_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


class GcsProxy:
    """One proxy in a background thread: ``with GcsProxy(emulator_url, Faults(...)) as proxy:``."""

    def __init__(self, upstream: str, faults: Faults | None = None, port: int = 0):
        self._proxy = _Proxy(upstream, faults or Faults())
        self._sock = _listening_socket(port)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="gcs-proxy", daemon=True)

    @property
    def counters(self) -> Counters:
        return self._proxy.counters

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._proxy.handle, sock=self._sock))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            # Connections the clients keep open end here, before the loop closes under them.
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    def __enter__(self) -> GcsProxy:
        self._thread.start()
        self._started.wait()
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the emulator's URL")
    parser.add_argument("--port", type=int, required=True, help="the port to share (SO_REUSEPORT)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to every request")
    args = parser.parse_args()
    proxy = _Proxy(args.upstream, Faults(delay=args.delay))

    async def serve() -> None:
        server = await asyncio.start_server(proxy.handle, sock=_listening_socket(args.port))
        await server.serve_forever()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
