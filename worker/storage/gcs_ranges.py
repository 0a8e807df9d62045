"""Ranged reads of GCS objects: the few large requests that read archive members (``worker.archives``).

A batch of packed images is one ranged GET of megabytes. google-cloud-storage spends about a
CPU-second per GB in Python, holding the GIL beside the decode and the model's launches;
obstore (Rust ``object_store``) reads the same bytes with the GIL released and a fifth of the
CPU. A few such requests are in flight at once, so they run in the worker's own process (the
many small reads of loose objects go to the native reader process, ``worker.storage.gcs_reader``).
"""

from __future__ import annotations

import atexit
import os
import threading
from datetime import timedelta

from worker.storage import split_uri
from worker.storage.gcs_reader import EMULATOR_HOST, emulator_credentials, emulator_store_options


class RangeReader:
    """``read(uri, offset, length)`` for one GCS backend; obstore stores are made once per bucket.

    obstore retries 429, 5xx and dropped connections itself, with backoff, up to the deadline.
    """

    def __init__(self, retry_deadline: float):
        self.retry_deadline = retry_deadline
        self._stores: dict[str, object] = {}
        self._lock = threading.Lock()
        self._credentials: str | None = None

    def read(self, uri: str, offset: int, length: int) -> bytes | memoryview:
        import obstore

        bucket, name = split_uri(uri)
        try:
            return memoryview(obstore.get_range(self._store(bucket), name, start=offset, length=length))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"object not found: {uri}") from exc
        except Exception as exc:
            # A range that starts at or past the end: the object is shorter than planned.
            if "416" in str(exc):
                return b""
            raise

    def _store(self, bucket: str):
        with self._lock:
            store = self._stores.get(bucket)
            if store is None:
                store = self._stores[bucket] = self._make_store(bucket)
            return store

    def _make_store(self, bucket: str):
        from obstore.store import GCSStore

        options: dict = {
            "retry_config": {"max_retries": 10, "retry_timeout": timedelta(seconds=self.retry_deadline)}
        }
        endpoint = os.environ.get(EMULATOR_HOST, "")
        if endpoint:
            if self._credentials is None:
                self._credentials = emulator_credentials(endpoint)
                atexit.register(os.unlink, self._credentials)
            options |= emulator_store_options(endpoint, self._credentials)
        return GCSStore(bucket, **options)
