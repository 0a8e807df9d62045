"""Ranged reads of GCS objects: the few large requests that read archive members (``worker.archives``).

A batch of packed images is one ranged GET of megabytes. google-cloud-storage spends about a
CPU-second per GB in Python, holding the GIL beside the decode and the model's launches;
obstore (Rust ``object_store``) reads the same bytes with the GIL released and a fifth of the
CPU, so it serves these reads wherever it is installed, with google-cloud-storage as the fallback.
"""

from __future__ import annotations

import atexit
import datetime
import importlib.util
import json
import os
import tempfile
import threading

from worker.storage import split_uri

# google-cloud-storage honours this for an emulator; obstore is pointed at the same endpoint.
EMULATOR_HOST = "STORAGE_EMULATOR_HOST"


class RangeReader:
    """``read(uri, offset, length)`` for one GCS backend; obstore stores are made once per bucket."""

    def __init__(self, retry_deadline: float, fallback):
        self.retry_deadline = retry_deadline
        self._fallback = fallback  # (uri, offset, length) -> bytes, through google-cloud-storage
        self._stores: dict[str, object] = {}
        self._lock = threading.Lock()
        self._credentials: str | None = None
        self._obstore = importlib.util.find_spec("obstore") is not None

    def read(self, uri: str, offset: int, length: int) -> bytes | memoryview:
        if not self._obstore:
            return self._fallback(uri, offset, length)
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

        timeout = datetime.timedelta(seconds=self.retry_deadline)
        retry = {"max_retries": 10, "retry_timeout": timeout}
        endpoint = os.environ.get(EMULATOR_HOST, "")
        if not endpoint:
            return GCSStore(bucket, retry_config=retry)
        if self._credentials is None:
            # An emulator takes no credentials; obstore reads its endpoint from a service-account file.
            fd, path = tempfile.mkstemp(prefix="obstore-emulator-", suffix=".json")
            with os.fdopen(fd, "w") as fh:
                json.dump(
                    {
                        "gcs_base_url": endpoint.rstrip("/"),
                        "disable_oauth": True,
                        "client_email": "",
                        "private_key": "",
                        "private_key_id": "",
                    },
                    fh,
                )
            atexit.register(os.unlink, path)
            self._credentials = path
        return GCSStore(
            bucket,
            service_account_path=self._credentials,
            client_options={"allow_http": True},
            retry_config=retry,
        )
