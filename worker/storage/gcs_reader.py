"""GCS reads at GPU speed: hundreds of requests in flight from a process of its own.

Small objects cost one request each, and a request costs tens of milliseconds on GCS, so a
rank that classifies thousands of images a second needs hundreds in flight (rate x latency).
Python threads cannot do that beside the decode and the model's launches: every request
would be a Python call holding the GIL. This module runs obstore (Rust ``object_store``,
async) under asyncio in a child process, so the worker's process spends one message per
batch on reading. Retries (429, 5xx, dropped connections: exponential backoff with full
jitter, up to a deadline) and the per-bucket rate limit live here, where they can be counted.

Not every legal GCS name is a path obstore can express: a ``.`` or ``..`` segment, an empty one
(a leading ``/``, ``//`` inside, a trailing ``/``) or a control character. Those objects are read
through the JSON API (google-cloud-storage, which percent-encodes the whole name) in a thread of
the same process, under the same concurrency, rate limit and retries, so they become rows like
any other; a name obstore refuses is never sent to it, and a refusal is never retried.

Wire format, both ways over a socketpair: an 8-byte big-endian header length, the pickled
header, then (child to parent) the batch's bytes, concatenated in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from worker.storage import ObjectInfo, ReadError, ReadSettings, ReadStats, split_uri
from worker.storage.reading import backoff_delays

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">Q")
# The environment variable google-cloud-storage honours for an emulator; obstore is pointed at
# the same endpoint, so both clients always talk to the same store.
EMULATOR_HOST = "STORAGE_EMULATOR_HOST"


def native_can_name(name: str) -> bool:
    """Whether obstore (``object_store``'s ``Path``) can name the object ``name`` as it is.

    ``Path`` drops empty segments (``/a.jpg`` would read ``a.jpg``) and refuses ``.`` and ``..``
    segments and ASCII control characters, all of which GCS allows.
    """
    return not any(segment in ("", ".", "..") for segment in name.split("/")) and not any(
        ord(c) < 0x20 or ord(c) == 0x7F for c in name
    )


def _send(sock: socket.socket, header: object, body: bytes = b"") -> None:
    data = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)
    if body:
        sock.sendall(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])  # releases the GIL while it waits
        if k == 0:
            return None
        got += k
    return buf


class GCSReader:
    """The worker-side end: submits batches to the reader process and resolves their futures."""

    def __init__(self, settings: ReadSettings, stats: ReadStats, project: str | None = None):
        self.stats = stats
        self._futures: dict[int, Future] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair()
        self._sock = ours
        config = {
            "concurrency": settings.concurrency,
            "rate_limit": settings.rate_limit,
            "retry_deadline": settings.retry_deadline,
            "endpoint": os.environ.get(EMULATOR_HOST, ""),
            "project": project,
        }
        # The child imports this package from wherever the worker did, installed or not.
        root = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "worker.storage.gcs_reader", str(theirs.fileno()), json.dumps(config)],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root},
        )
        theirs.close()
        # The child says it is ready once obstore is imported: a missing or broken install fails
        # here, at start-up, and no read is timed against the child's imports.
        ready = _recv_exactly(self._sock, _HEADER.size)
        if (
            ready is None
            or pickle.loads(_recv_exactly(self._sock, _HEADER.unpack(ready)[0]) or b"N.") != "ready"
        ):
            code = self._proc.wait()
            self._sock.close()
            raise RuntimeError(
                f"the GCS reader process did not start (exit code {code}); see its error above"
            )
        self._receiver = threading.Thread(target=self._receive, name="gcs-reader", daemon=True)
        self._receiver.start()

    def submit(self, objects: Sequence[ObjectInfo]) -> Future:
        future: Future = Future()
        if not objects:
            future.set_result([])
            return future
        request = [(*split_uri(o.uri), o.generation) for o in objects]
        with self._lock:
            batch_id = self._next_id
            self._next_id += 1
            self._futures[batch_id] = future
            try:
                _send(self._sock, ("read", batch_id, request))
            except OSError as exc:
                del self._futures[batch_id]
                raise RuntimeError(f"the GCS reader process is gone ({exc})") from exc
        return future

    def _receive(self) -> None:
        try:
            while (size := _recv_exactly(self._sock, _HEADER.size)) is not None:
                header = _recv_exactly(self._sock, _HEADER.unpack(size)[0])
                if header is None:
                    break
                batch_id, lengths, errors, requests, retries = pickle.loads(header)
                body = _recv_exactly(self._sock, sum(lengths))
                if body is None:
                    break
                view = memoryview(body)
                payloads: list = []
                offset = 0
                for i, n in enumerate(lengths):
                    payloads.append(ReadError(errors[i]) if i in errors else view[offset : offset + n])
                    offset += n
                self.stats.add(objects=len(lengths), nbytes=offset, requests=requests, retries=retries)
                with self._lock:
                    future = self._futures.pop(batch_id)
                future.set_result(payloads)
        except OSError:
            pass  # closed
        code = self._proc.wait()
        with self._lock:
            pending, self._futures = self._futures, {}
        for future in pending.values():
            future.set_exception(RuntimeError(f"the GCS reader process exited with code {code}"))

    def close(self) -> None:
        with self._lock:
            try:
                _send(self._sock, ("stop",))
            except OSError:
                pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._receiver.join(timeout=30)
        self._sock.close()


# The reader process.


class _RateLimit:
    """At most ``rate`` request starts per second per bucket, evenly spaced."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next: dict[str, float] = {}

    async def wait(self, bucket: str) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        start = max(now, self.next.get(bucket, now))
        self.next[bucket] = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


def _status_of(exc: BaseException) -> int | None:
    text = str(exc)
    marker = "status code: "
    at = text.find(marker)
    if at < 0:
        return None
    digits = text[at + len(marker) : at + len(marker) + 3]
    return int(digits) if digits.isdigit() else None


def _reason(exc: BaseException, attempts: int) -> str:
    """An error row's reason: one short line."""
    from google.api_core.exceptions import GoogleAPICallError, NotFound
    from obstore.exceptions import NotFoundError

    if isinstance(exc, (NotFoundError, FileNotFoundError, NotFound)):  # obstore raises either, by version
        return "read failed: object not found (deleted or replaced since planning)"
    status = exc.code if isinstance(exc, GoogleAPICallError) else _status_of(exc)
    what = f"HTTP {status}" if status else str(exc).split("\n", 1)[0][:200]
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return f"read failed{tries}: {type(exc).__name__}: {what}"


def _retryable(exc: BaseException) -> bool:
    """429, 5xx, timeouts and dropped or refused connections are retried; other answers are final,
    and so is a name the client cannot express (``ValueError``: obstore's "Could not parse path").
    """
    from google.api_core import exceptions as api

    if isinstance(exc, api.GoogleAPICallError):
        return exc.code is not None and (exc.code == 429 or exc.code >= 500)
    if isinstance(exc, ValueError):
        return False
    from obstore.exceptions import (
        NotFoundError,
        PermissionDeniedError,
        PreconditionError,
        UnauthenticatedError,
    )

    final = (NotFoundError, PermissionDeniedError, UnauthenticatedError, PreconditionError)
    if isinstance(exc, (*final, FileNotFoundError, PermissionError)):
        return False
    status = _status_of(exc)
    return status is None or status == 429 or status >= 500


def emulator_credentials(endpoint: str) -> str:
    """A service-account file that points obstore at an emulator without OAuth; returns its path."""
    fd, path = tempfile.mkstemp(prefix="gcs-emulator-", suffix=".json")
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {
                "gcs_base_url": url,
                "disable_oauth": True,
                "client_email": "",
                "private_key": "",
                "private_key_id": "",
            },
            fh,
        )
    return path


def emulator_store_options(endpoint: str, credentials: str) -> dict:
    """``GCSStore`` keyword arguments for the emulator at ``endpoint``."""
    return {
        "service_account_path": credentials,
        "client_options": {"allow_http": not endpoint.startswith("https://")},
    }


class _Child:
    def __init__(self, config: dict):
        self.concurrency = asyncio.Semaphore(max(1, int(config["concurrency"])))
        self.rate_limit = _RateLimit(float(config["rate_limit"]))
        self.deadline = float(config["retry_deadline"])
        self.endpoint = config["endpoint"]
        self.project = config.get("project")
        self.stores: dict[str, object] = {}
        self._credentials = None
        self._json_api = threading.local()  # a google-cloud-storage client per thread

    def store(self, bucket: str):
        if bucket not in self.stores:
            from obstore.store import GCSStore

            options = {"retry_config": {"max_retries": 0}}  # retried here, where retries are counted
            if self.endpoint:
                if self._credentials is None:
                    self._credentials = emulator_credentials(self.endpoint)
                options |= emulator_store_options(self.endpoint, self._credentials)
            self.stores[bucket] = GCSStore(bucket, **options)
        return self.stores[bucket]

    def read_json_api(self, bucket: str, name: str, generation: int | None) -> bytes:
        """One GET through the JSON API, for a name obstore cannot express (no retries: the caller's)."""
        client = getattr(self._json_api, "client", None)
        if client is None:
            from google.cloud import storage

            from worker.storage import default_project

            client = self._json_api.client = storage.Client(project=self.project or default_project())
        blob = client.bucket(bucket).blob(name, generation=generation)
        return blob.download_as_bytes(retry=None, checksum=None)

    async def read_one(self, bucket: str, name: str, generation: int | None, counts: list[int]):
        import obstore

        options = {"version": str(generation)} if generation is not None else None
        native = native_can_name(name)
        give_up = time.monotonic() + self.deadline
        delays = backoff_delays()
        attempts = 0
        while True:
            await self.rate_limit.wait(bucket)
            attempts += 1
            counts[0] += 1
            try:
                async with self.concurrency:
                    if not native:
                        return await asyncio.to_thread(self.read_json_api, bucket, name, generation)
                    result = await obstore.get_async(self.store(bucket), name, options=options)
                    return await result.bytes_async()
            except Exception as exc:  # noqa: BLE001 - every failure becomes a retry or an error row
                if not _retryable(exc) or time.monotonic() >= give_up:
                    return ReadError(_reason(exc, attempts))
                counts[1] += 1
                await asyncio.sleep(min(next(delays), max(0.0, give_up - time.monotonic())))

    async def read_batch(self, batch_id: int, request: list, writer: asyncio.StreamWriter) -> None:
        try:
            counts = [0, 0]  # requests, retries
            for bucket in {b for b, _, _ in request}:
                self.store(bucket)
            results = await asyncio.gather(*(self.read_one(b, n, g, counts) for b, n, g in request))
            errors = {i: str(r) for i, r in enumerate(results) if isinstance(r, ReadError)}
            lengths = [0 if isinstance(r, ReadError) else len(r) for r in results]
            header = pickle.dumps((batch_id, lengths, errors, *counts), protocol=pickle.HIGHEST_PROTOCOL)
            writer.write(_HEADER.pack(len(header)) + header)
            writer.writelines(memoryview(r) for r in results if not isinstance(r, ReadError))
            await writer.drain()
        except Exception:
            # Not an object's failure (those are error rows) but the reader's: a batch left
            # unanswered would hang the worker, so fail the whole process loudly instead.
            log.exception("the GCS reader failed")
            os._exit(1)

    async def serve(self, sock: socket.socket) -> None:
        import obstore  # noqa: F401 - imported before "ready", so that a broken install fails at start-up

        reader, writer = await asyncio.open_connection(sock=sock)
        ready = pickle.dumps("ready")
        writer.write(_HEADER.pack(len(ready)) + ready)
        await writer.drain()
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                try:
                    size = await reader.readexactly(_HEADER.size)
                    message = pickle.loads(await reader.readexactly(_HEADER.unpack(size)[0]))
                except asyncio.IncompleteReadError:
                    return  # the worker is gone
                if message[0] == "stop":
                    return
                _, batch_id, request = message
                task = asyncio.create_task(self.read_batch(batch_id, request, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            if self._credentials:
                os.unlink(self._credentials)


def main(argv: list[str]) -> None:
    sock = socket.socket(fileno=int(argv[0]))
    child = _Child(json.loads(argv[1]))
    try:
        import uvloop

        uvloop.run(child.serve(sock))
    except ImportError:
        asyncio.run(child.serve(sock))


if __name__ == "__main__":
    main(sys.argv[1:])
