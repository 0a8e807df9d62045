"""The GCS backend: google-cloud-storage for listing and writes, a listing fanned out over prefixes
for plans (``fan_out``), and two batch readers: the native reader process (``gcs_reader``, the default) and composed reads.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from worker.storage import (
    BatchReader,
    ObjectInfo,
    ReadError,
    ReadSettings,
    ReadStats,
    StorageOptions,
    default_project,
    gcs_uri,
    split_uri,
)
from worker.storage.fan_out import fan_out
from worker.storage.gcs_ranges import RangeReader
from worker.storage.reading import ThreadedReader

log = logging.getLogger(__name__)

# Temporary composites live here, at the bucket root, as DataFlux's own do: the one folder that
# listings skip. A user's folder of that name anywhere below the root is data like any other.
COMPOSITES = "dataflux-composed-objects/"
# Listing threads per listing process asked for: each waits on the network most of the time.
_LISTERS_PER_PROCESS = 4
# What a plan's listing asks GCS for: each object's name, size, generation and checksum.
_LISTED_FIELDS = "items(name,size,generation,crc32c),prefixes,nextPageToken"
# GCS composes at most 32 sources into one object.
COMPOSE_MAX_OBJECTS = 32


class GCSStorage:
    """GCS over google-cloud-storage."""

    def __init__(self, options: StorageOptions | None = None, *, retry_deadline: float = 300.0):
        options = options or StorageOptions()
        self.project = options.project or default_project()
        self.compose = options.compose
        self.retry = self._retry(retry_deadline)
        self._local = threading.local()
        self._ranges = RangeReader(retry_deadline)

    @staticmethod
    def _retry(deadline: float, stats: ReadStats | None = None):
        """google-api-core's retry of 429, 5xx and dropped connections (exponential backoff with
        jitter) up to ``deadline`` seconds, counting each retry in ``stats``.
        """
        from google.api_core.retry import Retry
        from google.cloud.storage.retry import DEFAULT_RETRY

        return Retry(
            predicate=DEFAULT_RETRY._predicate,
            timeout=deadline,
            on_error=stats.count_retry if stats else None,
        )

    @property
    def client(self):
        # google-cloud-storage clients hold a requests session that is not safe to
        # share across threads under load, so each thread gets its own.
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
                raise FileNotFoundError(f"GCS bucket does not exist: {gcs_uri(name, '')}")
        except exceptions.Forbidden:
            pass  # No bucket-level read permission; object calls may still work.
        return bucket

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        bucket_name, prefix = split_uri(prefix_uri)
        bucket = self._bucket(bucket_name)
        for blob in self.client.list_blobs(bucket, prefix=prefix or None, retry=self.retry):
            if blob.name.endswith("/") or blob.name.startswith(COMPOSITES):
                continue
            yield _info(bucket_name, blob)

    def list_pages(self, prefix_uri: str, parallelism: int = 8) -> Iterator[list[ObjectInfo]]:
        """Every object under the prefix, every storage class, with generations: listed a level at
        a time by ``parallelism`` × 4 threads fanned out over its sub-prefixes (``fan_out``).
        Unordered; the composites folder at the bucket root is skipped.
        """
        bucket_name, prefix = split_uri(prefix_uri)
        self._bucket(bucket_name)
        return fan_out(
            lambda p: self._level(bucket_name, p), prefix, _LISTERS_PER_PROCESS * max(1, parallelism)
        )

    def _level(self, bucket_name: str, prefix: str):
        """One level under ``prefix``: pages of its objects and of its sub-prefixes."""
        from google.cloud.storage.bucket import _blobs_page_start

        def to_info(_iterator, item: dict) -> ObjectInfo:
            generation = item.get("generation")
            return ObjectInfo(
                gcs_uri(bucket_name, item["name"]),
                int(item.get("size") or 0),
                None if generation is None else int(generation),
                item.get("crc32c"),
            )

        params = {"projection": "noAcl", "delimiter": "/", "fields": _LISTED_FIELDS}
        if prefix:
            params["prefix"] = prefix
        # list_blobs' own iterator, but with items made straight into ObjectInfo: building a Blob
        # per item costs ~16 us of GIL-held CPU, a quarter of an hour on rank 0 per 10^8 objects.
        pages = self.client._list_resource(
            f"/b/{bucket_name}/o",
            to_info,
            extra_params=params,
            page_start=_blobs_page_start,
            retry=self.retry,
        )
        pages.prefixes = set()
        for page in pages.pages:
            objects = [o for o in page if not o.uri.endswith("/") and not _in_composites(bucket_name, o.uri)]
            yield objects, [p for p in page.prefixes if p != COMPOSITES]

    def download(self, uri: str, path: str) -> None:
        from google.api_core import exceptions

        bucket_name, name = split_uri(uri)
        try:
            self.client.bucket(bucket_name).blob(name).download_to_filename(path, retry=self.retry)
        except exceptions.NotFound as exc:
            raise FileNotFoundError(f"object not found: {uri}") from exc

    def read(self, uri: str, *, offset: int = 0, length: int | None = None, retry=None) -> bytes:
        from google.api_core import exceptions

        bucket_name, name = split_uri(uri)
        if length == 0:
            return b""
        end = None if length is None else offset + length - 1  # inclusive, as the Range header
        try:
            blob = self.client.bucket(bucket_name).blob(name)
            return blob.download_as_bytes(start=offset or None, end=end, retry=retry or self.retry)
        except exceptions.NotFound as exc:
            raise FileNotFoundError(f"object not found: {uri}") from exc

    def read_range(self, uri: str, offset: int, length: int) -> bytes | memoryview:
        return self._ranges.read(uri, offset, length)

    def read_many(self, objects: Sequence[ObjectInfo], *, retry=None) -> list[bytes | ReadError]:
        out: list[bytes | ReadError] = []
        for obj in objects:
            try:
                out.append(self.read(obj.uri, retry=retry))
            except Exception as exc:  # noqa: BLE001 - one bad object must not sink the batch
                out.append(ReadError(f"read failed: {type(exc).__name__}: {exc}"))
        return out

    def reader(self, settings: ReadSettings, stats: ReadStats) -> BatchReader:
        """The native reader process; composed reads where the options ask for them."""
        if self.compose:
            return _ComposedReader(self, settings, stats)
        from worker.storage.gcs_reader import GCSReader

        return GCSReader(settings, stats, self.project)

    def write(self, uri: str, data: bytes, *, if_absent: bool = False) -> bool:
        from google.api_core import exceptions

        bucket_name, name = split_uri(uri)
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
            raise FileNotFoundError(f"GCS bucket does not exist: {gcs_uri(bucket_name, '')}") from exc
        return True

    def exists(self, uri: str) -> bool:
        bucket_name, name = split_uri(uri)
        return self.client.bucket(bucket_name).blob(name).exists(retry=self.retry)

    def delete(self, uri: str) -> bool:
        from google.api_core import exceptions

        bucket_name, name = split_uri(uri)
        try:
            self.client.bucket(bucket_name).blob(name).delete(retry=self.retry)
        except exceptions.NotFound:
            return False  # also a retried delete whose first response was lost
        return True

    def stat(self, uri: str) -> ObjectInfo | None:
        bucket_name, name = split_uri(uri)
        blob = self.client.bucket(bucket_name).get_blob(name, retry=self.retry)
        return None if blob is None else _info(bucket_name, blob)

    def copy(self, source_uri: str, target_uri: str) -> None:
        source_bucket, source_name = split_uri(source_uri)
        target_bucket, target_name = split_uri(target_uri)
        source = self.client.bucket(source_bucket).blob(source_name)
        target = self.client.bucket(target_bucket).blob(target_name)
        # rewrite() rather than copy_blob(): across locations or storage classes a
        # large object takes several calls, chained by the token.
        token, _, _ = target.rewrite(source, retry=self.retry)
        while token is not None:
            token, _, _ = target.rewrite(source, token=token, retry=self.retry)

    def upload_files(self, pairs: Sequence[tuple[str, str]], *, workers: int) -> list[BaseException | None]:
        from google.cloud.storage import transfer_manager

        blobs = []
        for path, uri in pairs:
            bucket_name, name = split_uri(uri)
            blobs.append((path, self.client.bucket(bucket_name).blob(name)))
        # THREAD workers: process workers re-create the client from a pickle, which
        # loses the emulator setup in tests and is heavy inside KFP containers.
        results = transfer_manager.upload_many(
            blobs, worker_type=transfer_manager.THREAD, max_workers=max(1, workers)
        )
        return [r if isinstance(r, BaseException) else None for r in results]

    def discard_interrupted_writes(self, prefix_uri: str) -> int:
        # A GCS upload is all or nothing: a killed writer leaves no partial object.
        return 0


class _ComposedReader(ThreadedReader):
    """Reads batches as composites of up to 32 objects: compose, download, delete (3 requests per
    32 objects instead of 32). Needs create and delete permission on the input bucket, and counts
    against its write quota.

    The composite is deleted whatever happens after it may have been created, so a failed read
    leaves nothing behind; its bytes are used only if their length is the sum of the planned
    sizes, else the chunk is read object by object.
    """

    def __init__(self, storage: GCSStorage, settings: ReadSettings, stats: ReadStats):
        self.storage = storage
        self.retry = storage._retry(settings.retry_deadline, stats)
        self._chunks = ThreadPoolExecutor(max(1, settings.threads), thread_name_prefix="compose")
        super().__init__(self._read_batch, settings.threads, stats, requests_of=lambda _: 0)

    def _read_batch(self, objects: Sequence[ObjectInfo]) -> list:
        chunks = [objects[i : i + COMPOSE_MAX_OBJECTS] for i in range(0, len(objects), COMPOSE_MAX_OBJECTS)]
        return [p for payloads in self._chunks.map(self._read_chunk, chunks) for p in payloads]

    def _read_chunk(self, chunk: Sequence[ObjectInfo]) -> list:
        buckets = {split_uri(o.uri)[0] for o in chunk}
        data = self._composed(buckets.pop(), chunk) if len(buckets) == 1 and len(chunk) > 1 else None
        if data is None:
            self.stats.add(requests=len(chunk))
            return self.storage.read_many(chunk, retry=self.retry)
        out, offset = [], 0
        for obj in chunk:
            out.append(data[offset : offset + obj.size])
            offset += obj.size
        return out

    def _composed(self, bucket_name: str, chunk: Sequence[ObjectInfo]) -> memoryview | None:
        from google.api_core import exceptions

        bucket = self.storage.client.bucket(bucket_name)
        sources = [bucket.blob(split_uri(o.uri)[1]) for o in chunk]
        generations = [o.generation for o in chunk]
        composite = bucket.blob(f"{COMPOSITES}{uuid.uuid4().hex}")
        try:
            self.stats.add(requests=2)
            composite.compose(
                sources,
                if_generation_match=0,  # create-only, so a retried compose is safe
                if_source_generation_match=generations if None not in generations else None,
                retry=self.retry,
            )
            # A fresh handle: the compose answer's mediaLink may name another host than the client's.
            data = bucket.blob(composite.name, generation=composite.generation).download_as_bytes(
                retry=self.retry
            )
        except Exception as exc:  # noqa: BLE001 - the chunk is then read object by object
            log.warning("composed read of %d objects failed (%s); reading them one by one", len(chunk), exc)
            return None
        finally:
            self.stats.add(requests=1)
            try:
                composite.delete(retry=self.retry)
            except exceptions.NotFound:
                pass  # never created
            except Exception as exc:  # noqa: BLE001 - reported; the read itself may have succeeded
                log.error("could not delete the temporary composite %s: %s", composite.name, exc)
        if len(data) != sum(o.size for o in chunk):
            log.warning(
                "a composite of %d objects has an unplanned size; reading them one by one", len(chunk)
            )
            return None
        return memoryview(data)

    def close(self) -> None:
        super().close()
        self._chunks.shutdown(wait=True)


def _in_composites(bucket_name: str, uri: str) -> bool:
    return uri.startswith(gcs_uri(bucket_name, COMPOSITES))


def _info(bucket_name: str, blob) -> ObjectInfo:
    return ObjectInfo(gcs_uri(bucket_name, blob.name), int(blob.size or 0), blob.generation, blob.crc32c)
