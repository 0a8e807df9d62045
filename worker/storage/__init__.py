"""The single storage seam: every read and write of the project goes through here.

A URI is either ``gs://bucket/path`` or a local filesystem path. ``open_storage(uri)``
returns the backend registered for its scheme; every backend offers the same small
interface (``Storage``), so the worker, the components and the tests never branch on the
scheme themselves. This module is the one place where a URI's scheme is tested. Backends
are imported on first use: importing this package imports no cloud client.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple, Protocol

GCS_SCHEME = "gs://"
LOCAL = "file"
GCS = "gs"

# scheme -> "module:Class" of its backend, imported when a URI of that scheme is first opened.
_BACKENDS: dict[str, str] = {
    LOCAL: "worker.storage.local:LocalStorage",
    GCS: "worker.storage.gcs:GCSStorage",
}


def scheme_of(uri: str) -> str:
    """``"gs"`` for a gs:// URI, ``"file"`` for anything else (a local path)."""
    return GCS if uri.startswith(GCS_SCHEME) else LOCAL


def is_gcs(uri: str) -> bool:
    return scheme_of(uri) == GCS


def split_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``.

    Raises:
        ValueError: ``uri`` is not a gs:// URI, or names no bucket.
    """
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, path = uri[len(GCS_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"gs:// URI has no bucket: {uri!r}")
    return bucket, path


# GCS bucket names: 3-63 characters of lowercase letters, digits, '-', '_' and '.', starting
# and ending with a letter or digit.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")


def check_uri(name: str, uri: str, *, local_ok: bool = True) -> None:
    """``uri`` is a well-formed gs://bucket/prefix (or, with ``local_ok``, a local path).

    Args:
        name: What to call ``uri`` in the message: a worker flag or a pipeline parameter.
        uri: The URI.
        local_ok: Whether a local path (or a Hugging Face hub id, which looks like one) will do.

    Raises:
        ValueError: Empty, another scheme, no or a malformed bucket, or surrounding blanks; in
            one line naming ``name``.
    """
    if not uri:
        raise ValueError(f"{name} is empty: set it to a gs://bucket/prefix")
    if uri != uri.strip():
        raise ValueError(f"{name} {uri!r} has leading or trailing blanks")
    if is_gcs(uri):
        bucket = uri[len(GCS_SCHEME) :].partition("/")[0]
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"{name} {uri!r} does not name a valid GCS bucket: gs://BUCKET/prefix")
    elif "://" in uri or uri.startswith("gs:"):
        raise ValueError(f"{name} {uri!r} is not a gs://bucket/prefix")
    elif not local_ok:
        raise ValueError(f"{name} must be a gs://bucket/prefix, got {uri!r}")


def gcs_uri(bucket: str, name: str) -> str:
    """The gs:// URI of object ``name`` in ``bucket``."""
    return f"{GCS_SCHEME}{bucket}/{name}"


def absolute(uri: str) -> str:
    """A gs:// URI as is; a local path made absolute (plans and rows must not depend on the cwd)."""
    return uri if is_gcs(uri) else os.path.abspath(uri)


def folder(uri: str) -> str:
    """The URI as a folder: ``gs://b/pre`` -> ``gs://b/pre/``, so that it never matches ``pre2/``."""
    return uri.rstrip("/") + "/"


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for gs:// and local paths alike."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


class Member(NamedTuple):
    """Where an image's bytes lie inside an archive object (``worker.archives``).

    Attributes:
        archive: The archive object's URI (a tar shard or a zip file).
        offset: Where the image's bytes start in it: a tar member's data, or a zip member's
            local file header.
        format: How its bytes are taken out (``worker.archives.members``): ``"tar"``, they are
            the image; ``"zip"``, a zip local record; ``"unpacked"`` and ``"damaged"``, there are
            none to read (the file could not be read when it was packed; the archive could not be
            listed), so the image becomes an error row.
    """

    archive: str
    offset: int
    format: str = "tar"


class ObjectInfo(NamedTuple):
    """One object (or local file) as listed, or one image inside an archive.

    A tuple, not a dataclass: plans hold millions of these, and tuples are several times
    cheaper to build, pickle and broadcast.

    Attributes:
        uri: Its URI (for an archive member: the image's own URI, which result rows carry).
        size: Bytes (for an archive member: the bytes to read at ``member.offset``).
        generation: The GCS generation it was listed at (for a member: its archive's); None
            where the listing has none.
        crc32c: GCS's base64 big-endian CRC32C, where the listing (or a packed index) reports it.
        member: Where it lies inside an archive; None for an object of its own.
    """

    uri: str
    size: int
    generation: int | None = None
    crc32c: str | None = None
    member: Member | None = None


class ReadError(Exception):
    """An object that could not be read; becomes an error record, never a crash."""


@dataclass(frozen=True)
class StorageOptions:
    """How a backend talks to its store; one backend instance is shared per scheme and options.

    Attributes:
        project: GCP project for GCS clients (default: from the environment).
        compose: Read small GCS objects as composites of 32 (3 requests per 32 objects, but
            writes to the input bucket); else one request per object from the native reader.
    """

    project: str | None = None
    compose: bool = False


# Batch reads: what the read stage (worker.read) asks of a backend.


@dataclass(frozen=True)
class ReadSettings:
    """How a rank reads its input.

    Attributes:
        concurrency: Requests in flight at once (object stores).
        read_ahead_bytes: Planned bytes submitted but not yet consumed: the memory bound.
        batches_ahead: Batches submitted ahead at least (within ``read_ahead_bytes``).
        threads: Threads of the thread-pool readers (local files, composed GCS reads).
        rate_limit: Most requests per second to one bucket from this rank; 0: no limit.
        retry_deadline: Seconds a request is retried (429, 5xx, dropped connections) before it
            becomes a read error.
    """

    concurrency: int = 500
    read_ahead_bytes: int = 256 << 20
    batches_ahead: int = 8
    threads: int = 4
    rate_limit: float = 0.0
    retry_deadline: float = 300.0


class ReadStats:
    """A rank's read counters: objects, bytes, requests sent and retries, from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock()
        self.objects = 0
        self.bytes = 0
        self.requests = 0
        self.retries = 0
        self._lock = threading.Lock()

    def add(self, *, objects: int = 0, nbytes: int = 0, requests: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.objects += objects
            self.bytes += nbytes
            self.requests += requests
            self.retries += retries

    def count_retry(self, _exc: BaseException | None = None) -> None:
        """An ``on_error`` callback for google-api-core's Retry: one more retry."""
        self.add(retries=1)

    def rates(self) -> tuple[float, float]:
        """Reads (requests) and retries per second since the start."""
        seconds = max(self.clock() - self.started, 1e-9)
        return self.requests / seconds, self.retries / seconds

    def line(self) -> str:
        reads, retries = self.rates()
        return f"{reads:.0f} reads/s, {retries:.1f} retries/s"

    def summary(self, images: int) -> dict:
        """The rank summary's read figures."""
        return {
            "read_requests": self.requests,
            "read_retries": self.retries,
            "read_bytes": self.bytes,
            "requests_per_image": round(self.requests / images, 4) if images else 0.0,
        }


class BatchReader(Protocol):
    stats: ReadStats

    def submit(self, objects: Sequence[ObjectInfo]) -> Future:
        """A future of the objects' payloads (bytes-like or ``ReadError``), in order."""
        ...

    def close(self) -> None: ...


class Storage(Protocol):
    """What every backend offers. Missing objects and buckets raise ``FileNotFoundError``."""

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        """Every object whose URI starts with ``prefix_uri``, by URI, with generations."""
        ...

    def list_pages(self, prefix_uri: str, parallelism: int = 8) -> Iterator[list[ObjectInfo]]:
        """The same objects, listed in parallel and streamed in pages as they come: unordered,
        with generations where the store has them. Memory stays bounded however many there are.
        """
        ...

    def download(self, uri: str, path: str) -> None:
        """Copy the object into the local file ``path``, streamed (never whole in memory)."""
        ...

    def read(self, uri: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or ``length`` of them from ``offset`` (fewer where it ends first).

        For control files (records, plans, manifests): on GCS through google-cloud-storage, whose
        retries are its own; ``read_range`` is the path for bulk bytes.
        """
        ...

    def read_range(self, uri: str, offset: int, length: int) -> bytes | memoryview:
        """``length`` bytes from ``offset`` in one request: fewer where the object ends first, none
        past its end.
        """
        ...

    def read_many(self, objects: Sequence[ObjectInfo]) -> list[bytes | ReadError]:
        """The objects' bytes in order; an object that could not be read is a ``ReadError``."""
        ...

    def reader(self, settings: ReadSettings, stats: ReadStats) -> BatchReader:
        """The batch reader the read stage submits batches to."""
        ...

    def write(self, uri: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write atomically; with ``if_absent`` only if nothing is there (False if something was)."""
        ...

    def upload_files(self, pairs: Sequence[tuple[str, str]], *, workers: int) -> list[BaseException | None]:
        """Copy local files ``(path, uri)`` in parallel; one result per pair, None where it succeeded."""
        ...

    def copy(self, source_uri: str, target_uri: str) -> None:
        """Copy one object within the store (server-side where the store can)."""
        ...

    def stat(self, uri: str) -> ObjectInfo | None:
        """The object's size, generation and checksum; None if it does not exist."""
        ...

    def exists(self, uri: str) -> bool: ...

    def delete(self, uri: str) -> bool:
        """Remove the object; False if it was not there (not an error: a retried delete finds it gone)."""
        ...

    def discard_interrupted_writes(self, prefix_uri: str) -> int:
        """Remove what killed writers left under the prefix; returns how many."""
        ...


_OPEN: dict[tuple[str, StorageOptions], Storage] = {}


def register(scheme: str, backend: str) -> None:
    """Serve URIs of ``scheme`` with ``backend`` (``"module:Class"``, constructed with ``StorageOptions``)."""
    _BACKENDS[scheme] = backend
    for key in [k for k in _OPEN if k[0] == scheme]:
        del _OPEN[key]


def open_storage(uri: str, **options) -> Storage:
    """The backend for ``uri``'s scheme, built once per scheme and ``StorageOptions(**options)``."""
    scheme = scheme_of(uri)
    key = (scheme, StorageOptions(**options))
    if key not in _OPEN:
        module, _, name = _BACKENDS[scheme].partition(":")
        _OPEN[key] = getattr(importlib.import_module(module), name)(key[1])
    return _OPEN[key]


def default_project() -> str:
    return (
        os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT") or "local-project"
    )


def read_text(uri: str) -> str:
    return open_storage(uri).read(uri).decode("utf-8")


def write_text(uri: str, text: str, *, if_absent: bool = False) -> bool:
    return open_storage(uri).write(uri, text.encode("utf-8"), if_absent=if_absent)
