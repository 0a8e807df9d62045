"""The single storage seam: every read and write of the project goes through here.

A URI is either ``gs://bucket/path`` or a local filesystem path. ``open_storage(uri)``
returns the backend for it; both backends offer the same small interface, so the
worker, the components and the tests never branch on the scheme themselves.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple, Protocol

log = logging.getLogger(__name__)

GCS_SCHEME = "gs://"


def is_gcs(uri: str) -> bool:
    return uri.startswith(GCS_SCHEME)


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, path = uri[len(GCS_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"gs:// URI has no bucket: {uri!r}")
    return bucket, path


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for gs:// and local paths alike."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


class ObjectInfo(NamedTuple):
    # A tuple, not a dataclass: plans hold millions of these, and tuples are several times
    # cheaper to build, pickle and broadcast.
    uri: str
    size: int
    generation: int | None = None


class ReadError(Exception):
    """An object that could not be read; becomes an error record, never a crash."""


class Storage(Protocol):
    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]: ...

    def fast_list(self, prefix_uri: str, processes: int = 8) -> list[ObjectInfo]: ...

    def read(self, uri: str) -> bytes: ...

    def read_many(self, objects: Sequence[ObjectInfo]) -> list[bytes | ReadError]: ...

    def write(self, uri: str, data: bytes, *, if_absent: bool = False) -> bool: ...

    def exists(self, uri: str) -> bool: ...

    def discard_interrupted_writes(self, prefix_uri: str) -> int: ...


class LocalStorage:
    """Local filesystem backend. Writes are atomic: a temp file in the target folder, then a rename."""

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        root = Path(prefix_uri)
        if root.is_file():
            yield ObjectInfo(str(root), root.stat().st_size)
            return
        if not root.is_dir():
            raise FileNotFoundError(f"input directory does not exist: {prefix_uri}")
        yield from self._walk(str(root))

    def _walk(self, folder: str) -> Iterator[ObjectInfo]:
        # scandir's entries know their type without a stat call: one syscall per file, not three.
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path)
            elif entry.is_file():
                yield ObjectInfo(entry.path, entry.stat().st_size)

    def fast_list(self, prefix_uri: str, processes: int = 8) -> list[ObjectInfo]:
        """The tree's files with their sizes, listed by several processes. Unordered.

        The cost is one stat() per file; threads would take turns on the GIL, so the
        folders are split between processes instead (spawned, since the caller may already
        run CUDA and other threads).
        """
        root = Path(prefix_uri)
        if processes <= 1 or not root.is_dir():
            return list(self.list(prefix_uri))
        tasks = _split_tree(str(root), parts=4 * processes)
        if len(tasks) == 1:
            return list(self.list(prefix_uri))
        out: list[ObjectInfo] = []
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(min(processes, len(tasks)), mp_context=context) as pool:
                for uris, sizes in pool.map(_list_folder, tasks):
                    out.extend(map(ObjectInfo, uris, sizes))
        except BrokenProcessPool:
            # A spawned child re-imports __main__, which fails for a script read from stdin.
            log.warning("parallel listing of %s failed; listing it in this process", prefix_uri)
            return list(self.list(prefix_uri))
        return out

    def read(self, uri: str) -> bytes:
        return Path(uri).read_bytes()

    def read_many(self, objects: Sequence[ObjectInfo]) -> list[bytes | ReadError]:
        out: list[bytes | ReadError] = []
        for obj in objects:
            try:
                out.append(self.read(obj.uri))
            except OSError as exc:
                out.append(ReadError(f"read failed: {exc.strerror or exc}"))
        return out

    def write(self, uri: str, data: bytes, *, if_absent: bool = False) -> bool:
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if if_absent:
                # link() fails if the target exists, so two writers can never both win.
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
                return True
            os.replace(tmp, target)
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def discard_interrupted_writes(self, prefix_uri: str) -> int:
        """Remove the temp files of writes a killed process never finished; returns how many.

        Only safe while nothing else writes under the prefix, e.g. before a run's ranks start.
        """
        root = Path(prefix_uri)
        if not root.is_dir():
            return 0
        stale = [p for p in root.rglob(".*.tmp") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


def _split_tree(root: str, parts: int, max_depth: int = 4) -> list[tuple[str, bool]]:
    """(folder, recursive) tasks covering the tree once: a folder is opened up, its own files
    becoming a non-recursive task, until there are ``parts`` recursive tasks or no deeper folders.
    """
    tasks = [(root, True)]
    for _ in range(max_depth):
        recursive = [folder for folder, deep in tasks if deep]
        if len(recursive) >= parts:
            break
        opened = []
        for folder, deep in tasks:
            opened.append((folder, False))
            if deep:
                with os.scandir(folder) as it:
                    opened.extend(
                        (e.path, True)
                        for e in sorted(it, key=lambda e: e.path)
                        if e.is_dir(follow_symlinks=False)
                    )
        if len(opened) == len(tasks):
            break  # no folder had subfolders left to open
        tasks = opened
    return tasks


def _list_folder(task: tuple[str, bool]) -> tuple[list[str], list[int]]:
    """One task of ``_split_tree``, as two columns (cheap to send back between processes)."""
    folder, recursive = task
    uris: list[str] = []
    sizes: list[int] = []
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(entry.path)
                elif entry.is_file():
                    uris.append(entry.path)
                    sizes.append(entry.stat().st_size)
    return uris, sizes


def default_project() -> str:
    return (
        os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT") or "local-project"
    )


class GCSStorage:
    """GCS backend over google-cloud-storage, with DataFlux for listing and batched reads.

    DataFlux's composed download concatenates up to 32 small objects server-side and
    fetches them in one GET. It has a known defect: a failed download thread drops its
    chunk silently, so a batch can come back short. ``read_many`` therefore never pairs
    names with bytes by position unless the counts and every size match; otherwise it
    re-reads the objects one by one.
    """

    # One DataFlux call per composite: a short return then means "this whole call
    # failed", so we know exactly which objects to re-read.
    COMPOSE_MAX_OBJECTS = 32

    def __init__(self, project: str | None = None, compose: bool = True, retry_deadline: float = 300.0):
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.project = project or default_project()
        self.compose = compose
        # Transient errors (429, 5xx, resets) are retried with backoff up to this deadline;
        # DataFlux's own default would keep retrying for over a day.
        self.retry = DEFAULT_RETRY.with_deadline(retry_deadline)
        self._local = threading.local()

    @property
    def client(self):
        # google-cloud-storage clients hold a requests session that is not safe to
        # share across threads under load, so each reader thread gets its own.
        client = getattr(self._local, "client", None)
        if client is None:
            from google.cloud import storage

            client = storage.Client(project=self.project)
            self._local.client = client
        return client

    def _bucket(self, name: str):
        from google.api_core import exceptions

        bucket = self.client.bucket(name)
        try:
            if not bucket.exists():
                raise FileNotFoundError(f"GCS bucket does not exist: gs://{name}")
        except exceptions.Forbidden:
            pass  # No bucket-level read permission; object calls may still work.
        return bucket

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        bucket_name, prefix = split_gcs(prefix_uri)
        bucket = self._bucket(bucket_name)
        for blob in self.client.list_blobs(bucket, prefix=prefix or None):
            if blob.name.endswith("/"):
                continue
            yield ObjectInfo(f"gs://{bucket_name}/{blob.name}", int(blob.size or 0), blob.generation)

    def fast_list(self, prefix_uri: str, processes: int = 8) -> list[ObjectInfo]:
        """DataFlux's parallel work-stealing listing. Unordered, and without generations."""
        from dataflux_core.fast_list import ListingController

        bucket_name, prefix = split_gcs(prefix_uri)
        self._bucket(bucket_name)
        lister = ListingController(
            max_parallelism=max(1, processes),
            project=self.project,
            bucket=bucket_name,
            sort_results=False,
            prefix=prefix or None,
        )
        return [ObjectInfo(f"gs://{bucket_name}/{name}", int(size)) for name, size in lister.run()]

    def read(self, uri: str) -> bytes:
        from google.api_core import exceptions

        bucket_name, name = split_gcs(uri)
        try:
            return self.client.bucket(bucket_name).blob(name).download_as_bytes(retry=self.retry)
        except exceptions.NotFound as exc:
            raise FileNotFoundError(f"object not found: {uri}") from exc

    def _read_each(self, objects: Sequence[ObjectInfo]) -> list[bytes | ReadError]:
        out: list[bytes | ReadError] = []
        for obj in objects:
            try:
                out.append(self.read(obj.uri))
            except Exception as exc:  # noqa: BLE001 - one bad object must not sink the batch
                out.append(ReadError(f"read failed: {type(exc).__name__}: {exc}"))
        return out

    def _dataflux_read(self, bucket_name: str, objects: Sequence[ObjectInfo]) -> list[bytes] | None:
        """One composed download; None when DataFlux returned a short or mis-sized batch."""
        from dataflux_core import download

        names = [(split_gcs(o.uri)[1], o.size) for o in objects]
        params = download.DataFluxDownloadOptimizationParams(
            max_composite_object_size=100_000_000 if self.compose else 0
        )
        try:
            got = download.dataflux_download_threaded(
                project_name=self.project,
                bucket_name=bucket_name,
                objects=names,
                storage_client=self.client,
                dataflux_download_optimization_params=params,
                threads=1,
                retry_config=self.retry,
            )
        except Exception as exc:  # noqa: BLE001
            log.warning(
                "DataFlux batch read of %d objects failed (%s); re-reading one by one", len(objects), exc
            )
            return None
        if len(got) != len(objects) or any(len(b) != o.size for b, o in zip(got, objects, strict=False)):
            log.warning(
                "DataFlux returned %d of %d objects (or sizes changed); re-reading one by one",
                len(got),
                len(objects),
            )
            return None
        return list(got)

    def read_many(self, objects: Sequence[ObjectInfo]) -> list[bytes | ReadError]:
        out: list[bytes | ReadError] = []
        for start in range(0, len(objects), self.COMPOSE_MAX_OBJECTS):
            chunk = objects[start : start + self.COMPOSE_MAX_OBJECTS]
            buckets = {split_gcs(o.uri)[0] for o in chunk}
            got = self._dataflux_read(buckets.pop(), chunk) if len(buckets) == 1 else None
            out.extend(got if got is not None else self._read_each(chunk))
        return out

    def write(self, uri: str, data: bytes, *, if_absent: bool = False) -> bool:
        from google.api_core import exceptions

        bucket_name, name = split_gcs(uri)
        blob = self.client.bucket(bucket_name).blob(name)
        try:
            if if_absent:
                # Generation precondition 0: created only if absent, so a retried
                # upload is safe to retry and a second writer loses cleanly.
                blob.upload_from_string(data, if_generation_match=0, retry=self.retry)
            else:
                blob.upload_from_string(data, retry=self.retry)
        except exceptions.PreconditionFailed:
            return False
        except exceptions.NotFound as exc:
            raise FileNotFoundError(f"GCS bucket does not exist: gs://{bucket_name}") from exc
        return True

    def exists(self, uri: str) -> bool:
        bucket_name, name = split_gcs(uri)
        return self.client.bucket(bucket_name).blob(name).exists()

    def discard_interrupted_writes(self, prefix_uri: str) -> int:
        # A GCS upload is all or nothing: a killed writer leaves no partial object.
        return 0


_GCS: dict[tuple[str, bool], GCSStorage] = {}
_LOCAL = LocalStorage()


def open_storage(uri: str, *, project: str | None = None, compose: bool = True) -> Storage:
    if is_gcs(uri):
        key = (project or default_project(), compose)
        if key not in _GCS:
            _GCS[key] = GCSStorage(*key)
        return _GCS[key]
    return _LOCAL


def read_text(uri: str) -> str:
    return open_storage(uri).read(uri).decode("utf-8")


def write_text(uri: str, text: str, *, if_absent: bool = False) -> bool:
    return open_storage(uri).write(uri, text.encode("utf-8"), if_absent=if_absent)
