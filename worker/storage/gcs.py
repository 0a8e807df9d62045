"""The GCS backend: google-cloud-storage, with DataFlux for listing and batched reads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence

from worker.storage import (
    ObjectInfo,
    ReadError,
    StorageOptions,
    default_project,
    gcs_uri,
    split_uri,
)
from worker.storage.gcs_ranges import RangeReader

log = logging.getLogger(__name__)


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

    def __init__(self, options: StorageOptions | None = None, *, retry_deadline: float = 300.0):
        from google.cloud.storage.retry import DEFAULT_RETRY

        options = options or StorageOptions()
        self.project = options.project or default_project()
        self.compose = options.compose
        # Transient errors (429, 5xx, resets) are retried with backoff up to this deadline;
        # DataFlux's own default would keep retrying for over a day.
        self.retry = DEFAULT_RETRY.with_deadline(retry_deadline)
        self._local = threading.local()
        self._ranges = RangeReader(retry_deadline, self._download_range)

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
                raise FileNotFoundError(f"GCS bucket does not exist: {gcs_uri(name, '')}")
        except exceptions.Forbidden:
            pass  # No bucket-level read permission; object calls may still work.
        return bucket

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        bucket_name, prefix = split_uri(prefix_uri)
        bucket = self._bucket(bucket_name)
        for blob in self.client.list_blobs(bucket, prefix=prefix or None):
            if blob.name.endswith("/"):
                continue
            yield _info(bucket_name, blob)

    def fast_list(self, prefix_uri: str, processes: int = 8) -> list[ObjectInfo]:
        """DataFlux's parallel work-stealing listing. Unordered, and without generations."""
        from dataflux_core.fast_list import ListingController

        bucket_name, prefix = split_uri(prefix_uri)
        self._bucket(bucket_name)
        lister = ListingController(
            max_parallelism=max(1, processes),
            project=self.project,
            bucket=bucket_name,
            sort_results=False,
            prefix=prefix or None,
        )
        return [ObjectInfo(gcs_uri(bucket_name, name), int(size)) for name, size in lister.run()]

    def read(self, uri: str) -> bytes:
        from google.api_core import exceptions

        bucket_name, name = split_uri(uri)
        try:
            return self.client.bucket(bucket_name).blob(name).download_as_bytes(retry=self.retry)
        except exceptions.NotFound as exc:
            raise FileNotFoundError(f"object not found: {uri}") from exc

    def read_range(self, uri: str, offset: int, length: int) -> bytes | memoryview:
        return self._ranges.read(uri, offset, length)

    def _download_range(self, uri: str, offset: int, length: int) -> bytes:
        from google.api_core import exceptions

        bucket_name, name = split_uri(uri)
        blob = self.client.bucket(bucket_name).blob(name)
        try:
            # No checksum: GCS's covers the whole object, never a range (members carry their own).
            return blob.download_as_bytes(
                start=offset, end=offset + length - 1, raw_download=True, checksum=None, retry=self.retry
            )
        except exceptions.RequestRangeNotSatisfiable:
            return b""  # the range starts at or past the object's end
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

        names = [(split_uri(o.uri)[1], o.size) for o in objects]
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
            buckets = {split_uri(o.uri)[0] for o in chunk}
            got = self._dataflux_read(buckets.pop(), chunk) if len(buckets) == 1 else None
            out.extend(got if got is not None else self._read_each(chunk))
        return out

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
        return self.client.bucket(bucket_name).blob(name).exists()

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


def _info(bucket_name: str, blob) -> ObjectInfo:
    return ObjectInfo(gcs_uri(bucket_name, blob.name), int(blob.size or 0), blob.generation, blob.crc32c)
